#!/usr/bin/env bash
# Gossip side by side: N meshnode nodes vs N serf agents (LAN profile) on loopback.
#   sudo bash bench/gossip.sh [SIZES]        (default 10,30,60; root for the nftables byte counters)
# Needs serf and nftables; installs them (Debian packages) when missing. Prints a table
# with meshnode/serf ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-10,30,60}
source bench/lib.sh
bench_need serf:serf nft:nftables
cargo build --release -q -p meshnode-cli -p meshnode-bench
exec target/release/meshnode-gossip-bench --meshnode target/release/meshnode --serf "$(command -v serf)" --sizes "$SIZES"
