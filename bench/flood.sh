#!/usr/bin/env bash
# A QUIC Initial flood at a node that carries a live tunnel, in two modes:
# Initials that ignore Retry (fresh, never answered), and real clients from
# one source that answer Retry. The meshnode pair and the latency probe run
# on core 0, the flooder on core 1. Prints, per mode, the node's peak RSS
# during the flood and the tunnel's round-trip p99 against its idle value,
# plus what the node's admission counted.
#   bash bench/flood.sh [RATE] [SECONDS]      (default 5000 Initials/s, 60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-5000}
SECS=${2:-60}
source bench/lib.sh
bench_setup meshnode-flood
FLOOD=$BIN/meshnode-flood
ECHO_PORT=7300
taskset -c 0 "$TOOL" rr-server 127.0.0.1:$ECHO_PORT 64 & PIDS+=($!)
bench_pair 91 92 $ECHO_PORT 37300
taskset -a -pc 0 "$MESH_A" >/dev/null
taskset -a -pc 0 "$MESH_B" >/dev/null
for _ in $(seq 100); do
  "$TOOL" rr 127.0.0.1:37300 5 64 0 >/dev/null 2>&1 && break
  sleep 0.1
done
p99() { taskset -c 0 "$TOOL" rr 127.0.0.1:37300 20000 64 500 | awk '{print $2}'; }
admission() {
  curl -s http://127.0.0.92:9471/metrics | awk '/^meshnode_quic_admission_total\{/ {
    match($0, /decision="[a-z]+"/); d = substr($0, RSTART + 10, RLENGTH - 11); v[d] += $NF }
    END { for (d in v) printf "%s=%d ", d, v[d] }'
}
idle=$(p99)
echo "idle: tunnel round trip p99 ${idle} us; node B RSS $(rss_mib "$MESH_B") MiB"
echo
echo "| mode | Initials sent | peak RSS node B | p99 during (us) | p99 / idle | node B admission counters |"
echo "|---|---|---|---|---|---|"
for mode in ignore-retry answer-retry; do
  before=$(admission)
  taskset -c 1 "$FLOOD" "$mode" 127.0.0.92:9470 "$RATE" "$SECS" >"$WORK/$mode.out" & F=$!
  peak=0
  lat=()
  sleep 3
  while kill -0 $F 2>/dev/null; do
    lat+=("$(p99)")
    r=$(rss_mib "$MESH_B")
    peak=$(awk -v a="$peak" -v b="$r" 'BEGIN { print (b > a) ? b : a }')
    sleep 1
  done
  wait $F || true
  sent=$(awk '/^sent/ {print $2}' "$WORK/$mode.out")
  med=$(printf '%s\n' "${lat[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  ratio=$(awk -v a="$med" -v b="$idle" 'BEGIN { printf "%.2fx", a / b }')
  printf "| %s | %s | %s MiB | %s | %s | %s |\n" "$mode" "$sent" "$peak" "$med" "$ratio" "$(admission) (before: ${before:-none})"
  sleep 6
done
