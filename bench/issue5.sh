#!/usr/bin/env bash
# The evaluation of issue 5 (the README's "earlier" note; issue 15's test-split run replaced it),
# on the default local cluster of then: SmolLM2-135M on 2 local edge nodes, Qwen2.5-Coder-1.5B as
# the cloud LLM, the estimators bundled then. Its results are in bench/results/issue5/; every
# command resumes from bench/results/issue5/runs/, so re-running this script finishes a stopped run.
# On this 2-vCPU machine: GSM8K ~6.5 min per request for all 17 policies, ARC-Easy ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
HERA=${HERA:-.venv/bin/hera}
export COLUMNS=${COLUMNS:-140} OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
curl -sf http://127.0.0.1:8000/healthz >/dev/null || $HERA up --local-edges 2
# GSM8K: the data set the bundled estimators were trained on. Full policy set, sweeps, ablations.
$HERA bench --dataset gsm8k --split test --n ${GSM8K_N:-10} --policies hera,hera-spec,hybridllm,random,all-slm,all-llm --out bench/results/issue5
# ARC-Easy: a wide gap between the two models; the estimators are GSM8K-trained (out of domain).
$HERA bench --dataset arc_easy --split test --n ${ARC_N:-30} --policies hera,hera-spec,hybridllm,random,all-slm,all-llm --hera-sweep 0.8,0.9 --hybrid-sweep "" --random-sweep "" --out bench/results/issue5
# Calibration on the dev split (never test), written to a config file `hera up --config` reads.
$HERA calibrate --dataset gsm8k --split dev --n ${CAL_N:-6} --target-cost 0.5 --sweep 0.4,0.5,0.6,0.8,0.9 \
  --config bench/results/issue5/calibrated.yaml --out bench/results/issue5
# HumanEval: pass@1 in the sandbox; few requests (code steps are long on CPU).
$HERA bench --dataset humaneval --split test --n ${HUMANEVAL_N:-5} --policies hera,hera-spec,all-slm,all-llm --hera-sweep "" --no-ablations --out bench/results/issue5
