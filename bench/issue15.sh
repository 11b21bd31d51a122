#!/usr/bin/env bash
# Issue 15, the test-split evaluation, end to end on this machine. Every step resumes where it
# stopped (hera bench keeps each finished request in $OUT/runs/*.jsonl), so run it again after an
# interruption, or run one data set: SETS=mbpp bench/issue15.sh.
#
# The cluster serves the bundled pair and the bundled estimators with hera's defaults (hera-verify
# at its calibrated keep 0.95, check_batch 3), with a generation cache (GEN_CACHE; GEN_CACHE= turns
# it off): at temperature 0 the same model on the same prompt writes the same step, so policies
# and sweep points that reach the same step decode it once. The JSON records the cache file and
# each policy's hit rate; bench/cache_spot_check.py replays requests without it and compares.
#
# Every policy runs on the same requests, request-major (each request through every policy before
# the next), so a run stopped at any point has paired records for every policy.
#   humaneval: the whole test split;   mbpp: the whole test split;
#   arc_challenge: the first 100;      gsm8k: the first 150.
# Then the cache spot check and the decision overhead, without the cache (below).
set -uo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
OUT=${OUT:-bench/results/test15}
SETS=${SETS:-humaneval mbpp arc_challenge gsm8k}
GEN_CACHE=${GEN_CACHE-$HOME/.cache/hera-ray/gencache-test15.sqlite}
POLICIES=${POLICIES:-hera-verify,hera,hybridllm,routellm,cascade,random,all-slm,all-llm}
export COLUMNS=${COLUMNS:-160} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
declare -A N=([humaneval]=0 [mbpp]=0 [arc_challenge]=100 [gsm8k]=150)   # 0: the whole split
$HERA down >/dev/null 2>&1
$HERA up --local-edges 1 ${GEN_CACHE:+--generation-cache "$GEN_CACHE"} || exit 1
status=0
for ds in $SETS; do
  $HERA bench --dataset "$ds" --split test --n "${N[$ds]:-0}" --out "$OUT" --policies "$POLICIES" || status=1
done
# Then, on a cluster without the generation cache (POST= skips this; a result already written is kept):
#   the cache spot check: cached and uncached runs of the same requests agree;
#   the decision overhead at hera's defaults, the issue's <= 5% figure (the cache would distort it).
PY=${PY:-.venv/bin/python}
POST=${POST-1}
if [ -n "$POST" ] && [ $status = 0 ]; then
  if [ ! -f "$OUT/cache_spot_check.json" ] || [ ! -f "$OUT/overhead.json" ]; then
    $HERA down >/dev/null 2>&1
    $HERA up --local-edges 1 || exit 1
  fi
  [ -f "$OUT/cache_spot_check.json" ] || $PY bench/cache_spot_check.py --records "$OUT/runs/humaneval-test.jsonl" \
    --policies hera-verify,all-llm --n 5 --out "$OUT/cache_spot_check.json" || status=1
  [ -f "$OUT/overhead.json" ] || $PY bench/hera_overhead.py --questions 4 --split test --policies hera-verify,hera \
    --out "$OUT/overhead.json" || status=1
fi
exit $status
