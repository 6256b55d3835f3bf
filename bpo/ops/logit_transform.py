"""What a model's forward does to lm_head's output before anyone takes a softmax of it.

Some families do not return ``h @ W.T`` as their logits: Gemma-2/3n/4 and PaliGemma cap them
(``cap * tanh(logits / cap)``, Gemma-4 with cap = 30), Cohere and Aya Vision multiply them by
``logit_scale``, Granite divides them by ``logits_scaling`` (HyperCLOVAX multiplies by a field of the same
name), MuseGlimmer/MuseSpark scale and then cap. The log-prob heads in ``bpo.ops.logprobs`` compute the logits
themselves, so they must apply the same transform or their log-probs are silently off (by up to 2.75 nats
on Gemma-4).

``LogitTransform`` is a pure description, (scale, softcap), applied to the fp32 logits u = h @ W.T as

    a = scale * u                                   # 1.0: no scaling
    v = softcap * tanh(a / softcap)                 # None: v = a
    z = v / T                                       # T: the sampling temperature, the heads' own argument

in this order, which is the order of every forward listed in ``_RULES`` (the muse classes are the only ones
with both). Its derivative, which the fused heads' backward passes need:

    dv/du = scale * (1 - tanh(a / softcap)**2)      # scale without a softcap
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """logits -> softcap * tanh(scale * logits / softcap) (softcap None: scale * logits)."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"logit scale must be > 0, got {self.scale}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"final logit softcap must be > 0 or None, got {self.softcap}")

    def __call__(self, logits):
        """The reference: a new tensor, never in place, in the same steps as the transformers forwards."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def from_config(cls, text_config, architecture):
        """The transform the forward of class ``architecture`` (e.g. "PaliGemmaForConditionalGeneration")
        applies, with the numbers read off its text config (``config.get_text_config()``; every forward in
        ``_RULES`` reads them there). A class not in ``_RULES`` applies none."""
        rule = _RULES.get(architecture)
        return cls() if rule is None else rule(text_config)

    @classmethod
    def from_model(cls, model):
        """The transform ``model``'s own forward applies to its lm_head output."""
        return cls.from_config(model.config.get_text_config(), type(model).__name__)


def _softcap(text):
    return LogitTransform(softcap=getattr(text, "final_logit_softcapping", None))


def _optional(value):
    return 1.0 if value is None else float(value)


def _times(field):
    return lambda text: LogitTransform(scale=_optional(getattr(text, field, None)))


def _divided_by(field):
    return lambda text: LogitTransform(scale=1.0 / _optional(getattr(text, field, None)))


def _times_then_softcap(field):
    return lambda text: LogitTransform(scale=_optional(getattr(text, field, None)),
                                       softcap=text.final_logit_softcapping)


# The forwards of transformers 5.25 that transform lm_head's output, by class name, from
# `grep -n "final_logit_softcapping\|logit_scale\|logits_scaling\|output_multiplier\|lm_head_multiplier"
#  transformers/models/*/modeling_*.py`; tests/ops/test_logit_transform.py reads the installed source again and
# fails when a *ForCausalLM / *ForConditionalGeneration transforms its logits and is missing here.
# Classes that are absent apply nothing, whatever their config says: Gemma3ForConditionalGeneration ignores its
# text config's final_logit_softcapping (Gemma3ForCausalLM applies it), LLaVA-NeXT on a Granite text model ignores
# logits_scaling. bpo follows the forward, as the stock log-probs of a user of that class would.
_RULES = {
    **dict.fromkeys(
        ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
         "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
         "Gemma4UnifiedForConditionalGeneration", "PaliGemmaForConditionalGeneration", "VaultGemmaForCausalLM",
         "NanoChatForCausalLM", "BeamForCausalLM", "MistralLarge4ForConditionalGeneration", "Inkling2ForCausalLM",
         "Inkling2ForConditionalGeneration", "Inkling2LoopForCausalLM", "Inkling2LoopForConditionalGeneration"],
        _softcap),
    **dict.fromkeys(
        ["CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM",
         "CohereCompassForConditionalGeneration", "AyaVisionForConditionalGeneration"],
        _times("logit_scale")),
    **dict.fromkeys(
        ["GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
         "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM", "Granite4VisionForConditionalGeneration",
         "GraniteDoclingForConditionalGeneration",
         # MiniCPM3 divides the hidden states instead: the same map up to the rounding of one product
         "MiniCPM3ForCausalLM"],
        _divided_by("logits_scaling")),
    **dict.fromkeys(["HyperCLOVAXForCausalLM", "HyperCLOVAXVisionV2ForConditionalGeneration"],
                    _times("logits_scaling")),  # MuP: the same field name as Granite's, the other direction
    "FalconH1ForCausalLM": _times("lm_head_multiplier"),
    "RecurrentGemmaForCausalLM": lambda text: LogitTransform(softcap=text.logits_soft_cap),
    **dict.fromkeys(["MuseGlimmerForConditionalGeneration", "MuseSparkForConditionalGeneration"],
                    _times_then_softcap("output_multiplier")),
}
