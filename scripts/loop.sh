#!/usr/bin/env bash
# The whole MALT loop on one machine, offline, with the small model:
#   malt pull --file -> malt run -> malt export -> malt train -> malt eval --adapters
# Usage: scripts/loop.sh MODEL.gguf [WORK_DIR]   (`make loop` passes the small model)
set -euo pipefail
MODEL=${1:?usage: scripts/loop.sh MODEL.gguf [WORK_DIR]}
WORK=${2:-loop}
MALT=${MALT:-.venv/bin/malt}
rm -rf "$WORK"
mkdir -p "$WORK"
export MALT_HOME="$WORK/home" HF_HUB_OFFLINE=1
start=$(date +%s)
step() { echo "== $* ($(($(date +%s) - start)) s)" >&2; "$@"; }
step "$MALT" pull smollm2-135m --file "$MODEL"
# Sums easy enough that the 135M model gets some branches right and some wrong in every role.
step "$MALT" run --n 2 --max-tokens 32 --model smollm2-135m --db "$WORK/malt.db" \
    examples/sums.jsonl
step "$MALT" export --db "$WORK/malt.db" --out "$WORK/export"
step "$MALT" train "$WORK/export" --out "$WORK/adapters" --max-steps 3 --batch-size 2 \
    --max-length 512 --lr 2e-3 --dpo-lr 1e-4
step "$MALT" eval examples/sums.jsonl --model smollm2-135m --db "$WORK/malt.db" \
    --adapters "$WORK/adapters" --mode ma --votes 1 --samples 3 --seeds 1 --max-tokens 24
echo "whole loop: $(($(date +%s) - start)) s" >&2
