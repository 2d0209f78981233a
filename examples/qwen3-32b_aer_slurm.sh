#!/usr/bin/env bash
#SBATCH --job-name=megarl-qwen3-32b-aer
#SBATCH --nodes=6
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
# Qwen3-32B, GRPO + AER under Slurm: the first ROLLOUT_NODES nodes of the allocation run SGLang
# servers (and the router on the first one), the rest run the trainer with srun (one task per
# GPU). Submit from a checkout on shared storage. See README.md.
#
#   HF_DIR=/shared/Qwen3-32B DATA=/shared/math.parquet OUT=/shared/runs/qwen3-aer \
#       sbatch examples/qwen3-32b_aer_slurm.sh [section.key=value ...]
#   DRY_RUN=1 bash examples/qwen3-32b_aer_slurm.sh   # check only, outside Slurm, no GPU
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "${HERE}/common.sh" ]]; then  # sbatch runs a copy of this file from its spool dir
    HERE="${SLURM_SUBMIT_DIR:-.}/examples"
    [[ -f "${HERE}/common.sh" ]] || { echo "submit from the megarl checkout's root" >&2; exit 2; }
fi
source "${HERE}/common.sh"  # REPO, PYTHON and the helpers
HF_DIR="${HF_DIR:-${REPO}/checkpoints/Qwen3-32B}"
MEGATRON_DIR="${MEGATRON_DIR:-${HF_DIR%/}_megatron}"
DATA="${DATA:-${REPO}/data/math.parquet}"
OUT="${OUT:-${REPO}/runs/qwen3-32b_aer}"
CONFIG="${CONFIG:-${HERE}/qwen3-32b_aer_slurm.yaml}"
ROLLOUT_NODES="${ROLLOUT_NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif is_dry_run; then  # stand-in host names for the plan
    mapfile -t nodes < <(for ((i = 0; i < ${NODES:-6}; i++)); do echo "node-${i}"; done)
else
    die "not inside a Slurm allocation: submit with sbatch (or set DRY_RUN=1)"
fi
rollout_hosts=("${nodes[@]:0:ROLLOUT_NODES}")
train_hosts=("${nodes[@]:ROLLOUT_NODES}")
(( ${#train_hosts[@]} >= 1 && ROLLOUT_NODES >= 1 )) ||
    die "${#nodes[@]} node(s): need ROLLOUT_NODES (${ROLLOUT_NODES}) >= 1 and a trainer node"

overrides=("model.hf_dir=${HF_DIR}" "model.megatron_dir=${MEGATRON_DIR}"
           "data.train_files=[${DATA}]" "logging.output_dir=${OUT}" "$@")
values="$(config_values "$CONFIG" parallel.tp parallel.pp rollout.server_tp \
    rollout.base_port rollout.router_port rollout.mem_fraction_static rollout.router_policy \
    -- "${overrides[@]}")"
read -r TP PP SERVER_TP PORT ROUTER_PORT FRACTION POLICY <<<"$values"
servers_per_node=$((GPUS_PER_NODE / SERVER_TP))
mapfile -t urls < <(server_urls "$PORT" "$servers_per_node" "${rollout_hosts[@]}")
router_url="http://${rollout_hosts[0]}:${ROUTER_PORT}"
overrides=("rollout.server_urls=$(as_list "${urls[@]}")" "rollout.router_url=${router_url}"
           "${overrides[@]}")
world_size=$(( ${#train_hosts[@]} * GPUS_PER_NODE ))

if is_dry_run; then
    dry_run "$CONFIG" "$world_size" "$HF_DIR" qwen3-32b "${overrides[@]}"
    exit
fi

convert_once "$HF_DIR" "$MEGATRON_DIR" "$TP" "$PP"
mkdir -p "${OUT}/logs"
steps=()
trap 'kill "${steps[@]}" 2>/dev/null || true' EXIT
for host in "${rollout_hosts[@]}"; do
    # shellcheck disable=SC2016  # $1 and $@ belong to the remote bash, not to this script
    srun --nodes=1 --ntasks=1 --nodelist="$host" --gpus-per-node="$GPUS_PER_NODE" \
        bash -c 'source "$1/common.sh"; shift; start_sglang_servers "$@"' _ "$HERE" \
        "$HF_DIR" "$servers_per_node" "$SERVER_TP" "$PORT" "$FRACTION" "${OUT}/logs/servers" &
    steps+=($!)
done
srun --nodes=1 --ntasks=1 --nodelist="${rollout_hosts[0]}" --overlap \
    "$PYTHON" -m sglang_router.launch_router --host 0.0.0.0 --port "$ROUTER_PORT" \
    --policy "$POLICY" --worker-urls "${urls[@]}" >"${OUT}/logs/router.log" 2>&1 &
steps+=($!)

# The trainer waits for the servers and the router itself (rollout.health_timeout_s).
export MASTER_ADDR="${train_hosts[0]}" MASTER_PORT
train_list="$(IFS=,; echo "${train_hosts[*]}")"
srun --nodes="${#train_hosts[@]}" --ntasks-per-node="$GPUS_PER_NODE" --nodelist="$train_list" \
    --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
    "$PYTHON" -m megarl.cli train --config "$CONFIG" "${overrides[@]}"
