#!/usr/bin/env bash
# Qwen2.5-Math-7B, Dr.GRPO + SIREN on one 8-GPU node: 4 trainer ranks (TP 2 x DP 2) under
# torchrun, 4 SGLang servers (TP 1) on GPUs 4-7 started by trainer rank 0. See README.md.
#
#   HF_DIR=/ckpt/Qwen2.5-Math-7B DATA=/data/openr1_math_46k.parquet \
#       bash examples/qwen2.5-math-7b_grpo_siren_1node.sh [section.key=value ...]
#   DRY_RUN=1 bash examples/qwen2.5-math-7b_grpo_siren_1node.sh   # check only, no GPU
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${HERE}/common.sh"  # REPO, PYTHON and the helpers
HF_DIR="${HF_DIR:-${REPO}/checkpoints/Qwen2.5-Math-7B}"
MEGATRON_DIR="${MEGATRON_DIR:-${HF_DIR%/}_megatron}"
DATA="${DATA:-${REPO}/data/openr1_math_46k.parquet}"
OUT="${OUT:-${REPO}/runs/qwen2.5-math-7b_grpo_siren}"
CONFIG="${CONFIG:-${HERE}/qwen2.5-math-7b_grpo_siren_1node.yaml}"
TRAIN_GPUS="${TRAIN_GPUS:-4}"

overrides=("model.hf_dir=${HF_DIR}" "model.megatron_dir=${MEGATRON_DIR}"
           "data.train_files=[${DATA}]" "logging.output_dir=${OUT}" "$@")
if is_dry_run; then
    dry_run "$CONFIG" "$TRAIN_GPUS" "$HF_DIR" qwen2.5-math-7b "${overrides[@]}"
    exit
fi

values="$(config_values "$CONFIG" parallel.tp parallel.pp -- "${overrides[@]}")"
read -r TP PP <<<"$values"
convert_once "$HF_DIR" "$MEGATRON_DIR" "$TP" "$PP"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$TRAIN_GPUS" \
    -m megarl.cli train --config "$CONFIG" "${overrides[@]}"
