#!/bin/bash
# Evaluation (bpo/evaluate.py) of the exported model EXPORT_DIR on TEST_FILE: EVAL_DIR/report.json and report.md.
# ENGINE=vllm (or decode.engine: vllm in CONFIG) serves EXPORT_DIR with `vllm serve --tensor-parallel-size 8` on the
# node for the generations (slurm/common.sh); the judge and any reward margins still run in the client.
#
#   mkdir -p logs && CONFIG=configs/bpo_70b.yaml sbatch slurm/eval.sh           (from the repo root; or pipeline.sh)
#   BPO_PROFILE=cpu-tiny sbatch --gpus-per-node=0 --time=15 slurm/eval.sh                      (CPU, tiny model)
#SBATCH --job-name=bpo-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
# Partition, account, time, nodes: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, or sbatch --nodes=N ...
DEFAULT_CONFIG=configs/bpo_7b.yaml
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_job_start
bpo_preflight --readable "$EXPORT_DIR/config.json" "$TEST_FILE" "$IMAGE_ROOT" --writable "$EVAL_DIR"
bpo_generate "$EXPORT_DIR" bpo/evaluate.py --config "$CONFIG" "${BPO_OVERRIDES[@]}" \
    eval.model_path="$EXPORT_DIR" eval.test_file="$TEST_FILE" eval.output_dir="$EVAL_DIR"
