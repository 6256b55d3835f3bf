"""What every log-prob head test does: random inputs, then forward and gradients against the naive head."""

import math

import torch

from bpo.ops import naive_sequence_logprobs, sequence_logprobs
from bpo.ops.logit_transform import LogitTransform

# Final-logit transforms the heads are tested with, at sizes that bite on make_inputs' logits (about unit scale):
# a Gemma-style cap, a Cohere/Granite-style scale, and a MuseGlimmer-style scale then cap.
TRANSFORMS = {"softcap": LogitTransform(softcap=0.7), "scale": LogitTransform(scale=0.3),
              "scale+softcap": LogitTransform(scale=2.0, softcap=1.5)}


def make_inputs(shape, H, V, dtype=torch.float32, ignore_frac=0.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(device, dtype).requires_grad_()  # (..., H)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(device, dtype).requires_grad_()  # (V, H)
    labels = torch.randint(0, V, shape, generator=g)  # (...)
    if ignore_frac:
        labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    upstream = torch.randn(shape, generator=g)  # (...) random dL/dlogp, nonzero at ignored rows too
    return hidden, weight, labels.to(device), upstream.to(device)


def run(fn, hidden, weight, labels, upstream, **kw):
    """Forward, then backward of sum(upstream * logp); returns (logp, grad_hidden, grad_weight)."""
    logp = fn(hidden, weight, labels, **kw)
    grads = torch.autograd.grad((logp * upstream).sum(), [hidden, weight])
    return (logp.detach(), *grads)


def compare_to_naive(hidden, weight, labels, upstream, tol, **kw):
    """`sequence_logprobs(**kw)` against the naive head; tol = dict(fwd=(atol, rtol), grad=(atol, rtol))."""
    ref_kw = {k: v for k, v in kw.items() if k in ("ignore_index", "temperature", "transform")}
    out, gh, gw = run(sequence_logprobs, hidden, weight, labels, upstream, **kw)
    ref, rgh, rgw = run(naive_sequence_logprobs, hidden, weight, labels, upstream, **ref_kw)
    (fa, fr), (ga, gr) = tol["fwd"], tol["grad"]
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    torch.testing.assert_close(out, ref, atol=fa, rtol=fr)
    torch.testing.assert_close(gh.float(), rgh.float(), atol=ga, rtol=gr)
    torch.testing.assert_close(gw.float(), rgw.float(), atol=ga, rtol=gr)
    return out, gh, gw
