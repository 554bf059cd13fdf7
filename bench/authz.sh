#!/usr/bin/env bash
# Instructions per authorization decision, counted by callgrind, against
# decoding a tunnel header (the per-stream work before authorization) in the
# same run. The budget: 5 us per stream open = 5,000 instructions at a
# conservative 1 instruction per ns (a 2-3 GHz core retires more).
#
#   bash bench/authz.sh [ITERATIONS]     (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_need valgrind:valgrind
N=${1:-20000}
cargo build --release -q -p meshnode-bench --bin meshnode-authz-bench
BIN=target/release/meshnode-authz-bench
WORK=$(mktemp -d /tmp/authz-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Total instructions of one run (callgrind's "summary:" line).
instructions() {
  valgrind --tool=callgrind --callgrind-out-file="$WORK/out" "$BIN" "$1" "$2" 2>/dev/null
  awk '/^summary:/ {print $2}' "$WORK/out"
}

per() {
  local one many
  one=$(instructions "$1" 1)
  many=$(instructions "$1" "$((N + 1))")
  echo $(( (many - one) / N ))
}

AUTHZ=$(per authz)
DECIDE=$(per decide)
HEADER=$(per header)
echo "authorization (snapshot, decision, counter): $AUTHZ instructions per stream"
echo "  of which snapshot and decision:            $DECIDE"
echo "tunnel header decode (baseline):             $HEADER instructions per stream"
awk -v a="$AUTHZ" -v h="$HEADER" 'BEGIN { printf "ratio: %.2fx the header decode; %.0f%% of the 5,000-instruction budget", a / h, 100 * a / 5000; print "" }'
for mode in authz decide header; do "$BIN" "$mode" 1000000; done
if [ "$AUTHZ" -gt 5000 ]; then
  echo "FAIL: over budget" >&2
  exit 1
fi
