"""The chunked torch log-prob head (`sequence_logprobs`, backend "torch") against the readable reference.

Every case compares the forward and the gradients of hidden and weight with `naive_sequence_logprobs` under a
random upstream gradient (so a per-row scale error cannot hide). The memory tests watch every tensor the fused head
saves or creates and fail if anything of (N, V) size appears; they are checked to catch the naive path.
"""

import importlib.util
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bpo.ops import naive_sequence_logprobs, resolve_impl, sequence_logprobs
from bpo.ops import logprobs as logprobs_mod
from bpo.ops.logit_transform import LogitTransform
from ops.reference import TRANSFORMS, compare_to_naive, make_inputs, run

# Per-dtype tolerances (atol, rtol) for fused vs naive. fp32: both sides accumulate in fp32 and differ only in
# summation order. bf16: both round the logits GEMM to bf16, but BLAS may block a chunk and the full matrix
# differently (one bf16 ulp of a logit, 2**-8 relative, moves log p by about that much), and grad_W is summed in
# fp32 by the fused path but in a bf16-output GEMM by the naive one.
TOL = {
    torch.float32: dict(fwd=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
    torch.bfloat16: dict(fwd=(3e-2, 0.0), grad=(2e-2, 1e-2)),
}


def assert_matches_naive(hidden, weight, labels, upstream, dtype=torch.float32, **kw):
    return compare_to_naive(hidden, weight, labels, upstream, TOL[dtype], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,chunk_size", [(37, 8), (37, 1), (37, 64), (32, 16)])  # odd N, ragged/huge/exact chunks
def test_matches_naive(dtype, N, chunk_size):
    hidden, weight, labels, up = make_inputs((N,), H=24, V=103, dtype=dtype)
    assert_matches_naive(hidden, weight, labels, up, dtype=dtype, chunk_size=chunk_size)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(temperature):
    hidden, weight, labels, up = make_inputs((29,), H=16, V=77, ignore_frac=0.3)
    assert_matches_naive(hidden, weight, labels, up, temperature=temperature, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_logit_transform(dtype, name):
    # ragged chunks, ignored rows and a temperature on top: the transform comes first, the temperature after it
    hidden, weight, labels, up = make_inputs((37,), H=24, V=103, dtype=dtype, ignore_frac=0.2, seed=7)
    out, _, _ = assert_matches_naive(hidden, weight, labels, up, dtype=dtype, transform=TRANSFORMS[name],
                                     temperature=0.8, chunk_size=8)
    # and the transform really changed the numbers (the test cannot pass by ignoring it)
    plain = naive_sequence_logprobs(hidden, weight, labels, temperature=0.8).detach()
    assert (out - plain).abs().max() > 0.1


def test_golden_softcap():
    # By hand: a row whose logits are all 0 stays uniform (tanh(0) = 0), log p = -log V; a row with one logit x and
    # V - 1 zeros gives that label c * tanh(x / c) - log(exp(c * tanh(x / c)) + V - 1).
    V, c, x = 11, 0.5, 3.0
    weight = torch.zeros(V, 2)
    weight[4, 0] = x
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0 sees the hot logit, row 1 only zeros
    labels = torch.tensor([4, 4])
    capped = c * math.tanh(x / c)
    expected = torch.tensor([capped - math.log(math.exp(capped) + V - 1), -math.log(V)])
    for kw in (dict(), dict(chunk_size=1)):
        out = sequence_logprobs(hidden, weight, labels, transform=LogitTransform(softcap=c), **kw)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_ignored_rows_are_exactly_zero():
    hidden, weight, labels, up = make_inputs((41,), H=16, V=50, ignore_frac=0.4, seed=1)
    ignored = labels == -100
    assert 0 < ignored.sum() < len(labels)
    out, gh, _ = assert_matches_naive(hidden, weight, labels, up, chunk_size=8)
    assert torch.all(out[ignored] == 0.0)
    assert torch.all(gh[ignored] == 0.0)
    assert torch.all(out[~ignored] < 0.0)


def test_custom_ignore_index():
    hidden, weight, labels, up = make_inputs((20,), H=8, V=30, seed=2)
    labels[::3] = 7  # a real token id used as the ignore marker
    out, gh, _ = assert_matches_naive(hidden, weight, labels, up, ignore_index=7, chunk_size=4)
    assert torch.all(out[::3] == 0.0) and torch.all(gh[::3] == 0.0)


def test_fully_ignored_batch():
    hidden, weight, labels, up = make_inputs((2, 9), H=8, V=30)
    labels.fill_(-100)
    out, gh, gw = run(sequence_logprobs, hidden, weight, labels, up, chunk_size=4)
    assert out.shape == (2, 9) and torch.all(out == 0.0)
    assert torch.all(gh == 0.0) and torch.all(gw == 0.0)


def test_leading_dims_and_non_contiguous_hidden():
    # What the trainer passes: hidden = last_hidden_state[:, :-1], labels = labels[:, 1:].
    full, weight, labels_full, up_full = make_inputs((3, 12), H=16, V=61, ignore_frac=0.25)
    hidden = full[:, :-1]  # (3, 11, 16), a non-contiguous view
    labels, up = labels_full[:, 1:], up_full[:, 1:]
    assert not hidden.is_contiguous()
    out, _, gw = run(sequence_logprobs, hidden, weight, labels, up, chunk_size=5)
    ref, _, rgw = run(naive_sequence_logprobs, hidden, weight, labels, up)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5)
    # grads with respect to the full (un-sliced) tensor: the dropped last position gets exactly 0
    (g_full,) = torch.autograd.grad((sequence_logprobs(hidden, weight, labels, chunk_size=5) * up).sum(), full)
    (r_full,) = torch.autograd.grad((naive_sequence_logprobs(hidden, weight, labels) * up).sum(), full)
    torch.testing.assert_close(g_full, r_full, atol=1e-5, rtol=1e-5)
    assert torch.all(g_full[:, -1] == 0.0)


def test_tied_embedding_accumulates_both_uses():
    # The head weight is also the input embedding: its grad is the lookup's grad plus the head's grad.
    torch.manual_seed(3)
    V, H, B, T = 45, 12, 2, 10
    emb = torch.nn.Embedding(V, H)
    mix = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (B, T))
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # next-token labels, last one ignored
    labels[0, :3] = -100

    def total_grad(head, **kw):
        emb.zero_grad(set_to_none=True)
        mix.zero_grad(set_to_none=True)
        hidden = torch.tanh(mix(emb(ids)))  # (B, T, H): the same Parameter feeds the lookup ...
        logp = head(hidden, emb.weight, labels, **kw)  # ... and the head
        logp.sum().backward()
        return emb.weight.grad.clone(), mix.weight.grad.clone()

    fused_emb, fused_mix = total_grad(sequence_logprobs, chunk_size=4)
    ref_emb, ref_mix = total_grad(naive_sequence_logprobs)
    torch.testing.assert_close(fused_emb, ref_emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_mix, ref_mix, atol=1e-5, rtol=1e-5)
    # and the lookup's share is really in there (the test would pass trivially if the head grad dominated alone)
    lookup_rows = torch.zeros(V, dtype=torch.bool)
    lookup_rows[ids.flatten()] = True
    assert fused_emb[lookup_rows].abs().sum() > 0


def test_mixed_dtypes_give_grads_in_own_dtype():
    # bf16 hidden into an fp32 head: hidden's grad comes back in bf16, weight's in fp32.
    hidden, weight, labels, up = make_inputs((13,), H=8, V=21)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    out, gh, gw = run(sequence_logprobs, hidden16, weight, labels, up, chunk_size=4)
    ref, rgh, rgw = run(naive_sequence_logprobs, hidden16, weight, labels, up)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5)


def test_frozen_weight_and_no_grad():
    hidden, weight, labels, up = make_inputs((11,), H=8, V=21, ignore_frac=0.3)
    frozen = weight.detach()
    logp = sequence_logprobs(hidden, frozen, labels, chunk_size=4)
    (gh,) = torch.autograd.grad((logp * up).sum(), hidden)
    (rgh,) = torch.autograd.grad((naive_sequence_logprobs(hidden, frozen, labels) * up).sum(), hidden)
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the reference model's pass
        out = sequence_logprobs(hidden, weight, labels, chunk_size=4)
    assert not out.requires_grad


def test_golden_uniform_head():
    # A zero head gives every token probability 1/V: log p = -log V, whatever the hidden states.
    V = 37
    hidden = torch.randn(2, 5, 8)
    labels = torch.randint(0, V, (2, 5))
    out = sequence_logprobs(hidden, torch.zeros(V, 8), labels, chunk_size=3)
    torch.testing.assert_close(out, torch.full((2, 5), -math.log(V)), atol=1e-6, rtol=0)


def test_inputs_not_mutated():
    hidden, weight, labels, up = make_inputs((17,), H=8, V=19, ignore_frac=0.2)
    before = [t.detach().clone() for t in (hidden, weight, labels)]
    run(sequence_logprobs, hidden, weight, labels, up, temperature=0.7, chunk_size=4,
        transform=LogitTransform(scale=0.5, softcap=2.0))
    for b, a in zip(before, (hidden, weight, labels)):
        assert torch.equal(b, a)


# ---- memory boundedness -------------------------------------------------------------------------------------------
# Shapes where an (N, V) tensor is far larger than anything the fused head may legitimately hold:
# a (chunk, V) block, the (V, H) weight and its grad, the (N, H) hidden states and their grad.
MEM_N, MEM_H, MEM_V, MEM_CHUNK = 96, 8, 131, 8


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces, and the (m, k, n) sizes of every matmul."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.mm_sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            (m, k), (_, n) = args[-2].shape, args[-1].shape  # (m, k) @ (k, n), whatever the layout
            self.mm_sizes.append((m, k, n))
        return out


def largest_saved(fn, hidden, weight, labels, **kw):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fn(hidden, weight, labels, **kw)
    return max(saved)


def largest_created(fn, hidden, weight, labels, **kw):
    with LargestTensor() as mode:
        fn(hidden, weight, labels, **kw).sum().backward()
    return mode


MEM_TRANSFORMS = [LogitTransform(), TRANSFORMS["scale+softcap"]]  # the softcap's backward holds a second block


@pytest.mark.parametrize("transform", MEM_TRANSFORMS)
def test_nothing_of_size_NV_is_saved(transform):
    hidden, weight, labels, _ = make_inputs((MEM_N,), MEM_H, MEM_V)
    allowed = max(MEM_N * MEM_H, MEM_V * MEM_H)
    saved = largest_saved(sequence_logprobs, hidden, weight, labels, chunk_size=MEM_CHUNK, transform=transform)
    assert saved <= allowed
    # the check itself can fail: the naive path saves its (N, V) log-softmax
    assert largest_saved(naive_sequence_logprobs, hidden, weight, labels) >= MEM_N * MEM_V


@pytest.mark.parametrize("transform", MEM_TRANSFORMS)
def test_no_intermediate_larger_than_a_chunk(transform):
    hidden, weight, labels, _ = make_inputs((MEM_N,), MEM_H, MEM_V)
    allowed = max(MEM_CHUNK * MEM_V, MEM_V * MEM_H, MEM_N * MEM_H)
    assert allowed * 4 < MEM_N * MEM_V
    created = largest_created(sequence_logprobs, hidden, weight, labels, chunk_size=MEM_CHUNK, transform=transform)
    assert created.largest <= allowed
    assert largest_created(naive_sequence_logprobs, hidden, weight, labels).largest >= MEM_N * MEM_V


def test_ignored_rows_cost_no_matmul():
    hidden, weight, labels, _ = make_inputs((MEM_N,), MEM_H, MEM_V)
    labels[: MEM_N // 2] = -100  # e.g. a long prompt
    chunk = 12  # differs from MEM_H and MEM_V, and so does every chunk of the 48 valid rows
    mode = largest_created(sequence_logprobs, hidden, weight, labels, chunk_size=chunk)
    # Each matmul of the head has one token dimension beside V and/or H: forward logits, backward recompute,
    # grad_hidden and grad_weight each take every valid row once, a chunk at a time - and no ignored row.
    tokens = [[d for d in sizes if d not in (MEM_V, MEM_H)] for sizes in mode.mm_sizes]
    assert all(len(t) == 1 for t in tokens), mode.mm_sizes
    assert sum(t[0] for t in tokens) == 4 * (MEM_N // 2)
    assert max(t[0] for t in tokens) <= chunk


# ---- backend choice -----------------------------------------------------------------------------------------------
def test_resolve_impl(monkeypatch):
    """loss.logprob_impl -> the head that runs: auto is triton on CUDA with triton installed, else fused; the explicit
    names are kept as asked, and an explicit triton that cannot run raises instead of becoming fused."""
    for impl in ("naive", "fused"):
        assert resolve_impl(impl, torch.device("cpu")) == impl
    assert resolve_impl("auto", torch.device("cpu")) == "fused"
    has_triton = importlib.util.find_spec("triton") is not None
    assert resolve_impl("auto", torch.device("cuda")) == ("triton" if has_triton else "fused")
    with pytest.raises(ValueError, match="unknown log-prob head 'torch'"):
        resolve_impl("torch", torch.device("cpu"))
    assert logprobs_mod.describe_impl("auto", 256, torch.device("cpu")) == (
        "log-prob head: fused (loss.logprob_impl=auto, chunk 256 tokens)")
    monkeypatch.setattr(logprobs_mod.importlib.util, "find_spec", lambda name: None)
    assert resolve_impl("auto", torch.device("cuda")) == "fused"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve_impl("triton", torch.device("cuda"))


def test_one_chunk_default():
    """The fused head's chunk is defined once, in the config tree, and every default reads it."""
    import inspect

    from bpo.config import load_config
    from bpo.model.scorer import SequenceScorer
    from bpo.plan.estimate import Setup

    default = load_config().loss.logprob_chunk_size
    assert logprobs_mod.DEFAULT_CHUNK_SIZE == default == Setup.chunk_size
    for fn in (sequence_logprobs, SequenceScorer.__init__):
        assert inspect.signature(fn).parameters["chunk_size"].default == default, fn


def test_bad_arguments_raise():
    hidden, weight, labels, _ = make_inputs((5,), H=8, V=11)
    with pytest.raises(ValueError, match="unknown log-prob backend"):
        sequence_logprobs(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs(hidden, weight[:, :4], labels)


def test_triton_without_triton_raises(monkeypatch):
    hidden, weight, labels, _ = make_inputs((5,), H=8, V=11)
    monkeypatch.setattr(logprobs_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        sequence_logprobs(hidden, weight, labels, backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    from bpo.ops import triton_logprobs

    monkeypatch.setattr(triton_logprobs, "INTERPRETED", False)  # as in any process without TRITON_INTERPRET=1
    hidden, weight, labels, _ = make_inputs((5,), H=8, V=11)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        sequence_logprobs(hidden, weight, labels, backend="triton")


def test_sequence_logps_reductions():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert logprobs_mod.sequence_logps(tok, mask, "sum").tolist() == [-3.0, -4.0]
    assert logprobs_mod.sequence_logps(tok, mask, "mean").tolist() == [-1.5, -4.0]
    with pytest.raises(ValueError):
        logprobs_mod.sequence_logps(tok, mask, "max")


def test_response_mask_marks_the_scored_shifted_labels():
    # (R, T) labels as collated: prompt and padding IGNORE_INDEX; the mask is over labels[:, 1:], the targets the
    # scorer's (R, T-1) log-probs are of.
    ignore = logprobs_mod.IGNORE_INDEX
    labels = torch.tensor([[ignore, ignore, 5, 6], [ignore, 7, ignore, ignore]])
    assert logprobs_mod.response_mask(labels).tolist() == [[False, True, True], [True, False, False]]
