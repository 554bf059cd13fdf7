#!/usr/bin/env bash
# Soak: COUNT tunnelled streams (default 10,000) held through one meshnode pair
# for SECONDS (default 600) with traffic on every one (1-byte round trips,
# round after round), RSS of both nodes sampled every 30 s. Prints the RSS
# series, the errors, and the growth over the second half.
#   bash bench/soak.sh [COUNT] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-10000}
SECS=${2:-600}
ulimit -n "$(ulimit -Hn)"
source bench/lib.sh
bench_setup meshnode-soak
ECHO_PORT=7200
"$TOOL" rr-server 127.0.0.1:$ECHO_PORT 1 & PIDS+=($!)
bench_pair 81 82 $ECHO_PORT 37200
for _ in $(seq 100); do
  "$TOOL" rr 127.0.0.1:37200 5 1 0 >/dev/null 2>&1 && break
  sleep 0.1
done
out=$WORK/soak.out
"$TOOL" soak 127.0.0.1:37200 "$COUNT" "$SECS" >"$out" 2>"$WORK/soak.err" & SOAK=$!
for _ in $(seq 1200); do grep -q HELD "$out" 2>/dev/null && break; sleep 0.5; done
echo "held: $(grep HELD "$out")"
echo "| t (s) | RSS A (MiB) | RSS B (MiB) |"
echo "|---|---|---|"
samples=()
t=0
while kill -0 $SOAK 2>/dev/null; do
  ra=$(rss_mib $MESH_A); rb=$(rss_mib $MESH_B)
  echo "| $t | $ra | $rb |"
  samples+=("$t $ra $rb")
  sleep 30; t=$((t + 30))
done
wait $SOAK || true
tail -1 "$out"
cat "$WORK/soak.err" >&2 || true
read -r _ rounds trips errors < <(grep DONE "$out")
half=$((SECS / 2))
python3 - "$half" "${samples[@]}" <<'PY'
import sys
half = int(sys.argv[1])
rows = [tuple(float(x) for x in s.split()) for s in sys.argv[2:]]
second = [r for r in rows if r[0] >= half]
if len(second) >= 2:
    ga = second[-1][1] - second[0][1]; gb = second[-1][2] - second[0][2]
    print(f"growth over the second half: A {ga:+.1f} MiB, B {gb:+.1f} MiB; peak A {max(r[1] for r in rows):.1f}, B {max(r[2] for r in rows):.1f} MiB")
PY
echo "rounds $rounds, round trips $trips, errors $errors"
