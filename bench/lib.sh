# Shared setup of the bench scripts; sourced from the repository root, not run.

# Installs the Debian packages whose command is missing. Args: "command:package" ...
bench_need() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# Builds the release binaries, makes $WORK (removed on exit with every pid in
# $PIDS) and one mesh CA with certificates for node-a, node-b, tls-client and
# tls-server (stunnel uses the same ECDSA P-256 files). $1: work dir prefix.
bench_setup() {
  cargo build --release -q -p meshnode-cli -p meshnode-bench
  BIN=$PWD/target/release
  MESHNODE=$BIN/meshnode
  TOOL=$BIN/meshnode-bench
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
  "$MESHNODE" ca init --mesh bench --out "$WORK/ca" >/dev/null
  for n in node-a node-b tls-client tls-server; do
    "$MESHNODE" cert issue --ca "$WORK/ca" --cluster bench --node "$n" --out "$WORK/$n" >/dev/null
  done
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# An stunnel config (TLS 1.3, client certificates required); prints its path.
tls_conf() { # $1=name $2=client? $3..=sections "name accept connect"
  local dir=$WORK/$1 f=$WORK/$1.conf
  {
    echo "foreground = yes"
    echo "pid ="
    echo "debug = err"
    [ "$2" = yes ] && echo "client = yes"
    echo "cert = $dir/node.pem"
    echo "key = $dir/node.key"
    echo "CAfile = $dir/ca.pem"
    echo "verifyChain = yes"
    echo "sslVersionMin = TLSv1.3"
    shift 2
    for s in "$@"; do
      set -- $s
      echo "[$1]"; echo "accept = 127.0.0.1:$2"; echo "connect = 127.0.0.1:$3"
    done
  } >"$f"
  echo "$f"
}

# Resident memory of a process in MiB.
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# A meshnode pair on loopback: node-b hosts service "echo" (127.0.0.1:$3),
# node-a has an upstream to it on 127.0.0.1:$4. $1/$2: the last octet of
# node-a's and node-b's 127.0.0.x. Sets MESH_A, MESH_B.
bench_pair() { # $1=a-octet $2=b-octet $3=echo-port $4=upstream-port
  cat >"$WORK/node-b/config.toml" <<CFG
node = "node-b"
cluster = "bench"
mesh = "bench"
data_dir = "$WORK/node-b"
bind = "127.0.0.$2:9470"
admin = "127.0.0.$2:9471"
[[service]]
name = "echo"
address = "127.0.0.1"
port = $3
CFG
  cat >"$WORK/node-a/config.toml" <<CFG
node = "node-a"
cluster = "bench"
mesh = "bench"
data_dir = "$WORK/node-a"
bind = "127.0.0.$1:9470"
admin = "127.0.0.$1:9471"
seeds = ["127.0.0.$2:9470"]
[[upstream]]
service = "echo"
listen = "127.0.0.1:$4"
CFG
  MESHNODE_LOG=error "$MESHNODE" run --config "$WORK/node-b/config.toml" & MESH_B=$!; PIDS+=($MESH_B)
  MESHNODE_LOG=error "$MESHNODE" run --config "$WORK/node-a/config.toml" & MESH_A=$!; PIDS+=($MESH_A)
}
