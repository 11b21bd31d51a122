#!/usr/bin/env bash
# The cluster-deployment measurements behind the README (issue 7), on this one machine:
# 1. bench/autoscale.py: the default cloud model (Qwen2.5-Coder-1.5B) scaled by Serve from 1 to 2
#    replicas under all-llm load and back, 3 rounds -> bench/results/autoscale.json and .png.
#    The local cluster is started with bench/autoscale.yaml (target_ongoing_requests 1) and stopped.
# 2. bench/cluster.py: on the multi-host run (scripts/netns-cluster.sh: a head, a cloud worker and
#    two edge hosts in network namespaces), the time for an edge box to join and take work, and the
#    time to re-route after an edge's link goes down -> bench/results/cluster.json. Needs root.
set -uo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
PY=${PY:-.venv/bin/python}
export COLUMNS=${COLUMNS:-140} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
status=0
$HERA up --config bench/autoscale.yaml || exit 1
$PY bench/autoscale.py --rounds ${SCALE_ROUNDS:-3} || status=1
$HERA down
bash scripts/netns-cluster.sh up || exit 1
$PY bench/cluster.py --rounds ${CLUSTER_ROUNDS:-5} || status=1
bash scripts/netns-cluster.sh down
exit $status
