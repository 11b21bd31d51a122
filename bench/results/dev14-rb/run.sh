#!/usr/bin/env bash
# Issue 14: hera-verify with reject_below 0.8 (bench/results/dev14-rb/hera.yaml) on GSM8K dev,
# from the worktree pinned to 3a8ab3d (the same code and bundled estimators as dev14), with dev14's
# generation cache: the policies the tuning does not touch replay the same steps.
cd /work/dev-wt
export PYTHONPATH=/work/dev-wt OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0 COLUMNS=160
HERA=/work/main/.venv/bin/hera
$HERA down >/dev/null 2>&1
$HERA up --local-edges 1 --config /work/main/bench/results/dev14-rb/hera.yaml \
  --generation-cache $HOME/.cache/hera-ray/gencache-dev14.sqlite || exit 1
$HERA bench --dataset gsm8k --split dev --n 60 --out /work/main/bench/results/dev14-rb \
  --policies hera-verify,all-slm,all-llm \
  --verify-sweep "" --hera-sweep "" --hybrid-sweep "" --random-sweep "" --no-ablations
