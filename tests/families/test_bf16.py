"""bf16 against fp32: the same records scored by the same weights in both dtypes, per-sequence log-probs, rewards and
the BPO loss, on replicas of two families (LLaVA-1.5: CLIP + Llama; Qwen2-VL: its own vision tower, 3-D rotary
positions), in the shared-prompt layout with the fused and the naive head. The numbers a bf16 run trains on must
be fp32's within the table below; and every head accumulates its log-softmax in fp32 whatever the weights' dtype.

TOL: absolute bounds on |bf16 - fp32|, about 3x the largest measured here (CPU, torch 2.14; in the comments: LLaVA-1.5,
Qwen2-VL). bf16 keeps 8 significant bits: weights and activations are rounded to ~0.4% relative, and a sequence
log-prob (here -55 to -160) sums ~10-30 response tokens of such errors. A reward is beta times a difference of two of
them (policy - reference), and the loss is log-sigmoid of reward margins, which passes on at most 1/4 of their error.
"""

import pytest
import torch

from .test_scoring import image_root, records  # noqa: F401 (image_root is a fixture)

BETA = 0.1
TOL = {
    "sequence log-prob": 0.25,  # measured 0.069, 0.085
    "reward": 0.05,  # beta = 0.1; measured 0.011, 0.016
    "loss": 0.04,  # measured 0.008, 0.012 (the loss itself ~1.4-1.7)
}


def _score(path, dtype, impl, examples, pad_id, perturb):
    """Per-sequence log-probs (R,) float32 of the shared batch, the model in `dtype` (perturbed: a reference that
    differs from the policy, seeded)."""
    from transformers import AutoModelForImageTextToText

    from bpo.data.shared import collate_shared
    from bpo.ops.logprobs import response_mask, sequence_logps
    from bpo.model.scorer import SequenceScorer, model_inputs

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if perturb:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    model = model.to(dtype).eval()  # the same weights, rounded once to bf16
    batch = collate_shared(examples, pad_id, 0)
    inputs = model_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        token_logps = SequenceScorer(model, impl=impl)(**inputs)
    assert token_logps.dtype == torch.float32  # the head's output: fp32 in every dtype
    return sequence_logps(token_logps, response_mask(inputs["labels"])), batch


@pytest.mark.parametrize("family", ["llava15", "qwen2_vl"])
def test_bf16_scores_match_fp32(family, replica, image_root):  # noqa: F811
    from bpo.data.chat import load_chat
    from bpo.data.dataset import split_by_kind
    from bpo.data.encode import encode_example
    from bpo.loss import bpo_loss

    path = replica(family)
    chat = load_chat(path)
    examples = [encode_example(r, chat, image_root, 1000) for r in records()]
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        for impl in ("fused", "naive"):
            policy, batch = _score(path, dtype, impl, examples, chat.pad_id, perturb=False)
            ref, _ = _score(path, dtype, impl, examples, chat.pad_id, perturb=True)
            pc, pr, pb = split_by_kind(policy, batch)
            rc, rr, rb = split_by_kind(ref, batch)
            loss, _ = bpo_loss(pc, pr, pb, rc, rr, rb, beta=BETA)
            rewards = BETA * (policy - ref)  # (R,)
            got[dtype, impl] = policy, rewards, loss
    for impl in ("fused", "naive"):
        (p32, r32, l32), (p16, r16, l16) = got[torch.float32, impl], got[torch.bfloat16, impl]
        assert (p16 - p32).abs().max() <= TOL["sequence log-prob"], (impl, p16, p32)
        assert (r16 - r32).abs().max() <= TOL["reward"], (impl, r16, r32)
        assert (l16 - l32).abs() <= TOL["loss"], (impl, l16, l32)
        assert r32.abs().max() > 5 * TOL["reward"]  # the perturbed reference gives rewards the bound can tell apart
    # The heads agree with each other far more closely than either dtype with the other.
    torch.testing.assert_close(got[torch.bfloat16, "fused"][0], got[torch.bfloat16, "naive"][0], rtol=0, atol=0.05)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_heads_accumulate_log_softmax_in_fp32(impl):
    """bf16 hidden states and weight: the head's log-probs are fp32's log_softmax of the bf16 logits (a bf16
    log_softmax would be off by ~1e-2; fp32's by ~1e-6). The Triton head keeps its running max, sum and logits tile
    in fp32 too (bpo/ops/triton_logprobs.py); tests/ops/test_triton_logprobs.py holds its bf16 output to the naive
    one's."""
    from bpo.ops import naive_sequence_logprobs, sequence_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 64, generator=g).bfloat16()  # (N, H)
    weight = torch.randn(1000, 64, generator=g).mul(0.3).bfloat16()  # (V, H)
    labels = torch.randint(0, 1000, (37,), generator=g)
    logits = hidden @ weight.T  # (N, V) bf16, rounded as nn.Linear rounds them
    want = logits.float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    in_bf16 = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1).float()
    head = naive_sequence_logprobs if impl == "naive" else lambda h, w, y: sequence_logprobs(h, w, y, chunk_size=8)
    out = head(hidden, weight, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert (in_bf16 - want).abs().max() > 1e-3  # the check can tell a bf16 accumulation apart
