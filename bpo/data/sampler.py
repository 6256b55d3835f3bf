"""Deterministic, resumable assignment of examples to (optimizer step, micro-step, rank).

Each epoch is one permutation of the dataset drawn from (seed, epoch). Optimizer step s consumes the global batch
perm[s*G : (s+1)*G] with G = micro_batch_size * grad_accum * world_size, so the examples behind a step do not depend
on how they are split over ranks and micro-steps: 1 rank x 4 accumulation steps and 2 ranks x 2 see the same data.
A trailing partial global batch is dropped so every step averages the same number of examples.
"""

import torch


def epoch_permutation(num_examples, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def steps_per_epoch(num_examples, micro_batch_size, grad_accum, world_size):
    return num_examples // (micro_batch_size * grad_accum * world_size)


def micro_batches(num_examples, seed, epoch, step, micro_batch_size, grad_accum, world_size, rank):
    """Index lists of this rank's micro-batches for optimizer `step` (0-based within `epoch`)."""
    perm = epoch_permutation(num_examples, seed, epoch)
    global_batch = micro_batch_size * grad_accum * world_size
    start = step * global_batch
    if start + global_batch > num_examples:
        raise IndexError(f"step {step} is past the end of epoch {epoch}")
    out = []
    for micro in range(grad_accum):
        offset = start + (micro * world_size + rank) * micro_batch_size
        out.append(perm[offset:offset + micro_batch_size])
    return out
