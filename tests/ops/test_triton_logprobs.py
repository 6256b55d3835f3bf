"""The Triton log-prob head (`sequence_logprobs(..., backend="triton")`) against the readable reference.

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors. The interpreter is
chosen when `@triton.jit` decorates a function - triton's own `tl.zeros` & co. when `triton` is first imported,
our kernels when `bpo.ops.triton_logprobs` is - so TRITON_INTERPRET=1 is set here at collection time. If this
pytest process imported triton before that, the in-process tests skip and `test_in_fresh_process` runs this
file again in a new process instead. The interpreter runs every program in Python: shapes stay tiny.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton already imported in compiled mode: setting the variable now would be too late
TRITON_IMPORTED_TOO_EARLY = (
    DEVICE == "cpu" and "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # only CPU processes get it; on CUDA the kernels are compiled

from bpo.ops import naive_sequence_logprobs, sequence_logprobs  # noqa: E402
from ops import reference  # noqa: E402
from ops.reference import TRANSFORMS, compare_to_naive, run  # noqa: E402

# Per-dtype tolerances (atol, rtol) for triton vs naive. fp32: fp32 dots ("ieee" precision) and fp32 softmax on
# both sides, only the summation order differs. bf16: the naive path rounds each logit to bf16 (2**-8 relative)
# before its fp32 log-softmax, the kernel keeps the fp32 dot result; both feed bf16 G into the grad dots.
TOL = {
    torch.float32: dict(fwd=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
    torch.bfloat16: dict(fwd=(5e-2, 1e-2), grad=(2e-2, 2e-2)),
}


@pytest.fixture(scope="module")
def tlp():
    """The bpo.ops.triton_logprobs module, built in the mode this device needs."""
    if TRITON_IMPORTED_TOO_EARLY:
        pytest.skip("triton was imported in compiled mode before this module set TRITON_INTERPRET=1; "
                    "test_in_fresh_process covers these tests")
    mod = importlib.import_module("bpo.ops.triton_logprobs")
    assert mod.INTERPRETED == (DEVICE == "cpu")
    return mod


@pytest.mark.skipif(not TRITON_IMPORTED_TOO_EARLY, reason="the tests of this file run in this process")
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def make_inputs(*args, **kw):
    return reference.make_inputs(*args, device=DEVICE, **kw)


def assert_matches_naive(hidden, weight, labels, upstream, dtype=torch.float32, **kw):
    return compare_to_naive(hidden, weight, labels, upstream, TOL[dtype], backend="triton", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_naive_odd_shapes(tlp, dtype):
    # N = 37 (3 row blocks, the last ragged), V = 53 (4 vocab tiles, the last ragged), H = 24 (2 hidden tiles)
    hidden, weight, labels, up = make_inputs((37,), H=24, V=53, dtype=dtype, ignore_frac=0.2)
    assert_matches_naive(hidden, weight, labels, up, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_logit_transform(tlp, dtype, name):
    # the HAS_SCALE / SOFTCAP kernels, on the odd shapes above, with a temperature after the transform
    hidden, weight, labels, up = make_inputs((37,), H=24, V=53, dtype=dtype, ignore_frac=0.2, seed=7)
    out, _, _ = assert_matches_naive(hidden, weight, labels, up, dtype=dtype, transform=TRANSFORMS[name],
                                     temperature=0.8)
    plain = naive_sequence_logprobs(hidden, weight, labels, temperature=0.8).detach()
    assert (out - plain).abs().max() > 0.1  # the transform was applied, not ignored


@pytest.mark.parametrize("n_splits", [1, 3, 8])  # 8 > the 4 vocab tiles: the host must shrink it
def test_vocab_splits_combine(tlp, n_splits):
    hidden, weight, labels, up = make_inputs((19,), H=16, V=61, seed=1)
    cfg = dict(n_splits=n_splits)
    out, gh, gw = run(tlp.triton_valid_row_logprobs, hidden, weight, labels, up, config=cfg)
    ref, rgh, rgw = run(naive_sequence_logprobs, hidden, weight, labels, up)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5)


def test_temperature_and_leading_dims(tlp):
    hidden, weight, labels, up = make_inputs((2, 9), H=16, V=40, ignore_frac=0.3, seed=2)
    assert_matches_naive(hidden, weight, labels, up, temperature=0.7)


def test_ignored_rows_are_exactly_zero(tlp):
    hidden, weight, labels, up = make_inputs((21,), H=16, V=33, ignore_frac=0.4, seed=3)
    ignored = labels == -100
    assert 0 < ignored.sum() < len(labels)
    out, gh, _ = assert_matches_naive(hidden, weight, labels, up)
    assert torch.all(out[ignored] == 0.0) and torch.all(gh[ignored] == 0.0)


def test_fully_ignored_batch(tlp):
    hidden, weight, labels, up = make_inputs((2, 5), H=16, V=20)
    labels.fill_(-100)
    out, gh, gw = run(sequence_logprobs, hidden, weight, labels, up, backend="triton")
    assert torch.all(out == 0.0) and torch.all(gh == 0.0) and torch.all(gw == 0.0)


def test_tied_embedding_accumulates_both_uses(tlp):
    torch.manual_seed(4)
    V, H, B, T = 35, 16, 2, 8
    emb = torch.nn.Embedding(V, H).to(DEVICE)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100, device=DEVICE)], dim=1)

    def emb_grad(**kw):
        emb.zero_grad(set_to_none=True)
        hidden = torch.tanh(emb(ids))  # (B, T, H): the Parameter feeds the lookup and the head
        (kw.pop("fn")(hidden, emb.weight, labels, **kw)).sum().backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(emb_grad(fn=sequence_logprobs, backend="triton"),
                               emb_grad(fn=naive_sequence_logprobs), atol=1e-5, rtol=1e-5)


def test_frozen_weight(tlp):
    # the reference model's head: no grad_W is wanted, the kernel skips that half of the work
    hidden, weight, labels, up = make_inputs((13,), H=16, V=29, seed=5)
    frozen = weight.detach()
    (gh,) = torch.autograd.grad((sequence_logprobs(hidden, frozen, labels, backend="triton") * up).sum(), hidden)
    (rgh,) = torch.autograd.grad((naive_sequence_logprobs(hidden, frozen, labels) * up).sum(), hidden)
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [None, "scale+softcap"])
def test_matches_torch_backend(tlp, name):
    # the two fast paths against each other, on the shape of a short packed batch
    hidden, weight, labels, up = make_inputs((3, 11), H=32, V=70, ignore_frac=0.3, seed=6)
    kw = {} if name is None else dict(transform=TRANSFORMS[name])
    a = run(sequence_logprobs, hidden, weight, labels, up, backend="triton", **kw)
    b = run(sequence_logprobs, hidden, weight, labels, up, backend="torch", chunk_size=4, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
