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
