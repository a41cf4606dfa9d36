# Shared pre-flight for the tutorial scripts: sourced, not run. Each script sets SCRIPTS_DIR (its own
# folder, found from "${BASH_SOURCE[0]}") first, so the scripts run from the repository root, from
# grpo_tutorial/ or from any other directory. Relative paths (OUTPUT_ROOT, a local MODEL or dataset)
# are relative to the directory you run the script from.
#
# Every setting is an environment variable with a default. EXTRA_ARGS goes to both training commands
# unchanged (options both stages take); SFT_EXTRA_ARGS only to `os-train sft`, GRPO_EXTRA_ARGS only to
# `os-train grpo`. PRINT_COMMANDS=1 prints the command a script would run instead of running it (the
# checks still run).
set -euo pipefail

TUTORIAL_DIR="$(cd "$SCRIPTS_DIR/.." && pwd)"
REPO_ROOT="$(cd "$TUTORIAL_DIR/.." && pwd)"
PREPARE_DIR="$REPO_ROOT/prepare_dataset"
PYTHON="${PYTHON:-python}"

if ! command -v os-train >/dev/null 2>&1; then
    echo "Error: os-train is not on PATH. Install OpenSloth first, from the repository root: pip install torch==2.13.0 -e \".[dev]\"" >&2
    exit 2
fi

MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
SFT_DATASET="${SFT_DATASET:-unsloth/OpenMathReasoning-mini}"
GRPO_DATASET="${GRPO_DATASET:-open-r1/DAPO-Math-17k-Processed}"
SFT_SAMPLES="${SFT_SAMPLES:-1000}"
GRPO_SAMPLES="${GRPO_SAMPLES:-2000}"
OUTPUT_ROOT="${OUTPUT_ROOT:-outputs}"
MAX_STEPS="${MAX_STEPS:--1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
SFT_EXTRA_ARGS="${SFT_EXTRA_ARGS:-}"
GRPO_EXTRA_ARGS="${GRPO_EXTRA_ARGS:-}"

# The hub datasets keep their rows in a named split / config; local files have one split, "train".
if [ "$SFT_DATASET" = "unsloth/OpenMathReasoning-mini" ]; then SFT_SPLIT_ARGS="--dataset-split cot"; else SFT_SPLIT_ARGS=""; fi
if [ "$GRPO_DATASET" = "open-r1/DAPO-Math-17k-Processed" ]; then GRPO_CONFIG_ARGS="--dataset-config en"; else GRPO_CONFIG_ARGS=""; fi

if [ "${GPU_COUNT:-}" = "0" ]; then
    GPUS_PRESENT=0  # the CPU was asked for: no need to ask torch
else
    GPUS_PRESENT="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
GPU_COUNT="${GPU_COUNT:-$GPUS_PRESENT}"
if ! [[ "$GPU_COUNT" =~ ^[0-9]+$ ]]; then
    echo "Error: GPU_COUNT must be a whole number, got '$GPU_COUNT'." >&2
    exit 2
fi
if [ "$GPU_COUNT" -gt "$GPUS_PRESENT" ]; then
    echo "Error: GPU_COUNT=$GPU_COUNT but this machine has $GPUS_PRESENT GPU(s). Set GPU_COUNT to at most $GPUS_PRESENT." >&2
    exit 2
fi
if [ "$GPU_COUNT" -eq 0 ]; then
    DEVICES="cpu"
    NUM_WORKERS=1
else
    DEVICES="$(seq -s, 0 $((GPU_COUNT - 1)))"
    NUM_WORKERS="$GPU_COUNT"
fi

SFT_OUTPUT="$OUTPUT_ROOT/sft_qwen_reasoning_model"
GRPO_OUTPUT="$OUTPUT_ROOT/grpo_final_model"
SFT_PREPARED="$OUTPUT_ROOT/data/sft_prepared"
GRPO_PREPARED="$OUTPUT_ROOT/data/grpo_prepared"

# The step-by-step scripts run the repository's prepare_dataset/ scripts.
need_prepare_script() {
    if [ ! -f "$PREPARE_DIR/$1" ]; then
        echo "Error: $PREPARE_DIR/$1 is missing. Keep grpo_tutorial/ inside the OpenSloth repository, beside prepare_dataset/." >&2
        exit 2
    fi
}

# Run the stage's command, or print it with PRINT_COMMANDS=1 (and stop there).
run() {
    if [ "${PRINT_COMMANDS:-0}" = "1" ]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    "$@"
}

case "$OUTPUT_ROOT" in
    /*) where="$OUTPUT_ROOT" ;;
    *) where="$OUTPUT_ROOT (in $PWD)" ;;
esac
echo "model=$MODEL devices=$DEVICES output_root=$where max_steps=$MAX_STEPS"
