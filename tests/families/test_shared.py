"""Shared-prompt scoring against the rows layout (the readable reference), on a replica of every family: the same
per-sequence log-probs and the same parameter gradients, one sequence per example and several packed in one, with
a truncated response, an example without a blind response, and odd lengths."""

import pytest
import torch

from .conftest import TRAINABLE
from .test_scoring import image_root, records  # noqa: F401 (image_root is a fixture)


def score(model, scorer, batch, device=torch.device("cpu"), backward=True):
    """Per-sequence log-probs (R,) and the gradient of a weighted sum of them over every trained parameter (None
    without backward)."""
    from bpo.ops.logprobs import response_mask, sequence_logps
    from bpo.model.scorer import model_inputs

    inputs = model_inputs(batch, device)
    model.zero_grad()
    logps = sequence_logps(scorer(**inputs), response_mask(inputs["labels"]))
    if not backward:
        return logps.cpu(), None, int(inputs["attention_mask"].sum())
    (logps * torch.arange(1.0, len(logps) + 1, device=device)).sum().backward()  # distinct weights: no silent swap
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach().cpu(), grads.cpu(), int(inputs["attention_mask"].sum())


# Families with layers that mix tokens outside attention (LFM2's short convolutions): scored in rows.
MIXING = ["lfm2_vl"]


@pytest.mark.parametrize("family", [f for f in TRAINABLE if f not in MIXING])
def test_shared_equals_rows(family, replica, image_root):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate
    from bpo.data.encode import encode_example
    from bpo.data.shared import collate_shared
    from bpo.model.scorer import SequenceScorer, shared_layout_unsupported

    path = replica(family)
    chat = load_chat(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert shared_layout_unsupported(model) is None
    recs = records()
    recs[1].blind = None  # an example without a blind response
    recs[0].rejected = "Sure, " + "and then more detail, " * 8  # long enough to be cut below
    # The longer prompt (LFM2-VL tiles the tall image: the second) leaves 12 tokens for a response.
    prompt_len = max(len(encode_example(r, chat, image_root, 1000).prompt_ids) for r in recs)
    examples = [encode_example(r, chat, image_root, prompt_len + 12) for r in recs]
    assert examples[0].truncated["rejected"]
    scorer = SequenceScorer(model, impl="fused")
    rows = score(model, scorer, collate(examples, chat.pad_id))
    for max_tokens in (0, 10_000):  # one sequence per example, then both packed in one
        shared = score(model, scorer, collate_shared(examples, chat.pad_id, max_tokens))
        assert torch.allclose(shared[0], rows[0], rtol=1e-5, atol=1e-5), (max_tokens, shared[0], rows[0])
        # Gradients sum many small terms in another order: compared as a whole (measured ~5e-7 here).
        assert (shared[1] - rows[1]).norm() <= 1e-5 * rows[1].norm(), max_tokens
        assert shared[2] < 0.7 * rows[2]  # the prompt and its image are computed once



@pytest.mark.parametrize("family", MIXING)
def test_layers_outside_attention_refuse_the_shared_layout(family, replica, image_root):  # noqa: F811
    """A packed response would see the one before it through the convolutions: the shared layout is refused, with
    the reason, and scoring falls back to rows; packed anyway, its log-probs do move."""
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate
    from bpo.data.encode import encode_example
    from bpo.data.shared import collate_shared
    from bpo.model.scorer import SequenceScorer, choose_layout, shared_layout_unsupported

    path = replica(family)
    chat = load_chat(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert "conv layers mix tokens outside the attention mask" in shared_layout_unsupported(model)
    layout, why = choose_layout("shared", model)
    assert layout == "rows" and "conv layers" in why
    examples = [encode_example(r, chat, image_root, 1000) for r in records()]
    scorer = SequenceScorer(model, impl="fused")
    rows = score(model, scorer, collate(examples, chat.pad_id), backward=False)[0]
    packed = score(model, scorer, collate_shared(examples, chat.pad_id, 10_000), backward=False)[0]
    assert not torch.allclose(packed, rows, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["llava15", "gemma3"])  # plain causal text model; sliding layers + image blocks
def test_flex_attention_shared_equals_sdpa_rows(family, replica, image_root, monkeypatch):  # noqa: F811
    """model.attn_implementation=flex_attention scores the shared layout through FlexAttention block masks: the same
    log-probs as SDPA on the rows layout. On CUDA, compiled as transformers runs it, and the gradients too
    (benchmarks/gpu_check.sh runs this file on a GPU). On CPU, FlexAttention has no backward and its compiled CPU
    kernel fails to build for this mask (torch 2.14; bpo refuses flex_attention without CUDA), so the forward runs
    uncompiled: PyTorch's reference implementation of the same block mask, which checks the mask and its wiring."""
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate
    from bpo.data.encode import encode_example
    from bpo.data.shared import collate_shared
    from bpo.model.scorer import SequenceScorer, shared_layout_unsupported

    path = replica(family)
    chat = load_chat(path)
    recs = records()
    recs[1].blind = None
    examples = [encode_example(r, chat, image_root, 1000) for r in recs]
    grads = torch.cuda.is_available()
    device = torch.device("cuda" if grads else "cpu")
    if not grads:
        from torch.nn.attention.flex_attention import flex_attention
        from transformers.integrations import flex_attention as hf_flex

        monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)  # uncompiled

    def run(attn, batch):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        model.to(device).eval()
        if grads:
            return model, score(model, SequenceScorer(model), batch, device)
        with torch.no_grad():
            return model, score(model, SequenceScorer(model), batch, device, backward=False)

    _, rows = run("sdpa", collate(examples, chat.pad_id))
    flex, shared = run("flex_attention", collate_shared(examples, chat.pad_id, 10_000))
    assert flex.config.get_text_config()._attn_implementation == "flex_attention"
    assert shared_layout_unsupported(flex) is None
    assert torch.allclose(shared[0], rows[0], rtol=1e-5, atol=1e-5), (shared[0], rows[0])
    if grads:
        assert (shared[1] - rows[1]).norm() <= 1e-5 * rows[1].norm()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_flex_attention_is_refused_on_cpu_before_anything_loads():
    from bpo import cli, ref_logprobs, train

    for job in (train, ref_logprobs):
        with pytest.raises(SystemExit, match="model.attn_implementation=flex_attention needs a CUDA GPU"):
            cli.run(job.main, ["model.path=/nonexistent", "data.train_file=/nonexistent.jsonl",
                               "cache.output_dir=/nonexistent-cache", "model.attn_implementation=flex_attention"])


def test_auto_attention_takes_the_shared_layout_and_flash_attention_stops_it(monkeypatch):
    """Issue 22: the attention `auto` picks on each platform takes the shared layout, and one that cannot take it
    stops the job instead of scoring rows silently (config check before weights load, model check after)."""
    import os
    import types

    from bpo.config import ConfigError, load_config
    from bpo.model.load import resolve_attn_implementation
    from bpo.model.scorer import choose_layout

    assert resolve_attn_implementation("auto", cuda=True) == "flex_attention"
    assert resolve_attn_implementation("auto", cuda=False) == "sdpa"
    assert resolve_attn_implementation("flash_attention_2", cuda=True) == "flash_attention_2"

    def fake(attn):  # only what choose_layout reads: the text config's attention
        text = types.SimpleNamespace(_attn_implementation=attn)
        return types.SimpleNamespace(config=types.SimpleNamespace(get_text_config=lambda: text))

    for attn in ("flex_attention", "sdpa", "eager"):
        assert choose_layout("shared", fake(attn)) == ("shared", "scoring: shared")
    assert choose_layout("rows", fake("flash_attention_2")) == ("rows", "scoring: rows")
    with pytest.raises(ValueError, match="model.attn_implementation=sdpa or flex_attention.*loss.scoring=rows"):
        choose_layout("shared", fake("flash_attention_2"))
    with pytest.raises(ConfigError, match="sdpa or flex_attention, or set loss.scoring=rows"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])
    assert load_config(None, ["model.attn_implementation=flash_attention_2", "loss.scoring=rows"])
    # Generation has no shared masks: auto decodes with SDPA there; an explicit choice is kept.
    from bpo.engines import hf as generate

    seen, model = [], types.SimpleNamespace()
    model.to, model.eval = (lambda device: model), (lambda: model)
    monkeypatch.setattr(generate, "load_model", lambda cfg, path=None: seen.append(cfg.attn_implementation) or model)
    for attn in ("auto", "eager"):
        generate.load_generator(load_config(None, [f"model.attn_implementation={attn}"]).model, "m", zero3=False)
    assert seen == ["sdpa", "eager"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("bpo_7b.yaml", "bpo_70b.yaml"):  # the shipped cluster configs take the tested path
        cfg = load_config(os.path.join(repo, "configs", name))
        assert (cfg.model.attn_implementation, cfg.loss.scoring) == ("auto", "shared"), name
