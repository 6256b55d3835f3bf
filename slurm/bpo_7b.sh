#!/bin/bash
# BPO training of LLaVA-1.5-7B on one node of 8 GPUs (configs/bpo_7b.yaml: the paper's loss and optimizer settings),
# ZeRO-3, bf16, gradient checkpointing, reference log-probs from the cache ref_logprobs.sh wrote.
#
#   mkdir -p logs && sbatch slurm/bpo_7b.sh                         (from the repo root; or SIZE=7b slurm/pipeline.sh)
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj MODEL_PATH=/models/llava-1.5-7b-hf sbatch slurm/bpo_7b.sh
#   BPO_PROFILE=cpu-tiny sbatch --gpus-per-node=0 --time=15 slurm/bpo_7b.sh                 (CPU, tiny model)
#
# Memory per GPU: the "# plan says:" line of configs/bpo_7b.yaml (python -m bpo.plan --config configs/bpo_7b.yaml ...).
# Requeued on preemption, and by itself 5 minutes before the time limit (USR1) once training has checkpointed the step
# it was at; it always passes train.resume=true.
#SBATCH --job-name=bpo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
# Partition, account, time, nodes: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, or sbatch --nodes=N ...
DEFAULT_CONFIG=configs/bpo_7b.yaml
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-2}         # preflight checks the disk holds this many + 1
USE_REF_CACHE=${USE_REF_CACHE:-1}               # 0: live reference model (a second ZeRO-3 copy, +1.6 GiB per GPU)
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_train  # slurm/common.sh: preflight on every node, then bpo/train.py ... train.resume=true
