"""`LogitTransform`: which forwards transform their logits, read off their configs, and the reference map itself.

The heads' agreement with it is tested in test_logprobs.py / test_triton_logprobs.py; its agreement with a real
Hugging Face forward in tests/families/test_scoring.py.
"""

import glob
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from bpo.ops.logit_transform import _RULES, LogitTransform


@pytest.mark.parametrize("architecture,config,expected", [
    # google/gemma-4-*: final_logit_softcapping = 30.0 in the text config
    ("Gemma4ForConditionalGeneration", dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    ("PaliGemmaForConditionalGeneration", dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    ("PaliGemmaForConditionalGeneration", dict(), LogitTransform()),  # PaliGemma 1: a Gemma-1 text config
    # transformers 5.25's Gemma3ForConditionalGeneration never reads the field; Gemma3ForCausalLM does
    ("Gemma3ForConditionalGeneration", dict(final_logit_softcapping=30.0), LogitTransform()),
    ("Gemma3ForCausalLM", dict(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    ("Gemma3ForCausalLM", dict(final_logit_softcapping=None), LogitTransform()),
    ("AyaVisionForConditionalGeneration", dict(logit_scale=0.0625), LogitTransform(scale=0.0625)),
    ("Granite4VisionForConditionalGeneration", dict(logits_scaling=8.0), LogitTransform(scale=0.125)),
    ("HyperCLOVAXVisionV2ForConditionalGeneration", dict(logits_scaling=0.25), LogitTransform(scale=0.25)),
    ("MuseSparkForConditionalGeneration", dict(output_multiplier=2.0, final_logit_softcapping=15.0),
     LogitTransform(scale=2.0, softcap=15.0)),
    ("LlavaNextForConditionalGeneration", dict(logits_scaling=8.0), LogitTransform()),  # its forward ignores it
])
def test_from_config(architecture, config, expected):
    assert LogitTransform.from_config(SimpleNamespace(**config), architecture) == expected


def test_from_model_reads_the_text_config():
    class PaliGemmaForConditionalGeneration:  # what from_model looks at: the class name and get_text_config()
        config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(final_logit_softcapping=0.5))

    assert LogitTransform.from_model(PaliGemmaForConditionalGeneration()) == LogitTransform(softcap=0.5)


def test_reference_map():
    u = torch.tensor([-100.0, -1.0, 0.0, 0.5, 100.0])
    assert LogitTransform()(u) is u
    torch.testing.assert_close(LogitTransform(scale=0.5)(u), u / 2)
    capped = LogitTransform(scale=2.0, softcap=3.0)(u)  # scale first, then the cap
    torch.testing.assert_close(capped, torch.tensor([-3.0, 3 * math.tanh(-2 / 3), 0.0, 3 * math.tanh(1 / 3), 3.0]))


def test_bad_values_raise():
    with pytest.raises(ValueError, match="scale"):
        LogitTransform(scale=0.0)
    with pytest.raises(ValueError, match="softcap"):
        LogitTransform(softcap=-1.0)


# Encoder-decoders: bpo scores decoder-only language models, whose hidden states come from `model.model`.
NOT_SCORED = {"T5GemmaForConditionalGeneration", "T5Gemma2ForConditionalGeneration"}
TRANSFORM_WORDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                   "lm_head_multiplier", "logit_softcap", "logits_soft_cap", "tanh")


def transforming_classes():
    """{class name: lines} for every *ForCausalLM / *ForConditionalGeneration in the installed transformers whose
    body assigns logits (or the hidden states fed to lm_head) from a softcap or scale."""
    import transformers

    found = {}
    for path in glob.glob(os.path.join(os.path.dirname(transformers.__file__), "models", "*", "modeling_*.py")):
        with open(path) as f:
            source = f.read()
        for cls in re.finditer(r"^class (\w+)\(.*?(?=^class |\Z)", source, re.S | re.M):
            if not cls.group(1).endswith(("ForCausalLM", "ForConditionalGeneration")):
                continue
            lines = [line.strip() for line in cls.group(0).splitlines()
                     if re.match(r"\s*(logits|hidden_states) = ", line) and any(w in line for w in TRANSFORM_WORDS)]
            if lines:
                found[cls.group(1)] = lines
    return found


def test_rules_cover_every_forward_that_transforms_its_logits():
    found = transforming_classes()
    assert "Gemma4ForConditionalGeneration" in found and "Gemma3ForConditionalGeneration" not in found  # the scan works
    missing = {name: lines for name, lines in found.items() if name not in _RULES and name not in NOT_SCORED}
    assert not missing, f"add these forwards to bpo.ops.logit_transform._RULES: {missing}"
    stale = set(_RULES) - set(found)
    assert not stale, f"these forwards no longer transform their logits: {sorted(stale)}"
