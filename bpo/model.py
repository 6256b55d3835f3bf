"""Loading a vision-language model from a local directory and scoring responses with it.

`SequenceScorer` wraps the Hugging Face model so that one forward returns per-token log-probs of the labels, computed
from the final hidden states by the log-prob head in `bpo.ops`: the (R, T, V) logits tensor of the stock forward is
never built on the fused path.
"""

import json
import os

import torch
from torch import nn

from bpo import dist
from bpo.ops.logprobs import naive_sequence_logprobs, resolve_backend, sequence_logprobs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Parameter-name markers of the three parts across LLaVA-1.5/NeXT/OneVision and Qwen2-VL. The projector is matched
# first because Qwen2-VL keeps its merger inside `visual`.
PROJECTOR_MARKERS = ("multi_modal_projector", "visual.merger", "mm_projector")
VISION_MARKERS = ("vision_tower", "visual.", "vision_model")


def resolve_attn_implementation(requested):
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(model_cfg, path=None, ds_config=None):
    """Load an image-text-to-text model offline from a directory.

    With a ZeRO-3 `ds_config` the model is built partitioned: the `HfDeepSpeedConfig` object must be alive while
    `from_pretrained` runs, which makes transformers construct under `deepspeed.zero.Init` and load each weight
    straight into its shard instead of materialising the whole model on every rank.
    """
    from transformers import AutoModelForImageTextToText

    path = path or model_cfg.path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {path!r} has no config.json; set model.path to a local checkpoint")
    keep_alive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (its existence is the point)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES[model_cfg.dtype],
        attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
        local_files_only=True,
    )
    del keep_alive
    return model


def part_of(param_name):
    if any(m in param_name for m in PROJECTOR_MARKERS):
        return "projector"
    if any(m in param_name for m in VISION_MARKERS):
        return "vision_tower"
    return "language_model"


def set_trainable(model, model_cfg):
    """Freeze or train each part by config; returns {part: number of trainable parameters}."""
    wanted = {
        "vision_tower": model_cfg.train_vision_tower,
        "projector": model_cfg.train_projector,
        "language_model": model_cfg.train_language_model,
    }
    counts = {part: 0 for part in wanted}
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(wanted[part])
        if wanted[part]:
            counts[part] += getattr(p, "ds_numel", p.numel())
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return counts


class SequenceScorer(nn.Module):
    """forward(input_ids, attention_mask, labels, **image_inputs) -> per-token log-probs of the labels.

    Returns (R, T-1) float32 log-probs of labels[:, 1:], exactly 0 where the label is -100 (prompt, image tokens,
    padding). The base model (`model.model` in transformers 5 image-text-to-text classes) produces hidden states;
    the lm_head weight is applied by `bpo.ops.logprobs`.

    ZeRO-3: lm_head.weight is partitioned and has numel 0 outside lm_head's own forward, which we never call. We
    register it as an external parameter of this wrapper, so DeepSpeed gathers it for this module's forward and again
    for its backward, and reduces its gradient like any other. Gathering by hand with `GatheredParameters` would
    not do: the weight is saved for backward and would be re-partitioned to an empty tensor before backward runs.
    """

    def __init__(self, model, impl="fused", chunk_size=1024):
        super().__init__()
        self.model = model
        self.impl = impl
        self.chunk_size = chunk_size
        self.backend = None  # resolved on first forward, when the device is known
        head = model.get_output_embeddings().weight
        if hasattr(head, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head)

    def forward(self, input_ids, attention_mask, labels, **image_inputs):
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **image_inputs)
        hidden = out.last_hidden_state[:, :-1]  # (R, T-1, H): position t predicts token t+1
        targets = labels[:, 1:]  # (R, T-1)
        weight = self.model.get_output_embeddings().weight  # (V, H)
        if self.impl == "naive":
            return naive_sequence_logprobs(hidden, weight, targets)
        if self.backend is None:
            self.backend = resolve_backend(hidden.device)
        return sequence_logprobs(hidden, weight, targets, chunk_size=self.chunk_size, backend=self.backend)


def model_inputs(batch, device):
    """The tensors of a collated batch that the model takes, moved to `device`."""
    skip = {"kind", "example_index", "ids", "has_blind"}
    return {k: v.to(device) for k, v in batch.items() if k not in skip and isinstance(v, torch.Tensor)}


def describe(model, counts, attn):
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    dist.print0(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, attention={attn}, "
                f"trainable: " + json.dumps({k: f"{v / 1e6:.2f}M" for k, v in counts.items()}))
