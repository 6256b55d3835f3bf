"""Shared-prompt scoring against the rows layout (the readable reference), on a replica of every family: the same
per-sequence log-probs and the same parameter gradients, one sequence per example and several packed in one, with
a truncated response, an example without a blind response, and odd lengths."""

import pytest
import torch

from .conftest import GEMMA4_TEMPLATE, TRAINABLE, with_marks
from .test_scoring import image_root, records  # noqa: F401 (image_root is a fixture)


def score(model, scorer, batch, device=torch.device("cpu"), backward=True):
    """Per-sequence log-probs (R,) and the gradient of a weighted sum of them over every trained parameter (None
    without backward)."""
    from bpo.loss import sequence_logps
    from bpo.model import model_inputs

    inputs = model_inputs(batch, device)
    model.zero_grad()
    logps = sequence_logps(scorer(**inputs), inputs["labels"][:, 1:] != -100)
    if not backward:
        return logps.cpu(), None, int(inputs["attention_mask"].sum())
    (logps * torch.arange(1.0, len(logps) + 1, device=device)).sum().backward()  # distinct weights: no silent swap
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach().cpu(), grads.cpu(), int(inputs["attention_mask"].sum())


@pytest.mark.parametrize("family", with_marks(TRAINABLE, {"gemma4": GEMMA4_TEMPLATE}))
def test_shared_equals_rows(family, replica, image_root):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate
    from bpo.data.encode import encode_example
    from bpo.data.shared import collate_shared
    from bpo.model import SequenceScorer, shared_layout_unsupported

    path = replica(family)
    chat = load_chat(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert shared_layout_unsupported(model) is None
    recs = records()
    recs[1].blind = None  # an example without a blind response
    recs[0].rejected = "Sure, " + "and then more detail, " * 8  # long enough to be cut below
    prompt_len = len(encode_example(recs[0], chat, image_root, 1000).prompt_ids)
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
    from bpo.model import SequenceScorer, shared_layout_unsupported

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
