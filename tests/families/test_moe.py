"""Mixture-of-experts families (Qwen3-VL-MoE, Llama-4, Gemma-4): the router's auxiliary loss, leaf modules (none
needed), and the tokenizer digest that Gemma-4's processor once made differ between jobs. The ZeRO-3 side (both expert
layouts loading, training with routing that differs per rank) runs in tests/families/test_chain.py."""

import pytest
import torch

from .test_scoring import image_root, records  # noqa: F401 (image_root is a fixture)


def rows_batch(path, root):
    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate
    from bpo.data.encode import encode_example
    from bpo.model.scorer import model_inputs

    chat = load_chat(path)
    examples = [encode_example(r, chat, root, max_length=400) for r in records()]
    return model_inputs(collate(examples, chat.pad_id), torch.device("cpu"))


def test_router_aux_loss_is_the_models_own(replica, image_root):  # noqa: F811
    """SequenceScorer(router_aux=True) keeps the auxiliary loss that transformers' own forward computes from the same
    batch (Qwen3VLMoeForConditionalGeneration with output_router_logits=True: load_balancing_loss_func over every MoE
    layer's router logits, padding excluded), and it reaches the routers' weights."""
    from transformers import AutoModelForImageTextToText

    from bpo.model.scorer import SequenceScorer

    path = replica("qwen3_vl_moe")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    inputs = rows_batch(path, image_root)
    scorer = SequenceScorer(model, router_aux=True)
    scorer(**inputs)
    ours = scorer.router_aux_loss
    hf_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**hf_inputs, output_router_logits=True).aux_loss
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)
    assert float(ours) > 1.0  # num_experts x sum(fraction x probability): 1 when perfectly balanced
    ours.backward()
    gate = model.model.language_model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_router_aux_loss_is_refused_where_transformers_has_none(replica):
    """Llama-4 and Gemma-4 return router logits, but transformers defines no load-balancing loss for them: asking
    for one is a configuration error, not a silent zero."""
    from transformers import AutoModelForImageTextToText

    from bpo.model.scorer import SequenceScorer

    model = AutoModelForImageTextToText.from_pretrained(replica("llama4"), dtype=torch.float32)
    with pytest.raises(ValueError, match="router_aux_coef"):
        SequenceScorer(model, router_aux=True)


def test_fused_experts_need_no_leaf_modules(replica):
    """transformers 5's MoE classes hold every expert in one (E, ., .) tensor: nothing found, nothing set."""
    from transformers import AutoModelForImageTextToText

    from bpo.model.moe import leaf_module_classes

    for family in ("qwen3_vl_moe", "llama4", "gemma4"):
        model = AutoModelForImageTextToText.from_pretrained(replica(family), dtype=torch.float32)
        assert leaf_module_classes(model) == [], family


@pytest.mark.parametrize("family", ["gemma4", "llama4"])
def test_tokenizer_digest_ignores_what_the_last_call_did(family, replica, image_root):  # noqa: F811
    """The backend tokenizer keeps the padding of its last padded call, and Gemma-4's processor pads every call by
    default: a job that had run the processor once hashed another tokenizer than one that had not, and training
    refused its own reference cache. The digest is the same before and after a call, and in a fresh load."""
    import os

    from PIL import Image

    from bpo.data.chat import load_chat
    from bpo.data.encode import render_prompt
    from bpo.runtime.digest import tokenizer_digest

    chat = load_chat(replica(family))
    before = tokenizer_digest(chat.tokenizer)
    record = records()[0]
    image = Image.open(os.path.join(image_root, record.image)).convert("RGB")
    chat.processor(text=[render_prompt(record, chat)], images=[image], padding=True, add_special_tokens=False)
    assert chat.tokenizer.backend_tokenizer.padding is not None  # the call did leave its mark
    assert tokenizer_digest(chat.tokenizer) == before
    assert tokenizer_digest(load_chat(replica(family)).tokenizer) == before
