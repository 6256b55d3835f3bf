#!/bin/bash
# Reference log-probs (bpo/ref_logprobs.py): score every chosen/rejected/blind response of BLIND_FILE once with the
# frozen reference model (ZeRO-3 inference), into REF_CACHE; training then reads it via train.ref_cache.
# Resumable: finished shards are kept, so a requeue or resubmission redoes only the rest.
#
#   mkdir -p logs && CONFIG=configs/bpo_70b.yaml sbatch slurm/ref_logprobs.sh   (from the repo root; or pipeline.sh)
#   BPO_PROFILE=cpu-tiny sbatch --gpus-per-node=0 --time=15 slurm/ref_logprobs.sh              (CPU, tiny model)
#SBATCH --job-name=bpo-ref
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
DEFAULT_CONFIG=configs/bpo_7b.yaml              # must be the training run's config: the cache checks its fingerprint
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_job_start
bpo_preflight --readable "$MODEL_PATH" "$BLIND_FILE" "$IMAGE_ROOT" --writable "$REF_CACHE"
bpo_launch bpo/ref_logprobs.py --config "$CONFIG" "${BPO_OVERRIDES[@]}" \
    data.train_file="$BLIND_FILE" cache.output_dir="$REF_CACHE"
