#!/usr/bin/env bash
# Issue 14, end to end on this machine: every step resumes where it stopped, so run it again after
# an interruption (or run one step: STEP=train bench/issue14.sh).
# 1. profile: the bundled pair on the profile splits of GSM8K, MBPP and ARC-Challenge, grown in
#    rounds (scripts/profile_pair.sh) into data/profiles/ (about 70 s a request here).
# 2. train: every estimator on all of data/profiles -> runs/E14 (manifest with held-out accuracy);
#    then bundled into the package's set (what `make demo` and `hera up` serve by default).
# 3. calibrate: bench/verify_calibration.py (profile split only) -> bench/results/verify_calibration.json.
# 4. dev: `hera bench` on the dev split, GSM8K and MBPP, the same requests for every policy
#    -> bench/results/dev14/{gsm8k,mbpp}.json (+ PNG); runs/ there resumes. The cluster runs with a
#    generation cache (GEN_CACHE; GEN_CACHE= turns it off), so policies and sweep points that reach
#    the same step decode it once; the JSON records the file and each policy's hit rate. Accuracy,
#    SLM share and cost are unchanged by it; latency is not the engines' then.
# 5. overhead: bench/hera_overhead.py for hera and hera-verify on a cluster without the cache
#    -> bench/results/hera_overhead.json.
set -uo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
PY=${PY:-.venv/bin/python}
STEP=${STEP:-all}
PROFILE_N=${PROFILE_N:-100}   # per data set: 3 x 100 = 300 requests
DEV_N=${DEV_N:-60}
GEN_CACHE=${GEN_CACHE-$HOME/.cache/hera-ray/gencache-dev14.sqlite}
export COLUMNS=${COLUMNS:-160} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
running() { $PY -c "from hera_ray import cluster; from hera_ray.demo import _reachable; s = cluster.load_state(); raise SystemExit(0 if s and _reachable(s.ingress_url) else 1)"; }
up() { running || $HERA up --local-edges 1; }
want() { [[ $STEP == all || $STEP == "$1" ]]; }
status=0
if want profile; then up && HERA=$HERA scripts/profile_pair.sh "$PROFILE_N" 20 || status=1; fi
if want train; then
  # --cv-folds 0: the manifest reports the held-out split; k-fold CV trains each classifier 5 more times (~30 min here)
  $HERA train --profile data/profiles --out runs/E14 --cv-folds "${CV_FOLDS:-0}" || exit 1
  bundled=$($PY -c "from hera_ray.estimators.trained import BUNDLED_ESTIMATORS as b; print(b)")
  $PY scripts/bundle_estimators.py runs/E14 "$bundled" data/profiles || exit 1
fi
if want calibrate; then $PY bench/verify_calibration.py || status=1; fi
if want dev; then
  # serve the new bundled set, with the generation cache; DEV_CONFIG: a settings file for the
  # cluster (a tuning run: its own DEV_OUT), e.g. bench/results/dev14b/hera.yaml
  $HERA down >/dev/null 2>&1
  $HERA up --local-edges 1 ${DEV_CONFIG:+--config "$DEV_CONFIG"} ${GEN_CACHE:+--generation-cache "$GEN_CACHE"} || exit 1
  $HERA bench --dataset gsm8k,mbpp --split dev --n "$DEV_N" --out "${DEV_OUT:-bench/results/dev14}" \
    --policies "${DEV_POLICIES:-hera-verify,hera,hybridllm,random,all-slm,all-llm}" \
    --verify-sweep "${VERIFY_SWEEP-0.8,0.9}" --hera-sweep "" --hybrid-sweep "" --random-sweep "" --no-ablations || status=1
fi
if want overhead; then  # timing: on a cluster without the generation cache
  $HERA down >/dev/null 2>&1; $HERA up --local-edges 1 && $PY bench/hera_overhead.py --questions 4 || status=1
fi
exit $status
