#!/usr/bin/env bash
# Profile the bundled pair (Qwen2.5-Coder 0.5B edge, 1.5B cloud) on the profile splits of GSM8K,
# MBPP and ARC-Challenge, a round at a time so the three grow together. Resumable: each round
# skips the requests already in data/profiles/<set>/profile.jsonl. Needs `hera up --local-edges 1`.
#   scripts/profile_pair.sh [max per set, default 100] [step, default 20]
set -euo pipefail
MAX=${1:-100}
STEP=${2:-20}
HERA=${HERA:-hera}
for ((n = STEP; n <= MAX; n += STEP)); do
  for ds in gsm8k mbpp arc_challenge; do
    "$HERA" profile --dataset "$ds" --split profile --n "$n" --out "data/profiles/$ds"
  done
done
