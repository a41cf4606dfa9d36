#!/usr/bin/env bash
# Stage 1: teach the <start_working_out>...<SOLUTION> format with SFT on OpenMathReasoning-mini.
# Data preparation and training in one command. Output: $OUTPUT_ROOT/sft_qwen_reasoning_model
[ -f scripts/_common.sh ] || { echo "Error: run this script from the grpo_tutorial/ directory, e.g.: cd grpo_tutorial && bash scripts/$(basename "$0")" >&2; exit 2; }
source scripts/_common.sh

# shellcheck disable=SC2086
os-train sft \
    --model "$MODEL" \
    --dataset "$SFT_DATASET" $SFT_SPLIT_ARGS \
    --format openmath-reasoning \
    --chat-template reasoning \
    --num-samples "$SFT_SAMPLES" \
    --max-steps "$MAX_STEPS" \
    --devices "$DEVICES" \
    --output-dir "$SFT_OUTPUT" \
    $EXTRA_ARGS $SFT_EXTRA_ARGS

echo "SFT adapter saved to $SFT_OUTPUT. Next: bash scripts/02_grpo_end_to_end.sh"
