"""Reference log-probs for the loss: a live frozen ZeRO-3 copy of the model, the policy itself with its LoRA adapters
switched off, or (bpo.ref_cache.store) a cache."""

import torch

from bpo.model.lora import adapters_disabled
from bpo.ops.logprobs import response_mask, sequence_logps


class LiveReference:
    """Scores every row of a batch with a frozen DeepSpeed inference engine holding the reference model."""

    def __init__(self, engine, reduction):
        self.engine = engine
        self.reduction = reduction

    @torch.no_grad()
    def __call__(self, batch, inputs):
        token_logps = self.engine(**inputs)  # (R, T-1)
        return sequence_logps(token_logps, response_mask(inputs["labels"]), self.reduction)  # (R,)


class AdapterOffReference:
    """With LoRA the base weights never change, so the reference is the policy engine run with its adapters off.

    No gradient and eval mode (dropout off, as in a frozen copy), then back to training mode. Every rank makes this
    extra forward in the same order, so ZeRO-3's gathers stay in lockstep. It does cost ZeRO-3's prefetching: the
    engine records one trace of module order per forward and finds it changed at every other forward (the
    reference's, then the policy's with its backward), so it fetches each layer on demand; the cached reference
    (train.ref_cache) avoids both this forward and that."""

    def __init__(self, engine, reduction):
        self.engine = engine
        self.reduction = reduction

    @torch.no_grad()
    def __call__(self, batch, inputs):
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with adapters_disabled(module):
                token_logps = self.engine(**inputs)  # (R, T-1)
        finally:
            module.train(was_training)
        return sequence_logps(token_logps, response_mask(inputs["labels"]), self.reduction)  # (R,)
