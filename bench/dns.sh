#!/usr/bin/env bash
# DNS interface benchmark: meshnode's [dns] against Debian's unbound serving
# the same names from a local zone, in one run, on loopback, with dnsperf.
#
#   bash bench/dns.sh                 # 10 s throughput + 5 s latency per run
#   SECONDS_PER_RUN=20 ROUNDS=3 bash bench/dns.sh
#
# The zone: 100 services, each with an upstream on its own loopback address
# (127.100.0.N:8080) on the meshnode side and the same A and SRV records as
# unbound local-data (TTL 5, local-zone "mesh." static: unknown names are
# NXDOMAIN on both). Queries: every name as A and as SRV, and 20 unknown
# names (NXDOMAIN), shuffled once, the same file for both servers.
# Equal CPU: each server (meshnode's whole process; unbound with
# num-threads 1) is pinned to core 0, dnsperf to core 1.
# Throughput: dnsperf at up to 200 outstanding queries for SECONDS_PER_RUN.
# Latency: dnsperf at a fixed LAT_QPS (default 20,000/s), every query's
# latency from its -v line, p50/p99/p99.9 computed here.
# Servers alternate (meshnode, unbound, meshnode, ...) for ROUNDS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
LAT_SECONDS=${LAT_SECONDS:-5}
LAT_QPS=${LAT_QPS:-20000}
ROUNDS=${ROUNDS:-2}
SERVICES=${SERVICES:-100}

source bench/lib.sh
bench_need dnsperf:dnsperf unbound:unbound dig:bind9-dnsutils

echo "== building (release)"
bench_setup dns-bench
SERVER_CPU=0 CLIENT_CPU=1
MESH_DNS=127.0.0.1:18600
UNBOUND_PORT=18653

# --- meshnode: one node, 100 upstreams on their own loopback addresses
{
  cat <<CFG
node = "node-a"
cluster = "bench"
mesh = "bench"
data_dir = "$WORK/node-a"
bind = "127.0.0.41:9470"
admin = "127.0.0.41:9471"
[dns]
listen = "$MESH_DNS"
CFG
  for i in $(seq 1 "$SERVICES"); do
    printf '[[upstream]]\nservice = "svc%03d"\nlisten = "127.100.0.%d:8080"\n' "$i" "$i"
  done
} >"$WORK/node-a/config.toml"

# --- unbound: the same names as local data
{
  cat <<CFG
server:
  interface: 127.0.0.1@$UNBOUND_PORT
  port: $UNBOUND_PORT
  num-threads: 1
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$WORK"
  pidfile: "$WORK/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  do-ip6: no
  so-reuseport: no
  local-zone: "mesh." static
CFG
  for i in $(seq 1 "$SERVICES"); do
    hex=$(printf '7f6400%02x' "$i")
    printf '  local-data: "svc%03d.service.mesh. 5 IN A 127.100.0.%d"\n' "$i" "$i"
    printf '  local-data: "svc%03d.service.mesh. 5 IN SRV 1 1 8080 %s.addr.mesh."\n' "$i" "$hex"
    printf '  local-data: "%s.addr.mesh. 5 IN A 127.100.0.%d"\n' "$hex" "$i"
  done
} >"$WORK/unbound.conf"
unbound-checkconf "$WORK/unbound.conf" >/dev/null

# --- the query file
{
  for i in $(seq 1 "$SERVICES"); do
    printf 'svc%03d.service.mesh A\nsvc%03d.service.mesh SRV\n' "$i" "$i"
  done
  for i in $(seq 1 20); do printf 'nope%02d.service.mesh A\n' "$i"; done
} | shuf --random-source=<(yes) >"$WORK/queries.txt"

MESHNODE_LOG=error taskset -c $SERVER_CPU "$MESHNODE" run --config "$WORK/node-a/config.toml" & MESH=$!; PIDS+=($MESH)
taskset -c $SERVER_CPU unbound -d -c "$WORK/unbound.conf" & UNB=$!; PIDS+=($UNB)

wait_answer() { # $1=ip $2=port
  for _ in $(seq 1 100); do
    [ "$(dig @"$1" -p "$2" +short +time=1 +tries=1 svc001.service.mesh A 2>/dev/null)" = 127.100.0.1 ] && return 0
    sleep 0.1
  done
  echo "no answer from $1:$2" >&2; return 1
}
wait_answer 127.0.0.1 18600
wait_answer 127.0.0.1 $UNBOUND_PORT
# Both answer the same: compare every query's answer section once.
while read -r name type; do
  a=$(dig @127.0.0.1 -p 18600 +short "$name" "$type" | sort)
  b=$(dig @127.0.0.1 -p $UNBOUND_PORT +short "$name" "$type" | sort)
  [ "$a" = "$b" ] || { echo "answers differ for $name $type: meshnode [$a] unbound [$b]" >&2; exit 1; }
done < <(head -12 "$WORK/queries.txt")
echo "   (both servers give the same answers for the first 12 queries)"

throughput() { # $1=port -> queries/s
  taskset -c $CLIENT_CPU dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -c 4 -q 200 2>/dev/null \
    | awk '/Queries per second/ {print int($4)} /Queries lost/ {lost=$3} END {}'
}

latency() { # $1=port -> "p50 p99 p999 lost" in microseconds
  taskset -c $CLIENT_CPU dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries.txt" -l "$LAT_SECONDS" -Q "$LAT_QPS" -c 4 -q 100 -v 2>/dev/null \
    | awk '/^> [A-Z]/ {print $NF * 1000000}' \
    | sort -n | awk '{v[NR]=$1} END {if (NR == 0) {print "- - - 0"; exit} printf "%d %d %d %d\n", v[int(NR*0.50)+1], v[int(NR*0.99)+1], v[int(NR*0.999)+1], NR}'
}

printf "\n== throughput (queries/s, %s s, 200 outstanding) and latency at %s q/s (us)\n" "$SECONDS_PER_RUN" "$LAT_QPS"
printf "%-6s %-9s %10s %8s %8s %8s %9s\n" round server "q/s" p50 p99 p99.9 answered
declare -A QPS
for r in $(seq 1 "$ROUNDS"); do
  for s in meshnode unbound; do
    port=18600; [ $s = unbound ] && port=$UNBOUND_PORT
    q=$(throughput $port)
    read -r p50 p99 p999 n < <(latency $port)
    QPS[$s]="${QPS[$s]:-} $q"
    printf "%-6s %-9s %10s %8s %8s %8s %9s\n" "$r" "$s" "$q" "$p50" "$p99" "$p999" "$n"
  done
done
best() { tr ' ' '\n' <<<"$1" | grep . | sort -n | tail -1; }
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
m=$(best "${QPS[meshnode]}") u=$(best "${QPS[unbound]}")
printf "\nbest q/s: meshnode %s, unbound %s: %s x unbound\n" "$m" "$u" "$(ratio "$m" "$u")"
m=$(median "${QPS[meshnode]}") u=$(median "${QPS[unbound]}")
printf "median q/s: meshnode %s, unbound %s: %s x unbound\n" "$m" "$u" "$(ratio "$m" "$u")"
printf "RSS: meshnode %s MiB, unbound %s MiB\n" "$(rss_mib $MESH)" "$(rss_mib $UNB)"
