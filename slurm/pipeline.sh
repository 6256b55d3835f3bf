#!/bin/bash
# The whole chain, submitted at once: blind_gen -> ref_logprobs -> bpo_$SIZE -> export -> eval, each job starting
# only when the one before it succeeded (--dependency=afterok). Run it on a login node, not with sbatch:
#
#   bash slurm/pipeline.sh                                          (from the repo root; SIZE=70b by default)
#   SIZE=7b SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj MODEL_PATH=/models/llava-1.5-7b-hf bash slurm/pipeline.sh
#   BPO_PROFILE=cpu-tiny NODES=2 bash slurm/pipeline.sh             (CPU ranks, tiny model + sample data built here)
#
# Prints one `stage=JOBID` line per job and keeps them in RUN_ROOT/pipeline.jobs. A failed job leaves the rest
# pending with reason DependencyNeverSatisfied: fix it, resubmit that stage by hand with
# `sbatch --dependency=... slurm/<stage>.sh` and the finished shards/checkpoints are reused.

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
SIZE=${SIZE:-70b}                               # which training template: slurm/bpo_$SIZE.sh, configs/bpo_$SIZE.yaml
NODES=${NODES:-}                                # training nodes (cpu-tiny: every job's but export's; default 2)
LOG_DIR=${LOG_DIR:-logs}                        # each job's log: LOG_DIR/<job name>-<job id>.out
SKIP_EVAL=${SKIP_EVAL:-0}                       # 1: stop after export (always so for decode.zero3 on the hf engine)
ENGINE=${ENGINE:-}                              # hf | vllm for blind_gen and eval; empty = the config's decode.engine
# -----------------------------------------------------------------------------------------------------------------
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_CONFIG=configs/bpo_$SIZE.yaml
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

ENGINE=${ENGINE:-$(bpo_config_value decode.engine)}
export ENGINE  # blind_gen.sh and eval.sh read it (slurm/common.sh, bpo_generate)
if [ "$SKIP_EVAL" != 1 ] && [ "$ENGINE" = hf ] && [ "$(bpo_config_value decode.zero3)" = True ]; then
    echo "eval not submitted: $CONFIG generates with decode.zero3 (the model does not fit one GPU), and" \
         "bpo/evaluate.py keeps one replica per rank; ENGINE=vllm evaluates it on a tensor-parallel vLLM server"
    SKIP_EVAL=1
fi
mkdir -p "$LOG_DIR" "$RUN_ROOT"
common=(--parsable --output="$LOG_DIR/%x-%j.out")
train_nodes=() other_nodes=() export_cpus=()
[ -n "$NODES" ] && train_nodes=(--nodes="$NODES")
if [ "$BPO_PROFILE" = cpu-tiny ]; then
    # The same templates, made small: no GPUs asked for, short limits, the tiny model and sample data built here.
    common+=(--gpus-per-node=0 --time=00:15:00)
    train_nodes=(--nodes="${NODES:-2}") other_nodes=(--nodes="${NODES:-2}") export_cpus=(--cpus-per-task=1)
    [ -f "$MODEL_PATH/config.json" ] || "$PY" -m bpo.demo.tiny "$MODEL_PATH"
    [ -f "$TRAIN_FILE" ] || "$PY" -m bpo.demo.sample_data "$DATA_DIR"
fi

submit() {  # submit STAGE SCRIPT [sbatch options...]: chains on the previous job, prints and records STAGE=JOBID
    local stage=$1 script=$2
    shift 2
    local dep=()
    [ -n "${prev:-}" ] && dep=(--dependency=afterok:"$prev")
    local out
    out=$(sbatch "${common[@]}" "${dep[@]}" "$@" "$script")
    prev=${out%%;*}  # --parsable prints JOBID or JOBID;CLUSTER
    echo "$stage=$prev" | tee -a "$RUN_ROOT/pipeline.jobs"
}

: > "$RUN_ROOT/pipeline.jobs"
prev=
submit blind slurm/blind_gen.sh "${other_nodes[@]}"
submit ref slurm/ref_logprobs.sh "${other_nodes[@]}"
submit train "slurm/bpo_$SIZE.sh" "${train_nodes[@]}"
submit export slurm/export.sh "${export_cpus[@]}"
if [ "$SKIP_EVAL" = 1 ]; then
    echo "eval not submitted (SKIP_EVAL=1)"
else
    submit eval slurm/eval.sh "${other_nodes[@]}"
fi
echo "logs in $LOG_DIR/, outputs under $RUN_ROOT/; watch with: squeue -u ${USER:-$(id -un)}"
