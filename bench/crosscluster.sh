#!/usr/bin/env bash
# Cross-cluster streams with end-to-end sessions against the same mesh
# trusting its gateways (`cross_cluster_identity = "gateway"`, the path
# before end-to-end sessions), side by side in one run on loopback:
#
#   a1 (upstreams) -> agw (gateway, cluster a) -> bgw (gateway, cluster b) -> b1 (rr-server, iperf3 -s)
#
# Per mode and round: new connections one after another (connect + one
# 64-byte round trip: the setup cost), and one iperf3 stream for 5 s.
#   bash bench/crosscluster.sh [CONNECTIONS] [ROUNDS]     (defaults 2000, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_need iperf3:iperf3
CONNS=${1:-2000}
ROUNDS=${2:-2}
cargo build --release -q -p meshnode-cli -p meshnode-bench
BIN=$PWD/target/release
MESHNODE=$BIN/meshnode
TOOL=$BIN/meshnode-bench
WORK=$(mktemp -d /tmp/crosscluster.XXXXXX)
PIDS=()
trap bench_cleanup EXIT
"$MESHNODE" ca init --mesh bench --out "$WORK/ca" >/dev/null
"$MESHNODE" cert issue --ca "$WORK/ca" --cluster a --node a1 --out "$WORK/a1" >/dev/null
"$MESHNODE" cert issue --ca "$WORK/ca" --cluster a --node agw --gateway --out "$WORK/agw" >/dev/null
"$MESHNODE" cert issue --ca "$WORK/ca" --cluster b --node bgw --gateway --out "$WORK/bgw" >/dev/null
"$MESHNODE" cert issue --ca "$WORK/ca" --cluster b --node b1 --out "$WORK/b1" >/dev/null

RR_PORT=28100
IPERF_PORT=28101
"$TOOL" rr-server 127.0.0.1:$RR_PORT 64 & PIDS+=($!)
iperf3 -s -B 127.0.0.1 -p $IPERF_PORT >/dev/null 2>&1 & PIDS+=($!)

# start MODE PORTBASE: four nodes on 127.0.9.{1..4}; a1's upstreams on PORTBASE, PORTBASE+1.
start() {
  local mode=$1 base=$2 n
  NODE_PIDS=()
  for n in a1 agw bgw b1; do rm -rf "$WORK/$n/data"; mkdir -p "$WORK/$n/data"; done
  conf() { # name cluster octet seeds extra
    cat >"$WORK/$1/config.toml" <<CFG
node = "$1"
cluster = "$2"
mesh = "bench"
data_dir = "$WORK/$1/data"
bind = "127.0.9.$3:9470"
admin = "127.0.9.$3:9471"
seeds = [$4]
cross_cluster_identity = "$mode"
tls = { ca = "$WORK/$1/ca.pem", cert = "$WORK/$1/node.pem", key = "$WORK/$1/node.key" }
$5
CFG
  }
  conf agw a 2 '' 'gateway = true
wan_advertise = "127.0.9.2:9470"
wan_seeds = ["127.0.9.3:9470"]'
  conf bgw b 3 '' 'gateway = true
wan_advertise = "127.0.9.3:9470"
wan_seeds = ["127.0.9.2:9470"]'
  conf b1 b 4 '"127.0.9.3:9470"' "[[service]]
name = \"rr\"
address = \"127.0.0.1\"
port = $RR_PORT
[[service]]
name = \"iperf\"
address = \"127.0.0.1\"
port = $IPERF_PORT"
  conf a1 a 1 '"127.0.9.2:9470"' "[[upstream]]
service = \"rr\"
listen = \"127.0.0.1:$base\"
[[upstream]]
service = \"iperf\"
listen = \"127.0.0.1:$((base + 1))\""
  for n in agw bgw b1 a1; do
    MESHNODE_LOG=error "$MESHNODE" run --config "$WORK/$n/config.toml" & NODE_PIDS+=($!); PIDS+=($!)
  done
  for _ in $(seq 1 150); do
    "$TOOL" conn 127.0.0.1:$base 1 64 >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the cross-cluster path never came up ($mode)" >&2
  exit 1
}

stop() { kill "${NODE_PIDS[@]}" 2>/dev/null || true; wait "${NODE_PIDS[@]}" 2>/dev/null || true; }

declare -A RATE P50 P99 GBPS
printf '%-10s %5s %12s %10s %10s %10s\n' mode round "conn/s" "p50 us" "p99 us" "Gbit/s"
base=28200
for r in $(seq 1 "$ROUNDS"); do
  for mode in end_to_end gateway; do
    start "$mode" $base
    "$TOOL" conn 127.0.0.1:$base 200 64 >/dev/null   # warm the connections
    read -r rate p50 p99 < <("$TOOL" conn 127.0.0.1:$base "$CONNS" 64)
    gbps=$(iperf3 -c 127.0.0.1 -p $((base + 1)) -t 5 -J | awk -F'[:,]' '/"bits_per_second"/ {v=$2} END {printf "%.2f", v / 1e9}')
    printf '%-10s %5s %12s %10s %10s %10s\n' "$mode" "$r" "$rate" "$p50" "$p99" "$gbps"
    RATE[$mode]="${RATE[$mode]:-} $rate"; P50[$mode]="${P50[$mode]:-} $p50"; GBPS[$mode]="${GBPS[$mode]:-} $gbps"
    stop
    base=$((base + 10))
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
e_p50=$(echo "${P50[end_to_end]}" | median); g_p50=$(echo "${P50[gateway]}" | median)
e_rate=$(echo "${RATE[end_to_end]}" | median); g_rate=$(echo "${RATE[gateway]}" | median)
e_bw=$(echo "${GBPS[end_to_end]}" | median); g_bw=$(echo "${GBPS[gateway]}" | median)
awk -v a="$e_p50" -v b="$g_p50" -v c="$e_rate" -v d="$g_rate" -v e="$e_bw" -v f="$g_bw" 'BEGIN {
  printf "end_to_end / gateway (medians): setup p50 %.2fx (target <= 1.5x), connections/s %.2fx, throughput %.2fx (target >= 0.8x)\n", a / b, c / d, e / f }'
