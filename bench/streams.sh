#!/usr/bin/env bash
# 10,000 concurrent tunnel streams through one meshnode pair on loopback:
# open them all (each checked with a 1-byte round trip), hold them, check them
# again, and read both nodes' RSS while they are held. Also a stunnel4 pair
# holding as many connections, in the same run, as the baseline.
#   bash bench/streams.sh [COUNT]          (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-10000}
# Each proxy holds two sockets per connection: raise the soft limit as far as allowed.
ulimit -n "$(ulimit -Hn)"
source bench/lib.sh
bench_setup meshnode-streams
ECHO_PORT=7100
"$TOOL" rr-server 127.0.0.1:$ECHO_PORT 1 & PIDS+=($!)

bench_pair 71 72 $ECHO_PORT 37100

stunnel "$(tls_conf tls-server no "echo 27100 $ECHO_PORT")" & STUNNEL_S=$!; PIDS+=($STUNNEL_S)
stunnel "$(tls_conf tls-client yes "echo 17100 27100")" & STUNNEL_C=$!; PIDS+=($STUNNEL_C)

for _ in $(seq 100); do
  "$TOOL" rr 127.0.0.1:37100 5 1 0 >/dev/null 2>&1 && "$TOOL" rr 127.0.0.1:17100 5 1 0 >/dev/null 2>&1 && break
  sleep 0.1
done
echo "idle RSS: meshnode A $(rss_mib $MESH_A) MiB, B $(rss_mib $MESH_B) MiB; stunnel client $(rss_mib $STUNNEL_C) MiB, server $(rss_mib $STUNNEL_S) MiB"

run() { # $1=label $2=port $3=pid a $4=pid b $5=count
  local out=$WORK/$1.out
  "$TOOL" hold "127.0.0.1:$2" "$5" 15 >"$out" 2> >(tee "$WORK/$1.err" >&2) & local h=$!
  for _ in $(seq 600); do grep -q HELD "$out" 2>/dev/null && break; sleep 0.5; done
  sleep 2
  local ra rb; ra=$(rss_mib "$3"); rb=$(rss_mib "$4")
  wait $h
  read -r held ok errors < <(tail -1 "$out")
  printf "| %s | %s | %s | %s | %s MiB | %s MiB |\n" "$1" "$5" "$held" "$ok" "$ra" "$rb"
  grep -h "first error" "$WORK/$1.err" >&2 || true
}
echo
echo "| path | asked | held | still echoing after 15 s | RSS client side | RSS server side |"
echo "|---|---|---|---|---|---|"
run meshnode 37100 $MESH_A $MESH_B "$COUNT"
# stunnel's client side holds both sockets of a connection in one process: stay under the fd limit.
SCOUNT=$(( COUNT < ($(ulimit -n) - 100) / 2 ? COUNT : ($(ulimit -n) - 100) / 2 ))
run stunnel 17100 $STUNNEL_C $STUNNEL_S "$SCOUNT"
