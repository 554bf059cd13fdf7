#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), seeds included, and
# prints one line per target: executions, coverage, corpus size, result.
#   bash fuzz/run.sh [SECONDS]
# Builds with the installed stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# use its nightly flags); installs cargo-fuzz when missing. A crash stops the
# script with the libFuzzer report and the artifact path.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-60}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo fuzz build --release
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  # The gate reads the same messages the frame decoder does.
  [ "$t" = gossip_gate ] && seeds=("seeds/gossip_frame")
  log=$(mktemp)
  if ! cargo fuzz run --release "$t" "corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "FAIL $t (see fuzz/artifacts/$t)"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo '?')
  corpus=$(find "corpus/$t" -type f | wc -l)
  printf '%-16s %10s runs  cov %6s  corpus %6s  ok\n' "$t" "$runs" "$cov" "$corpus"
  rm -f "$log"
done
