#!/usr/bin/env bash
# Checks the alerting rules with promtool: syntax (`check rules`) and their
# unit tests (`test rules`). promtool comes from Debian's prometheus package,
# unpacked (not installed: no server is started) under /var/cache/meshnode-ci.
#   bash deploy/prometheus/check.sh        prints the path of promtool last
set -euo pipefail
cd "$(dirname "$0")"
promtool=$(bash ./promtool.sh)
"$promtool" check rules meshnode-alerts.yml
"$promtool" test rules meshnode-alerts.test.yml
