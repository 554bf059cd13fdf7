#!/usr/bin/env bash
# Gossip side by side: N meshnode nodes vs N serf agents (LAN profile) on loopback.
#   sudo bash bench/gossip.sh [SIZES]        (default 10,30,60; root for the nftables byte counters)
# Needs: serf (apt install serf), nftables. Prints a table with meshnode/serf ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-10,30,60}
command -v serf >/dev/null || { echo "gossip.sh: serf missing (apt-get install -y serf)" >&2; exit 1; }
cargo build --release -q -p meshnode-cli -p meshnode-bench
exec target/release/meshnode-gossip-bench --meshnode target/release/meshnode --serf "$(command -v serf)" --sizes "$SIZES"
