#!/bin/bash
# Export (bpo/export/job.py): the latest ZeRO-3 checkpoint of RUN_DIR -> a Hugging Face model directory of safetensors
# shards in EXPORT_DIR, streaming (one shard in memory at a time), on one node's CPUs; no GPU needed.
#
#   mkdir -p logs && CONFIG=configs/bpo_70b.yaml sbatch slurm/export.sh         (from the repo root; or pipeline.sh)
#   BPO_PROFILE=cpu-tiny sbatch --time=15 slurm/export.sh                                      (CPU, tiny model)
#SBATCH --job-name=bpo-export
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
# Partition, account, time: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT
DEFAULT_CONFIG=configs/bpo_7b.yaml
EXPORT_DTYPE=${EXPORT_DTYPE:-bf16}
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_job_start
bpo_preflight --readable "$RUN_DIR/checkpoints/latest" --writable "$(dirname "$EXPORT_DIR")" \
    --export-model "$MODEL_PATH" --export-dtype "$EXPORT_DTYPE"
# --force: a rerun after a requeue replaces a directory an earlier, finished export left; export writes to a
# temporary directory and renames it at the end, so an interrupted one leaves nothing half-written behind.
bpo_step "$PY" -m bpo.export "$RUN_DIR/checkpoints" "$EXPORT_DIR" --dtype "$EXPORT_DTYPE" --force
