#!/usr/bin/env bash
# Qwen2.5-32B, DAPO + KL-Cov on 4 nodes of 8 GPUs under torchrun. Run the same command on
# every node with its NODE_RANK: nodes 0..TRAIN_NODES-1 train (torchrun, one rendezvous at
# MASTER_ADDR), the other nodes serve (SGLang) and are listed in ROLLOUT_ADDRS. See README.md.
#
#   NODE_RANK=0 MASTER_ADDR=node0 ROLLOUT_ADDRS="node2 node3" HF_DIR=/shared/Qwen2.5-32B \
#       DATA=/shared/dapo_math_17k.parquet OUT=/shared/runs/32b \
#       bash examples/qwen2.5-32b_dapo_klcov_4nodes.sh [section.key=value ...]
#   DRY_RUN=1 bash examples/qwen2.5-32b_dapo_klcov_4nodes.sh   # check only, no GPU
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${HERE}/common.sh"  # REPO, PYTHON and the helpers
HF_DIR="${HF_DIR:-${REPO}/checkpoints/Qwen2.5-32B}"
MEGATRON_DIR="${MEGATRON_DIR:-${HF_DIR%/}_megatron}"
DATA="${DATA:-${REPO}/data/dapo_math_17k.parquet}"
OUT="${OUT:-${REPO}/runs/qwen2.5-32b_dapo_klcov}"
CONFIG="${CONFIG:-${HERE}/qwen2.5-32b_dapo_klcov_4nodes.yaml}"
NNODES="${NNODES:-4}"
TRAIN_NODES="${TRAIN_NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONVERT_TIMEOUT_S="${CONVERT_TIMEOUT_S:-14400}"

rollout_nodes=$((NNODES - TRAIN_NODES))
(( TRAIN_NODES >= 1 && rollout_nodes >= 1 )) ||
    die "need 1 <= TRAIN_NODES < NNODES (got ${TRAIN_NODES} of ${NNODES})"
if is_dry_run && [[ -z "${ROLLOUT_ADDRS:-}" ]]; then
    ROLLOUT_ADDRS="$(for ((i = 0; i < rollout_nodes; i++)); do echo "rollout-node-${i}"; done)"
fi
need ROLLOUT_ADDRS
read -r -a rollout_addrs <<<"${ROLLOUT_ADDRS//$'\n'/ }"
(( ${#rollout_addrs[@]} == rollout_nodes )) ||
    die "ROLLOUT_ADDRS lists ${#rollout_addrs[@]} node(s); NNODES - TRAIN_NODES = ${rollout_nodes}"

overrides=("model.hf_dir=${HF_DIR}" "model.megatron_dir=${MEGATRON_DIR}"
           "data.train_files=[${DATA}]" "logging.output_dir=${OUT}" "$@")
values="$(config_values "$CONFIG" parallel.tp parallel.pp rollout.server_tp \
    rollout.base_port rollout.mem_fraction_static -- "${overrides[@]}")"
read -r TP PP SERVER_TP PORT FRACTION <<<"$values"
servers_per_node=$((GPUS_PER_NODE / SERVER_TP))
mapfile -t urls < <(server_urls "$PORT" "$servers_per_node" "${rollout_addrs[@]}")
overrides=("rollout.server_urls=$(as_list "${urls[@]}")" "${overrides[@]}")

if is_dry_run; then
    dry_run "$CONFIG" $((TRAIN_NODES * GPUS_PER_NODE)) "$HF_DIR" qwen2.5-32b "${overrides[@]}"
    exit
fi
need NODE_RANK MASTER_ADDR
if (( NODE_RANK >= TRAIN_NODES )); then  # a rollout node: serve until the job ends
    start_sglang_servers "$HF_DIR" "$servers_per_node" "$SERVER_TP" "$PORT" "$FRACTION" \
        "${OUT}/logs/servers"
    exit
fi
if (( NODE_RANK == 0 )); then
    convert_once "$HF_DIR" "$MEGATRON_DIR" "$TP" "$PP"
else
    wait_for_dir "$MEGATRON_DIR" "$CONVERT_TIMEOUT_S"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$TRAIN_NODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megarl.cli train --config "$CONFIG" "${overrides[@]}"
