#!/usr/bin/env bash
# Gossip side by side: N meshnode nodes vs N serf agents (LAN profile) on loopback.
#   sudo bash bench/gossip.sh [SIZES]        (default 10,30,60; root for the nftables byte counters)
# Needs serf and nftables; installs them (Debian packages) when missing. Prints a table
# with meshnode/serf ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-10,30,60}
need=()
command -v serf >/dev/null 2>&1 || need+=(serf)
command -v nft >/dev/null 2>&1 || need+=(nftables)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release -q -p meshnode-cli -p meshnode-bench
exec target/release/meshnode-gossip-bench --meshnode target/release/meshnode --serf "$(command -v serf)" --sizes "$SIZES"
