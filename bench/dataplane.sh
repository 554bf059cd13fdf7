#!/usr/bin/env bash
# Data-plane benchmark: direct TCP vs a stunnel4 mTLS pair vs a meshnode pair, in one run,
# on loopback. Prints each path's figures and meshnode's ratio to stunnel.
#
#   bash bench/dataplane.sh            # defaults: 5 s per iperf3 run, 10000 round trips
#   SECONDS_PER_RUN=10 RR_COUNT=20000 bash bench/dataplane.sh
#   PROFILE=/tmp/mesh.perf bash bench/dataplane.sh   # also perf-record both meshnode processes
#                                                     # during their 1-stream run (needs perf)
#   PROFILE=/tmp/mesh.perf PROFILE_STREAMS=4 bash bench/dataplane.sh   # ... during the 4-stream run
#   WORKERS=2 bash bench/dataplane.sh  # runtime threads per meshnode (config key `workers`)
#
# Paths (app -> proxy -> proxy -> app):
#   direct    iperf3/rr client -> server
#   stunnel   client -> stunnel (client mode) -> TLS 1.3, client cert required -> stunnel -> server
#   meshnode  client -> upstream on node A -> QUIC (mTLS) -> node B -> server
# Throughput: iperf3, 1 and 4 streams. CPU: user+system seconds of both proxies per GB moved.
# Latency: 64-byte request/response round trips on one connection (meshnode-bench rr), idle
# and beside one bulk iperf3 stream on the same path (mixed traffic: through meshnode both share
# one QUIC connection and the receiving node's UDP socket).
# Needs root only to install stunnel4/iperf3 when missing. Release builds only.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
WORKERS=${WORKERS:-}
RR_COUNT=${RR_COUNT:-10000}
MIXED_COUNT=${MIXED_COUNT:-3000}
MIXED_SECONDS=${MIXED_SECONDS:-8}

source bench/lib.sh
bench_need stunnel:stunnel4 iperf3:iperf3

echo "== building (release)"
bench_setup meshnode-bench

# --- the applications
IPERF_PORT=5201 RR_PORT=7000
iperf3 -s -B 127.0.0.1 -p $IPERF_PORT >/dev/null 2>&1 & PIDS+=($!)
"$TOOL" rr-server 127.0.0.1:$RR_PORT & PIDS+=($!)

# --- stunnel pair: client side accepts 16201/17000, server side 26201/27000
stunnel "$(tls_conf tls-server no "iperf 26201 $IPERF_PORT" "rr 27000 $RR_PORT")" & STUNNEL_S=$!; PIDS+=($STUNNEL_S)
stunnel "$(tls_conf tls-client yes "iperf 16201 26201" "rr 17000 27000")" & STUNNEL_C=$!; PIDS+=($STUNNEL_C)

# --- meshnode pair: node B hosts both apps, node A has upstreams 36201/37000
cat >"$WORK/node-b/config.toml" <<EOF
node = "node-b"
${WORKERS:+workers = $WORKERS}
cluster = "bench"
mesh = "bench"
data_dir = "$WORK/node-b"
bind = "127.0.0.62:9470"
admin = "127.0.0.62:9471"
[[service]]
name = "iperf"
address = "127.0.0.1"
port = $IPERF_PORT
[[service]]
name = "rr"
address = "127.0.0.1"
port = $RR_PORT
EOF
cat >"$WORK/node-a/config.toml" <<EOF
node = "node-a"
${WORKERS:+workers = $WORKERS}
cluster = "bench"
mesh = "bench"
data_dir = "$WORK/node-a"
bind = "127.0.0.61:9470"
admin = "127.0.0.61:9471"
seeds = ["127.0.0.62:9470"]
[[upstream]]
service = "iperf"
listen = "127.0.0.1:36201"
[[upstream]]
service = "rr"
listen = "127.0.0.1:37000"
EOF
MESHNODE_LOG=warn "$MESHNODE" run --config "$WORK/node-b/config.toml" & MESH_B=$!; PIDS+=($MESH_B)
MESHNODE_LOG=warn "$MESHNODE" run --config "$WORK/node-a/config.toml" & MESH_A=$!; PIDS+=($MESH_A)

echo "== waiting for the proxies"
for _ in $(seq 100); do
  if "$MESHNODE" endpoints rr --admin 127.0.0.61:9471 >/dev/null 2>&1 \
    && "$MESHNODE" endpoints iperf --admin 127.0.0.61:9471 >/dev/null 2>&1 \
    && "$TOOL" rr 127.0.0.1:17000 10 64 0 >/dev/null 2>&1 \
    && "$TOOL" rr 127.0.0.1:37000 10 64 0 >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done

cpu() { # user+system seconds of the given pids
  local t=0 p
  for p in "$@"; do
    t=$(awk -v t="$t" '{print t + $14 + $15}' "/proc/$p/stat")
  done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.3f", t / hz}'
}

# iperf3 through a port: prints "Gbit/s bytes"
through() { # $1=port $2=streams
  iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$SECONDS_PER_RUN" -J |
    python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum_received"]; print("%.3f %d" % (e["bits_per_second"]/1e9, e["bytes"]))'
}

# With PROFILE set, perf-records the meshnode pids during the run of PROFILE_STREAMS
# (default 1) streams; sets the caller's $prof to perf's pid.
profile() { # $1=label $2=streams $3..=proxy pids
  local label=$1 streams=$2; shift 2
  if [ -n "${PROFILE:-}" ] && [ "$label" = meshnode ] && [ "${PROFILE_STREAMS:-1}" = "$streams" ]; then
    perf record -q -F 499 -g -o "$PROFILE" -p "$(IFS=,; echo "$*")" -- sleep "$SECONDS_PER_RUN" 2>/dev/null & prof=$!
  fi
}

declare -A R
measure() { # $1=label $2=iperf port $3=rr port $4..=proxy pids
  local label=$1 ip=$2 rp=$3; shift 3
  echo "== $label"
  local c0 c1 one four
  c0=$(cpu "$@" 2>/dev/null || echo 0)
  local prof=
  profile "$label" 1 "$@"
  one=$(through "$ip" 1)
  [ -n "$prof" ] && wait "$prof" && prof=
  c1=$(cpu "$@" 2>/dev/null || echo 0)
  profile "$label" 4 "$@"
  four=$(through "$ip" 4)
  [ -n "$prof" ] && wait "$prof" && prof=
  R[$label.tp1]=${one% *}
  R[$label.tp4]=${four% *}
  if [ "$#" -gt 0 ]; then
    R[$label.cpu]=$(awk -v a="$c0" -v b="$c1" -v n="${one#* }" 'BEGIN{printf "%.2f", (b - a) / (n / 1e9)}')
  else
    R[$label.cpu]="-"
  fi
  read -r R[$label.p50] R[$label.p99] R[$label.p999] < <("$TOOL" rr "127.0.0.1:$rp" "$RR_COUNT" 64 500)
  # Mixed: the round trips start 1 s into a bulk stream and end well before it does.
  iperf3 -c 127.0.0.1 -p "$ip" -P 1 -t "$MIXED_SECONDS" >/dev/null 2>&1 & local bulk=$!
  sleep 1
  read -r R[$label.m50] R[$label.m99] R[$label.m999] < <("$TOOL" rr "127.0.0.1:$rp" "$MIXED_COUNT" 64 100)
  wait "$bulk" || true
}

measure direct $IPERF_PORT $RR_PORT
measure stunnel 16201 17000 "$STUNNEL_C" "$STUNNEL_S"
measure meshnode 36201 37000 "$MESH_A" "$MESH_B"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0 || a == "-" || b == "-") print "-"; else printf "%.2fx", a / b }'; }
added() { awk -v a="$1" -v d="$2" 'BEGIN{printf "%.1f", a - d}'; }

echo
echo "machine: $(nproc) cores, $(uname -r); ${SECONDS_PER_RUN} s per iperf3 run, $RR_COUNT round trips of 64 B; meshnode workers: ${WORKERS:-default}"
printf "%-22s %12s %12s %14s %10s %10s %10s\n" path "1-stream" "4-stream" "CPU s/GB" "rr p50" "rr p99" "rr p99.9"
printf "%-22s %12s %12s %14s %10s %10s %10s\n" "" "Gbit/s" "Gbit/s" "(both proxies)" "us" "us" "us"
for p in direct stunnel meshnode; do
  printf "%-22s %12s %12s %14s %10s %10s %10s\n" "$p" "${R[$p.tp1]}" "${R[$p.tp4]}" "${R[$p.cpu]}" "${R[$p.p50]}" "${R[$p.p99]}" "${R[$p.p999]}"
done
for p in stunnel meshnode; do
  printf "%-22s %12s %12s %14s %10s %10s %10s\n" "$p added latency" "" "" "" \
    "$(added "${R[$p.p50]}" "${R[direct.p50]}")" "$(added "${R[$p.p99]}" "${R[direct.p99]}")" "$(added "${R[$p.p999]}" "${R[direct.p999]}")"
done
printf "%-22s %12s %12s %14s %10s %10s %10s\n" "meshnode / stunnel" \
  "$(ratio "${R[meshnode.tp1]}" "${R[stunnel.tp1]}")" "$(ratio "${R[meshnode.tp4]}" "${R[stunnel.tp4]}")" \
  "$(ratio "${R[meshnode.cpu]}" "${R[stunnel.cpu]}")" \
  "$(ratio "$(added "${R[meshnode.p50]}" "${R[direct.p50]}")" "$(added "${R[stunnel.p50]}" "${R[direct.p50]}")")" \
  "$(ratio "$(added "${R[meshnode.p99]}" "${R[direct.p99]}")" "$(added "${R[stunnel.p99]}" "${R[direct.p99]}")")" \
  "$(ratio "$(added "${R[meshnode.p999]}" "${R[direct.p999]}")" "$(added "${R[stunnel.p999]}" "${R[direct.p999]}")")"
echo "(throughput ratio >= 1 is better; CPU and added-latency ratios <= 1 are better)"

echo
echo "mixed traffic: $MIXED_COUNT round trips of 64 B beside one bulk iperf3 stream on the same path"
printf "%-22s %10s %10s %10s\n" path "rr p50 us" "rr p99 us" "p99.9 us"
for p in direct stunnel meshnode; do
  printf "%-22s %10s %10s %10s\n" "$p" "${R[$p.m50]}" "${R[$p.m99]}" "${R[$p.m999]}"
done
printf "%-22s %10s %10s %10s\n" "meshnode / stunnel" \
  "$(ratio "${R[meshnode.m50]}" "${R[stunnel.m50]}")" "$(ratio "${R[meshnode.m99]}" "${R[stunnel.m99]}")" \
  "$(ratio "${R[meshnode.m999]}" "${R[stunnel.m999]}")"
