"""Shared-prompt scoring against the rows layout (the readable reference), on a replica of every family: the same
per-sequence log-probs and the same parameter gradients, one sequence per example and several packed in one, with
a truncated response, an example without a blind response, and odd lengths."""

import pytest
import torch

from .conftest import TRAINABLE
from .test_scoring import image_root, records  # noqa: F401 (image_root is a fixture)


def score(model, scorer, batch):
    """Per-sequence log-probs (R,) and the gradient of a weighted sum of them over every trained parameter."""
    from bpo.loss import sequence_logps
    from bpo.model import model_inputs

    inputs = model_inputs(batch, torch.device("cpu"))
    model.zero_grad()
    logps = sequence_logps(scorer(**inputs), inputs["labels"][:, 1:] != -100)
    (logps * torch.arange(1.0, len(logps) + 1)).sum().backward()  # distinct weights: rows cannot swap unnoticed
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach(), grads, int(inputs["attention_mask"].sum())


@pytest.mark.parametrize("family", TRAINABLE)
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
