#!/bin/bash
# BPO training of a 70B-class VLM (configs/bpo_70b.yaml: LLaVA-NeXT-72B) on 8 nodes x 8 GPUs: ZeRO-3, bf16, gradient
# checkpointing, flash-attention, the fused log-prob head, reference log-probs from the cache ref_logprobs.sh wrote.
#
#   mkdir -p logs && sbatch slurm/bpo_70b.sh                        (from the repo root; or slurm/pipeline.sh)
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj MODEL_PATH=/models/llava-next-72b-hf sbatch --nodes=8 slurm/bpo_70b.sh
#   BPO_PROFILE=cpu-tiny sbatch --gpus-per-node=0 --nodes=2 --time=15 slurm/bpo_70b.sh      (CPU, tiny model)
#
# Memory per GPU: the "# plan says:" line of configs/bpo_70b.yaml (python -m bpo.plan --config configs/bpo_70b.yaml ...).
# Requeued on preemption, and by itself 5 minutes before the time limit (USR1) once training has checkpointed the step
# it was at; it always passes train.resume=true, so a rerun continues from the newest complete checkpoint (and starts
# fresh when there is none), on however many nodes it gets.
#SBATCH --job-name=bpo-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

# --- settings: environment variables of the same name win; the shared paths are in slurm/common.sh ---------------
# Partition, account, time, nodes: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, or sbatch --nodes=N ...
DEFAULT_CONFIG=configs/bpo_70b.yaml
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-2}         # preflight checks the disk holds this many + 1
USE_REF_CACHE=${USE_REF_CACHE:-1}               # 0: live reference model (a second ZeRO-3 copy, +2.1 GiB per GPU)
# -----------------------------------------------------------------------------------------------------------------
REPO=${BPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
bpo_train  # slurm/common.sh: preflight on every node, then bpo/train.py ... train.resume=true
