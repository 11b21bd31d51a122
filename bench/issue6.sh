#!/usr/bin/env bash
# The reliability measurements behind the README (issue 6), on the default local cluster:
# SmolLM2-135M on 2 local edge nodes, Qwen2.5-Coder-1.5B as the cloud LLM, the bundled estimators.
# 1. bench/faults.py: kill/freeze edge nodes, kill the scheduler actor and the cloud replica, 3
#    rounds each, with requests in flight; recovery times -> bench/results/faults.json.
# 2. bench/load.py: 32 concurrent agent requests for 5 minutes under the hera policy ->
#    bench/results/load.json and load.png (target: 0 errors, 0 lost); then 32 one-step requests at
#    once, past the ingress's 8 admitted runs: 429s with Retry-After -> bench/results/overload.json.
# It starts the cluster and stops it afterwards. About 25 minutes on this 2-vCPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
PY=${PY:-.venv/bin/python}
export COLUMNS=${COLUMNS:-140} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
$HERA up --local-edges 2 || exit 1
status=0
$PY bench/faults.py --rounds ${FAULT_ROUNDS:-3} || status=1
$PY bench/load.py --concurrency ${LOAD_CONCURRENCY:-32} --duration ${LOAD_DURATION:-300} --policy ${LOAD_POLICY:-hera} || status=1
$PY bench/load.py --overload ${OVERLOAD:-32} || status=1
$HERA down
exit $status
