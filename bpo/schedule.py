"""Learning-rate schedules as pure functions of the step: linear warm-up, then cosine decay or constant."""

import math


def lr_multiplier(step, total_steps, warmup_steps, schedule="cosine", min_ratio=0.0):
    """Factor applied to the peak lr at optimizer step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, total_steps, optim_cfg):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, optim_cfg.warmup_steps, optim_cfg.schedule,
                                   optim_cfg.min_lr_ratio),
    )
