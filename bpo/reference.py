"""Reference log-probs for the loss: from a live frozen ZeRO-3 copy of the model, or (bpo.ref_cache) a cache."""

import torch

from bpo.loss import sequence_logps


class LiveReference:
    """Scores every row of a batch with a frozen DeepSpeed inference engine holding the reference model."""

    def __init__(self, engine, reduction):
        self.engine = engine
        self.reduction = reduction

    @torch.no_grad()
    def __call__(self, batch, inputs):
        token_logps = self.engine(**inputs)  # (R, T-1)
        return sequence_logps(token_logps, inputs["labels"][:, 1:] != -100, self.reduction)  # (R,)
