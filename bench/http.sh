#!/usr/bin/env bash
# HTTP data-path benchmark: direct vs a haproxy pair (HTTP mode, mutual TLS
# between the two, HTTP/2 between them) vs a meshnode pair (an HTTP
# upstream, one QUIC connection), in one run, on loopback, same
# certificates. Clients: wrk (HTTP/1.1 keep-alive) and h2load (HTTP/2,
# prior knowledge) at 1, 16 and 64 connections; the application is nginx
# answering a 64-byte body (HTTP/1.1, and h2c for the direct HTTP/2 runs).
#
#   bash bench/http.sh                       # 5 s per run
#   SECONDS_PER_RUN=10 CONNS="1 16 64" bash bench/http.sh
#   ROUTE_COST=0 bash bench/http.sh          # skip the callgrind part
#   THROUGHPUT=0 bash bench/http.sh          # only the callgrind part (route, resilience and telemetry cost)
#   CALLGRIND_KEEP=/tmp/cg bash bench/http.sh # keep the callgrind files (callgrind_annotate them)
#   PROFILE=/tmp/http.perf bash bench/http.sh   # perf-record both meshnode processes during
#                                               # the wrk run at PROFILE_CONNS (16) connections
#
# Equal CPU: haproxy nbthread = meshnode workers = 1, and all four proxy
# processes are pinned to core 1 (clients and nginx to core 0).
# Latency: "added" = the proxied p50/p99 minus the direct one, per client
# and connection count; the ratios compare meshnode's added latency with
# haproxy's. CPU: user+system seconds of both proxies of a pair per
# 10,000 requests.
# Route cost (callgrind, instructions repeat on noisy machines): a whole
# proxied request at the caller node (the difference of two runs of K1 and
# K2 requests) against matching one request in a 100-rule table whose last
# rule matches (meshnode-route-bench; a signed document of 100 rules would
# pass the 8 KiB document limit, so the table is built in-process).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
CONNS=${CONNS:-"1 16 64"}
ROUTE_COST=${ROUTE_COST:-1}
THROUGHPUT=${THROUGHPUT:-1}
K1=${K1:-300}
K2=${K2:-1300}

source bench/lib.sh
bench_need haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client valgrind:valgrind

echo "== building (release)"
bench_setup http-bench
"$MESHNODE" cert issue --ca "$WORK/ca" --operator bench-op --out "$WORK/op" >/dev/null

PROXY_CPU=1 CLIENT_CPU=0
APP=8080 APP_H2=8081
# --- the application: nginx, one worker, keep-alive, a 64-byte body
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log error;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx;
  scgi_temp_path $WORK/nginx;
  server {
    listen 127.0.0.1:$APP;
    listen 127.0.0.1:$APP_H2 http2;
    location / { return 200 "0123456789012345678901234567890123456789012345678901234567890123"; }
  }
}
EOF
taskset -c $CLIENT_CPU nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" & PIDS+=($!)

# --- haproxy pair: client side 18080 (HTTP/1.1) and 18081 (h2c); mTLS with h2 to 28080
cat "$WORK/tls-client/node.pem" "$WORK/tls-client/node.key" >"$WORK/ha-client.pem"
cat "$WORK/tls-server/node.pem" "$WORK/tls-server/node.key" >"$WORK/ha-server.pem"
cat >"$WORK/ha-server.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend mesh
  bind 127.0.0.1:28080 ssl crt $WORK/ha-server.pem ca-file $WORK/tls-server/ca.pem verify required alpn h2 ssl-min-ver TLSv1.3
  default_backend app
backend app
  http-reuse always
  server nginx 127.0.0.1:$APP
EOF
cat >"$WORK/ha-client.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend h1
  bind 127.0.0.1:18080
  bind 127.0.0.1:18081 proto h2
  default_backend mesh
backend mesh
  http-reuse always
  server b 127.0.0.1:28080 ssl crt $WORK/ha-client.pem ca-file $WORK/tls-client/ca.pem verify required alpn h2 ssl-min-ver TLSv1.3
EOF
taskset -c $PROXY_CPU haproxy -db -f "$WORK/ha-server.cfg" & HA_S=$!; PIDS+=($HA_S)
taskset -c $PROXY_CPU haproxy -db -f "$WORK/ha-client.cfg" & HA_C=$!; PIDS+=($HA_C)

# --- meshnode pair: node-b hosts "web" (protocol http), node-a's upstream 38080
mesh_configs() { # $1: extra top-level keys of node-a
  cat >"$WORK/node-b/config.toml" <<EOF
node = "node-b"
cluster = "bench"
mesh = "bench"
workers = 1
data_dir = "$WORK/node-b"
bind = "127.0.0.72:9470"
admin = "127.0.0.72:9471"
[[service]]
name = "web"
address = "127.0.0.1"
port = $APP
protocol = "http"
EOF
  cat >"$WORK/node-a/config.toml" <<EOF
node = "node-a"
cluster = "bench"
mesh = "bench"
workers = 1
data_dir = "$WORK/node-a"
bind = "127.0.0.71:9470"
admin = "127.0.0.71:9471"
seeds = ["127.0.0.72:9470"]
[[upstream]]
service = "web"
listen = "127.0.0.1:38080"
protocol = "http"
EOF
}
mesh_configs
MESHNODE_LOG=error taskset -c $PROXY_CPU "$MESHNODE" run --config "$WORK/node-b/config.toml" & MESH_B=$!; PIDS+=($MESH_B)
MESHNODE_LOG=error taskset -c $PROXY_CPU "$MESHNODE" run --config "$WORK/node-a/config.toml" & MESH_A=$!; PIDS+=($MESH_A)

wait_http() { # $1: url
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer at $1" >&2
  exit 1
}
wait_http http://127.0.0.1:$APP/
wait_http http://127.0.0.1:18080/
wait_http http://127.0.0.1:38080/

cpu() { # user+system clock ticks of the given pids
  local t=0 p
  for p in "$@"; do t=$(awk -v t="$t" '{print t + $14 + $15}' "/proc/$p/stat"); done
  echo "$t"
}
declare -A R

# wrk: requests/s, p50 and p99 in microseconds
run_wrk() { # $1=label $2=port $3=conns $4..=pids
  local label=$1 port=$2 c=$3 out c0 c1
  shift 3
  c0=$(cpu "$@" 2>/dev/null || echo 0)
  if [ -n "${PROFILE:-}" ] && [ "$label" = meshnode ] && [ "$c" = "${PROFILE_CONNS:-16}" ]; then
    perf record -q -g -o "$PROFILE" -p "$(IFS=,; echo "$*")" -- sleep "$((SECONDS_PER_RUN - 1))" >/dev/null 2>&1 &
  fi
  out=$(taskset -c $CLIENT_CPU wrk -t1 -c"$c" -d"${SECONDS_PER_RUN}s" --latency "http://127.0.0.1:$port/")
  c1=$(cpu "$@" 2>/dev/null || echo 0)
  R[$label.h1.$c.rps]=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  R[$label.h1.$c.p50]=$(awk '$1 == "50%" {print $2}' <<<"$out" | us)
  R[$label.h1.$c.p99]=$(awk '$1 == "99%" {print $2}' <<<"$out" | us)
  local n; n=$(awk '/requests in/ {print $1}' <<<"$out")
  R[$label.h1.$c.cpu]=$(awk -v a="$c0" -v b="$c1" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN{ if (n > 0 && b > a) printf "%.3f", (b - a) / hz / n * 10000; else print "-" }')
}

# "1.23ms" / "456.78us" / "1.2s" -> microseconds
us() { awk '{ v = $1; if (v ~ /us$/) { sub(/us$/, "", v); print v } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v * 1000 } else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000000 } }'; }

# h2load: requests/s; p50 and p99 from its per-request log (microseconds)
run_h2() { # $1=label $2=port $3=conns $4..=pids
  local label=$1 port=$2 c=$3 out c0 c1 log=$WORK/h2.log
  shift 3
  rm -f "$log"
  c0=$(cpu "$@" 2>/dev/null || echo 0)
  out=$(taskset -c $CLIENT_CPU h2load -c"$c" -m1 -D "$SECONDS_PER_RUN" --log-file="$log" "http://127.0.0.1:$port/" 2>&1)
  c1=$(cpu "$@" 2>/dev/null || echo 0)
  R[$label.h2.$c.rps]=$(awk '/^finished in/ {gsub(",", "", $4); printf "%.0f", $4}' <<<"$out")
  local failed; failed=$(awk '/^requests:/ {print $10}' <<<"$out")
  [ "${failed:-0}" = 0 ] || echo "warning: $label h2 $c: $failed failed" >&2
  read -r p50 p99 n < <(awk '{print $3}' "$log" | sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.5)+1], a[int(NR*0.99)+1], NR}')
  R[$label.h2.$c.p50]=$p50
  R[$label.h2.$c.p99]=$p99
  R[$label.h2.$c.cpu]=$(awk -v a="$c0" -v b="$c1" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN{ if (n > 0 && b > a) printf "%.3f", (b - a) / hz / n * 10000; else print "-" }')
}

if [ "$THROUGHPUT" = 1 ]; then
echo "== load: ${SECONDS_PER_RUN}s per run, connections: $CONNS"
for c in $CONNS; do
  run_wrk direct $APP "$c"
  run_wrk haproxy 18080 "$c" $HA_C $HA_S
  run_wrk meshnode 38080 "$c" $MESH_A $MESH_B
  run_h2 direct $APP_H2 "$c"
  run_h2 haproxy 18081 "$c" $HA_C $HA_S
  run_h2 meshnode 38080 "$c" $MESH_A $MESH_B
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0 || a == "-" || b == "-" || a == "" || b == "") print "-"; else printf "%.2fx", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "") print "-"; else printf "%.1f", (a - b < 1 ? 1 : a - b) }'; }

printf "\n%-10s %-6s %5s %10s %10s %10s %14s\n" proto path conns "req/s" "p50 us" "p99 us" "cpu s/10k req"
for proto in h1 h2; do
  for c in $CONNS; do
    for p in direct haproxy meshnode; do
      printf "%-10s %-6s %5s %10s %10s %10s %14s\n" "$proto" "${p:0:6}" "$c" "${R[$p.$proto.$c.rps]}" "${R[$p.$proto.$c.p50]}" "${R[$p.$proto.$c.p99]}" "${R[$p.$proto.$c.cpu]:--}"
    done
  done
done

echo
echo "meshnode / haproxy (req/s >= 1.00x is the target; added p50 <= 1.00x, added p99 <= 1.20x; cpu <= 1 is better)"
printf "%-6s %5s %10s %14s %14s %10s\n" proto conns "req/s" "added p50" "added p99" "cpu"
for proto in h1 h2; do
  for c in $CONNS; do
    d50=${R[direct.$proto.$c.p50]} d99=${R[direct.$proto.$c.p99]}
    printf "%-6s %5s %10s %14s %14s %10s\n" "$proto" "$c" \
      "$(ratio "${R[meshnode.$proto.$c.rps]}" "${R[haproxy.$proto.$c.rps]}")" \
      "$(ratio "$(added "${R[meshnode.$proto.$c.p50]}" "$d50")" "$(added "${R[haproxy.$proto.$c.p50]}" "$d50")")" \
      "$(ratio "$(added "${R[meshnode.$proto.$c.p99]}" "$d99")" "$(added "${R[haproxy.$proto.$c.p99]}" "$d99")")" \
      "$(ratio "${R[meshnode.$proto.$c.cpu]}" "${R[haproxy.$proto.$c.cpu]}")"
  done
done

fi # THROUGHPUT

[ "$ROUTE_COST" = 1 ] || exit 0

echo
echo "== route cost (callgrind): node-a's instructions per request, $K1 and $K2 requests (h2load, 1 connection), against matching one request in a 100-rule table"
kill "$MESH_A"; wait "$MESH_A" 2>/dev/null || true
# A whole request at the caller node: the difference of two runs, so start-up and idle work cancel.
request_instr() { # $1: a label for the callgrind files
  local total=() k pid
  for k in $K1 $K2; do
    MESHNODE_LOG=error valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$1.$k" \
      "$MESHNODE" run --config "$WORK/node-a/config.toml" 2>/dev/null & pid=$!
    for _ in $(seq 1 600); do
      curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:38080/ 2>/dev/null && break
      sleep 0.2
    done
    h2load -n "$k" -c1 -m1 "http://127.0.0.1:38080/" >/dev/null 2>&1
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    total+=("$(awk '/^summary:/ {print $2}' "$WORK/cg.$1.$k")")
    if [ -n "${CALLGRIND_KEEP:-}" ]; then mkdir -p "$CALLGRIND_KEEP" && cp "$WORK/cg.$1.$k" "$CALLGRIND_KEEP/"; fi
  done
  echo $(( (total[1] - total[0]) / (K2 - K1) ))
}
REQUEST=$(request_instr plain)
# The microbenches (meshnode-route-bench, -resilience-bench, -telemetry-bench)
# take MODE N: one iteration's instructions are the difference of N + 1 and
# 1 iterations under callgrind, so start-up cancels.
per_iter() { # $1: bench binary, $2: mode, $3: N
  local i total=()
  for i in 1 $(( $3 + 1 )); do
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$1.$2.$i" "$BIN/$1" "$2" "$i" 2>/dev/null
    total+=("$(awk '/^summary:/ {print $2}' "$WORK/$1.$2.$i")")
  done
  echo $(( (total[1] - total[0]) / $3 ))
}
# The routing work alone, 100 rules (the last one matches), and a lookup with no document.
cargo build --release -q -p meshnode-bench --bin meshnode-route-bench
ROUTE=$(per_iter meshnode-route-bench route 20000)
NONE=$(per_iter meshnode-route-bench none 20000)
echo "a proxied request at the caller node: $REQUEST instructions"
echo "routing with 100 rules (last matches): $ROUTE instructions; with no routes document: $NONE"
awk -v r="$ROUTE" -v n="$NONE" -v q="$REQUEST" 'BEGIN { printf "a 100-rule table adds %.1f%% per request (target <= 5%%)\n", (r - n) * 100 / q }'

echo
echo "== resilience cost (callgrind): the work a resilience document adds per request (meshnode-resilience-bench), against a whole proxied request"
cargo build --release -q -p meshnode-bench --bin meshnode-resilience-bench
RES_DOC=$(per_iter meshnode-resilience-bench document 20000)
RES_NONE=$(per_iter meshnode-resilience-bench none 20000)
echo "a request's resilience work with every caller-side key: $RES_DOC instructions; for a service without a document: $RES_NONE"
awk -v d="$RES_DOC" -v n="$RES_NONE" -v q="$REQUEST" 'BEGIN { printf "a resilience document adds %.1f%% per request (target <= 3%%)\n", (d - n) * 100 / q }'

echo
echo "== telemetry cost (callgrind): what golden metrics, top's table and the sampled access log add per request at both ends (meshnode-telemetry-bench)"
cargo build --release -q -p meshnode-bench --bin meshnode-telemetry-bench
# 200,000 iterations: start-up (the writer thread, the recorder) varies by a few million instructions.
TEL=$(per_iter meshnode-telemetry-bench record 200000)
TEL_NONE=$(per_iter meshnode-telemetry-bench none 200000)
echo "telemetry of one request, caller and destination together: $TEL instructions; the loop alone: $TEL_NONE"
awk -v d="$TEL" -v n="$TEL_NONE" -v q="$REQUEST" 'BEGIN { printf "telemetry adds %.1f%% of a proxied request at one node, for both ends together (target <= 5%%)\n", (d - n) * 100 / q }'

echo
echo "== the same end to end (callgrind): node-a's instructions per request with the document, against none before and after it"
echo "   (coarser: gossip work per second of the run lands in the per-request difference, and valgrind runs are not equally fast)"
# Every caller-side key: a timeout and a per-try timeout (two timers per
# request), retries with their budget, every circuit-breaker limit, and a
# fault that needs a header the requests do not carry. (rate_limit is
# enforced at node-b, not measured here.)
cat >"$WORK/resilience.toml" <<EOF
kind = "resilience"
name = "web"
timeout = "5s"
retries = { attempts = 2, per_try_timeout = "2s", on = ["connect-failure", "5xx"], budget = 0.2 }
circuit_breaker = { max_requests = 10000, max_pending = 10000, max_connections = 1000, max_retries = 100 }
fault = { abort = { status = 503, percent = 50 }, delay = { duration = "1s", percent = 50 }, header = "x-chaos" }
EOF
with_node_a() { # $@: a command to run while node-a runs normally
  MESHNODE_LOG=error "$MESHNODE" run --config "$WORK/node-a/config.toml" & local pid=$!
  wait_http http://127.0.0.1:38080/
  "$@"
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
}
resilience_version() {
  curl -fsS "http://127.0.0.71:9471/v1/explain?service=web" 2>/dev/null |
    python3 -c 'import json, sys; print((json.load(sys.stdin).get("resilience") or {}).get("version", 0))' 2>/dev/null
}
policy() { # $@: apply FILE | delete KIND NAME
  "$MESHNODE" policy "$@" --operator-cert "$WORK/op/operator.pem" --operator-key "$WORK/op/operator.key" --admin 127.0.0.71:9471 >/dev/null
}
until_version() { # $1: the version node-a's data path must apply
  for _ in $(seq 1 100); do [ "$(resilience_version)" = "$1" ] && return 0; sleep 0.1; done
  echo "node-a never applied resilience version $1" >&2; exit 1
}
with_node_a eval 'policy apply "$WORK/resilience.toml" && until_version 1'
WITH=$(request_instr resilience)
with_node_a eval 'policy delete resilience web && until_version 0'
AFTER=$(request_instr after)
echo "a proxied request: $REQUEST instructions without a document, $WITH with it, $AFTER without it again"
awk -v a="$REQUEST" -v b="$AFTER" -v w="$WITH" 'BEGIN {
  base = (a + b) / 2
  printf "end to end, a resilience document adds %.1f%% per request; the two runs without one differ by %.1f%%\n", (w - base) * 100 / base, (a > b ? a - b : b - a) * 100 / base
}'
