# Helpers shared by the example launchers; sourced by them, never run on its own.
#
# Sourcing it sets REPO (this checkout) and PYTHON (default python3). Every helper either
# finishes its job or exits the launcher with a message naming the variable or path at fault.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# Run megarl from this checkout even when it is not pip-installed; exported so that commands
# srun starts on other nodes (which source this file again) find the same python and code.
export PYTHON REPO
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

is_dry_run() {
    [[ "${DRY_RUN:-0}" == "1" ]]
}

# need VAR...: fail unless every named environment variable is set (not needed in DRY_RUN).
need() {
    local name
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || die "set ${name} (see examples/README.md)"
    done
}

# config_values CONFIG KEY... -- OVERRIDE...: print the values of the dotted KEYs of the
# checked config (YAML plus overrides) on one line, so the launcher and the trainer cannot
# disagree about the layout or the servers. Call it as `values=$(config_values ...)`: under
# `set -e` a config error then stops the launcher with its status 2.
config_values() {
    local config=$1
    shift
    "$PYTHON" - "$config" "$@" <<'PY'
import sys
from megarl.config import ConfigError, load_config

args = sys.argv[2:]
split = args.index("--")
keys, overrides = args[:split], args[split + 1:]
try:
    cfg = load_config(sys.argv[1], overrides)
except ConfigError as exc:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(2)
values = []
for key in keys:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    values.append(str(value))
print(" ".join(values))
PY
}

# dry_run CONFIG WORLD_SIZE HF_DIR MODEL_NAME OVERRIDE...: validate the config and print the
# layout and per-GPU memory for WORLD_SIZE trainer ranks; the built-in shape MODEL_NAME stands
# in for a checkpoint HF_DIR that is not there yet. Converts and launches nothing.
dry_run() {
    local config=$1 world_size=$2 hf_dir=$3 model=$4
    shift 4
    local shape=()
    [[ -f "${hf_dir}/config.json" ]] || shape=(--model "$model")
    echo "DRY_RUN=1: checking ${config} for ${world_size} trainer ranks" \
        "(nothing is converted or launched)"
    "$PYTHON" -m megarl.cli plan --config "$config" --world-size "$world_size" \
        --gpu-memory-gb "${GPU_MEMORY_GB:-80}" "${shape[@]}" "$@"
}

# convert_once HF_DIR MEGATRON_DIR TP PP: write the Megatron checkpoint unless it exists (the
# converter publishes its output directory only when complete). CONVERT_PROCS > 1 shares the
# layers among that many processes.
convert_once() {
    local hf_dir=$1 megatron_dir=$2 tp=$3 pp=$4
    if [[ -d "$megatron_dir" ]]; then
        echo "conversion: ${megatron_dir} exists, skipped"
        return
    fi
    [[ -f "${hf_dir}/config.json" ]] || die "HF_DIR=${hf_dir} has no config.json"
    local launcher=("$PYTHON")
    if (( ${CONVERT_PROCS:-1} > 1 )); then
        launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$CONVERT_PROCS")
    fi
    "${launcher[@]}" "${REPO}/tools/convert_hf_to_megatron.py" --hf-dir "$hf_dir" \
        --output-dir "$megatron_dir" --tp "$tp" --pp "$pp"
}

# wait_for_dir DIR SECONDS: block until another node's conversion has published DIR.
wait_for_dir() {
    local dir=$1 deadline=$((SECONDS + $2))
    until [[ -d "$dir" ]]; do
        (( SECONDS < deadline )) || die "${dir} did not appear within $2 s (is node 0 converting?)"
        sleep 10
    done
}

# server_urls PORT COUNT HOST...: the URLs of COUNT servers per host (ports PORT onwards), one
# per line.
server_urls() {
    local port=$1 count=$2 host i
    shift 2
    for host in "$@"; do
        for ((i = 0; i < count; i++)); do
            echo "http://${host}:$((port + i))"
        done
    done
}

# as_list ITEM...: [ITEM,ITEM,...], a list value for a section.key=value override.
as_list() {
    local IFS=,
    echo "[$*]"
}

# start_sglang_servers MODEL COUNT SERVER_TP PORT MEM_FRACTION LOG_DIR [FLAG...]: start COUNT
# SGLang servers on this node (server i on GPUs i*SERVER_TP onwards, port PORT+i, listening on
# every interface) and wait for them; they stop with this shell.
start_sglang_servers() {
    local model=$1 count=$2 tp=$3 port=$4 fraction=$5 logs=$6 i
    shift 6
    mkdir -p "$logs"
    SERVER_PIDS=()  # global: the EXIT trap runs after this function's locals are gone
    trap 'kill "${SERVER_PIDS[@]}" 2>/dev/null || true' EXIT
    for ((i = 0; i < count; i++)); do
        "$PYTHON" -m sglang.launch_server --model-path "$model" --host 0.0.0.0 \
            --port $((port + i)) --tp-size "$tp" --base-gpu-id $((i * tp)) \
            --mem-fraction-static "$fraction" "$@" \
            >"${logs}/$(hostname)_server_${i}.log" 2>&1 &
        SERVER_PIDS+=($!)
    done
    echo "$(hostname): ${count} SGLang server(s) on ports ${port}-$((port + count - 1))," \
        "logs in ${logs}"
    wait "${SERVER_PIDS[@]}"
}
