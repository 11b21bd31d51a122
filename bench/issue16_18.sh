#!/usr/bin/env bash
# The measurements of issues 16-18, one after another on this machine, each on the cluster it
# needs (never two heavy jobs at once). A step whose result is already written is skipped, so run
# it again after an interruption; delete a result to measure it again, or pick steps:
#   STEPS="dropin learn soak stress faults" bench/issue16_18.sh
#
#   dropin  issue 16: a LangChain agent in step mode under all-llm, all-slm and hera-verify
#           (bench/agent_dropin.py, 36 tasks; 1 local edge)          -> agent_dropin.json
#   learn   issue 17: hera learn on a replayed stream of the profile, SP_SLM, SP_LLM and the step
#           classifier, and a worse set refused (bench/learn_replay.py; no cluster)
#                                                                      -> learn_replay.json
#   soak    issue 18: 4 clients for 10 minutes, at or below capacity (bench/load.py --soak;
#           2 local edges, no generation cache)                       -> load_soak.json
#   stress  issue 18: 32 clients for 5 minutes, far over capacity: overload answered with 429s,
#           every request offered given an outcome (bench/load.py; 2 local edges, policy hera)
#                                                                      -> load.json
#   faults  issue 18: every fault 3 times, each round confirmed by its trace, but actor_kill's by
#           timing (its trace cannot show it; reported apart) (bench/faults.py;
#           2 local edges, no generation cache)                       -> faults.json
set -uo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
PY=${PY:-.venv/bin/python}
RES=bench/results
STEPS=${STEPS:-dropin learn soak stress faults}
export COLUMNS=${COLUMNS:-160} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
status=0
has() { [[ " $STEPS " == *" $1 "* ]]; }
# done when the JSON exists, holds the key this issue's version of the script writes, and is not a
# partial write (agent_dropin and faults write as they go, with "complete": false until the end)
written() { [ -f "$1" ] && $PY -c "import json,sys; d=json.load(open('$1')); sys.exit(0 if '$2' in d and d.get('complete', True) else 1)"; }
unset HERA_URL  # every step talks to the cluster this script starts
if [ -f "${HERA_CACHE_DIR:-$HOME/.cache/hera-ray}/cluster/state.json" ] && [ -z "${FORCE:-}" ]; then
  echo "a hera-ray cluster is up on this machine (another bench's?): this script stops it to start its own." >&2
  echo "Wait for it, or run \`hera down\` first (or FORCE=1 $0)." >&2
  exit 2
fi
edges=0  # local edges of the cluster this script started (0: none up)
up() { [ "$edges" = "$1" ] && return; $HERA down >/dev/null 2>&1; $HERA up --local-edges "$1" || exit 1; edges=$1; }

if has dropin && ! written $RES/agent_dropin.json targets; then
  up 1
  $PY bench/agent_dropin.py --policies all-llm,all-slm,hera-verify --n 36 || status=1
fi
if has learn && ! written $RES/learn_replay.json passes; then
  $HERA down >/dev/null 2>&1; edges=0  # the CPU for training
  $PY bench/learn_replay.py || status=1
fi
if has soak && ! written $RES/load_soak.json outcomes; then
  up 2
  $PY bench/load.py --soak || status=1
fi
if has stress && ! written $RES/load.json outcomes; then
  up 2
  $PY bench/load.py --concurrency 32 --duration 300 --policy hera || status=1
fi
if has faults && ! written $RES/faults.json failed_rounds; then
  up 2
  $PY bench/faults.py --rounds 3 || status=1
fi
$HERA down >/dev/null 2>&1
exit $status
