#!/bin/bash
# Blind responses (bpo/generate_blind.py): the reference model answers each training prompt with its image withheld.
# TRAIN_FILE -> BLIND_FILE. Resumable: finished shards are kept, so a requeue or resubmission redoes only the rest.
# ENGINE=vllm (or decode.engine: vllm in CONFIG, as configs/bpo_70b.yaml has) starts `vllm serve MODEL_PATH
# --tensor-parallel-size 8` on the node and sends it the prompts from one client process (slurm/common.sh).
#
#   mkdir -p logs && CONFIG=configs/bpo_70b.yaml sbatch slurm/blind_gen.sh      (from the repo root; or pipeline.sh)
#   BPO_PROFILE=cpu-tiny sbatch --gpus-per-node=0 --time=15 slurm/blind_gen.sh                 (CPU, tiny model)
#SBATCH --job-name=bpo-blind
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
# Partition, account, time, nodes: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, or sbatch --nodes=N ...
DEFAULT_CONFIG=configs/bpo_7b.yaml              # its model and decode settings; a 70B model sets decode.zero3
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_job_start
bpo_preflight --readable "$MODEL_PATH" "$TRAIN_FILE" "$IMAGE_ROOT" --writable "$(dirname "$BLIND_FILE")"
bpo_generate "$MODEL_PATH" bpo/generate_blind.py --config "$CONFIG" "${BPO_OVERRIDES[@]}" \
    blind.input_file="$TRAIN_FILE" blind.output_file="$BLIND_FILE"
