"""Per-token log-likelihood of the labels under the LM head, without materialising (N, V) logits.

The DPO/BPO losses only need log p(label_t | context) for each answer token. The obvious way,
``log_softmax(hidden @ W.T).gather(label)``, builds a (N, V) logits tensor plus its log-softmax and
their gradients: at N = 4096 tokens and V = 128256 that is 2 GiB per fp32 copy. This module holds

  * ``naive_sequence_logprobs``  - the readable reference (also the trainer's ``logprob_impl: naive``);
  * ``_ChunkedLogprobs``         - a torch autograd.Function that walks over chunks of tokens and keeps
                                   only one (V, chunk) block of logits alive at a time;
  * ``sequence_logprobs``        - the plain function the trainer calls, on the backend it is given;
  * ``resolve_impl``             - loss.logprob_impl (naive | fused | triton | auto) -> the head that runs;
  * ``response_mask``, ``sequence_logps`` - which shifted labels are scored, and the reduction of a row's
                                   token log-probs to its sequence log-prob (sum or mean over those tokens).

The Triton backend lives in ``bpo/ops/triton_logprobs.py`` and is imported only when asked for.
Every head takes ``transform`` (``bpo.ops.logit_transform.LogitTransform``): the scaling and/or softcap
the model's own forward applies to its logits; the default, no transform, gives the plain heads' numbers.

Math (u = h @ W.T; with the transform's scale s and cap c, t = tanh(s * u / c), v = c * t, or v = s * u
without a cap; z = v / T; lse = logsumexp_v z; p = softmax(z) = exp(z - lse)):

    forward   logp_i = z_{i, y_i} - lse_i
    backward  d logp_i / d u_{i, v} = (1[v == y_i] - p_{i, v}) * (s / T) * D_{i, v}
              where D = 1 - t**2 with a cap (d tanh), D = 1 without one
              with g = incoming grad (N,):  G = g[:, None] * (s / T) * (onehot(y) - p) * D      # (N, V)
              grad_hidden = G @ W      # (N, H)
              grad_W      = G.T @ h    # (V, H)

so the backward needs only the per-row ``lse`` from the forward; the logits are recomputed chunk by
chunk instead of being stored. The price is a fourth GEMM of N x V x H (forward logits, recomputed
logits, grad_hidden, grad_W) where the naive path does three: with bounded memory and an arbitrary
per-token upstream g there is no way around it, since grad_W needs p and g together.
"""

from __future__ import annotations

import importlib.util

import torch

from bpo.config import LossConfig
from bpo.ops.logit_transform import LogitTransform

NO_TRANSFORM = LogitTransform()
BACKENDS = ("torch", "triton")  # sequence_logprobs' backends
# loss.logprob_impl: naive = naive_sequence_logprobs; fused and triton = sequence_logprobs on backend "torch" / "triton"
IMPLS = ("naive", "fused", "triton", "auto")

# Tokens whose logits the torch backend holds at once. Defined once, with the measurement that chose it, in the config
# tree (loss.logprob_chunk_size); bpo.config imports nothing heavy, so the kernels may read it.
DEFAULT_CHUNK_SIZE = LossConfig.logprob_chunk_size
# The label of a token that is not scored (prompt, image tokens, padding): the batches' (bpo.data.dataset) and
# transformers' convention.
IGNORE_INDEX = -100


def response_mask(labels):
    """(R, T) labels as collated (unshifted) -> (R, T-1) bool: the next-token targets that are scored, aligned with
    the per-token log-probs of labels[:, 1:] that the scorer returns."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_logps(token_logps, mask, reduction="sum"):
    """Reduce per-token log-probs (R, T) over response tokens (mask (R, T) bool) to per-sequence values (R,)."""
    summed = (token_logps * mask).sum(-1)
    if reduction == "sum":
        return summed
    if reduction == "mean":
        return summed / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def naive_sequence_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, temperature=1.0,
                            transform=NO_TRANSFORM):
    """Reference: log_softmax over the full (..., V) logits, then gather the labels.

    hidden (..., H), weight (V, H), labels (...) long -> (...) float32, 0.0 where labels == ignore_index.
    The matmul runs in weight's dtype (hidden is cast to it, as nn.Linear would need); ``transform`` and
    everything after it run in fp32.
    """
    _check_shapes(hidden, weight, labels)
    logits = transform((hidden.to(weight.dtype) @ weight.T).float()) / temperature  # (..., V)
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)  # gather needs a valid index everywhere
    logp = logits.log_softmax(-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return logp.masked_fill(ignored, 0.0)


def sequence_logprobs(
    hidden,
    weight,
    labels,
    ignore_index=IGNORE_INDEX,
    temperature=1.0,
    chunk_size=DEFAULT_CHUNK_SIZE,
    backend="torch",
    transform=NO_TRANSFORM,
):
    """Per-token log-probs of ``labels`` under softmax(transform(hidden @ weight.T) / temperature).

    hidden (..., H) any float dtype; weight (V, H) - the full lm_head weight (gathered by the caller
    under ZeRO-3; may be tied to the input embedding); labels (...) long, already aligned to hidden.
    Returns (...) float32, exactly 0.0 where labels == ignore_index. Gradients reach hidden and weight
    in their own dtypes; ignored rows get exactly zero gradient and cost no compute.

    backend: "torch" (chunks of ``chunk_size`` tokens) or "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1; ``chunk_size`` is unused there, the kernels tile on their own).
    transform: the final-logit scaling / softcap of the model's forward (``LogitTransform.from_model``).
    """
    _check_shapes(hidden, weight, labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_backend(backend, hidden.device)

    H = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, H).to(weight.dtype)  # (N, H); the cast is a no-op in the usual case
    labels1d = labels.reshape(-1)  # (N,)
    N = labels1d.shape[0]

    # Only rows with a real label are computed at all (prompt and padding tokens are free).
    # nonzero() is a CPU-GPU sync point, once per call: the chunk loop needs the row count on the host.
    valid = (labels1d != ignore_index).nonzero().squeeze(1)  # (M,)
    if valid.numel() == N:
        h, y = hidden2d, labels1d  # nothing ignored: skip the copy of the hidden rows
    else:
        h, y = hidden2d.index_select(0, valid), labels1d.index_select(0, valid)  # (M, H), (M,)

    if backend == "triton":
        from bpo.ops.triton_logprobs import triton_valid_row_logprobs  # triton is optional: imported when asked for

        logp = triton_valid_row_logprobs(h, weight, y, temperature, transform=transform)  # (M,)
    else:
        logp = _ChunkedLogprobs.apply(h, weight, y, float(temperature), int(chunk_size), transform)  # (M,)

    if valid.numel() == N:
        out = logp
    else:
        # index_copy is differentiable in its source, so ignored rows stay exactly 0 with zero grad;
        # it also keeps the output attached to the graph when every row is ignored (M = 0).
        out = logp.new_zeros(N).index_copy(0, valid, logp)  # (N,)
    return out.reshape(labels.shape)


def resolve_impl(impl, device) -> str:
    """loss.logprob_impl -> the head that runs on ``device``: "naive", "fused" or "triton". ``auto`` is triton on a
    CUDA device when triton is installed, else fused; the job prints the result at start. An explicit "triton" that
    cannot run here raises (check_backend): no head is ever swapped for another behind the config's back."""
    if impl not in IMPLS:
        raise ValueError(f"unknown log-prob head {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        cuda = torch.device(device).type == "cuda"
        return "triton" if cuda and importlib.util.find_spec("triton") is not None else "fused"
    if impl == "triton":
        check_backend("triton", device)
    return impl


def describe_impl(impl, chunk_size, device) -> str:
    """The start-up line naming the head loss.logprob_impl=`impl` runs on `device`; raises where it cannot run, so a
    job calls it before any weights load."""
    head = resolve_impl(impl, device)
    detail = f", chunk {chunk_size} tokens" if head == "fused" else ""
    return f"log-prob head: {head} (loss.logprob_impl={impl}{detail})"


def check_backend(name, device) -> None:
    """Raise if ``name`` cannot run on ``device``; never swap in another backend behind the caller's back."""
    if name not in BACKENDS:
        raise ValueError(f"unknown log-prob backend {name!r}; expected one of {BACKENDS}")
    if name != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("log-prob backend 'triton' was requested but triton is not installed (pip install triton)")
    device = torch.device(device)
    if device.type != "cuda":
        from bpo.ops.triton_logprobs import INTERPRETED  # the mode is fixed when the kernels are decorated

        if not INTERPRETED:
            raise RuntimeError(
                f"log-prob backend 'triton' needs a CUDA device (got {device}); on CPU it only runs under "
                "the Triton interpreter, i.e. with TRITON_INTERPRET=1 set before bpo.ops.triton_logprobs "
                "is first imported"
            )


def _check_shapes(hidden, weight, labels):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1]; got {tuple(weight.shape)} "
                         f"and hidden {tuple(hidden.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")


def _chunk_logits_t(h_chunk, weight, temperature, transform, block, dtanh=None):
    """z.T = transform(weight @ h_chunk.T) / T written into ``block``, a (V, C) fp32 buffer reused for every chunk.

    Transposed, (V, C) rather than (C, V): for a row-major (V, H) weight, ``weight @ h.T`` is the faster
    GEMM layout on CPU BLAS (10-15% in isolation at V = 128256, C = 256), and the two grad
    GEMMs below read the block just as well either way. Reusing one block keeps a single (V, C) tensor
    alive (a fresh one per chunk would briefly overlap the previous one) and, on CPU, saves faulting in
    new pages for every chunk.
    The GEMM accumulates in fp32 for every dtype; for bf16/fp16 its output is rounded once to that
    dtype (exactly like the naive path and nn.Linear) before the upcast, because torch offers an
    fp32-output low-precision matmul on CUDA only. Everything after this point is fp32, and the transform
    takes the reference's steps (``LogitTransform.__call__``), in place on our own block.
    ``dtanh``: a second (V, C) buffer that receives 1 - tanh(s * u / c)**2 for the backward (softcap only).
    """
    if weight.dtype == torch.float32:
        torch.mm(weight, h_chunk.T, out=block)  # (V, C)
    else:
        block.copy_(weight @ h_chunk.T)  # (V, C) low-precision temporary, upcast into the block
    if transform.scale != 1.0:
        block.mul_(transform.scale)
    if transform.softcap is not None:
        t = block.div_(transform.softcap).tanh_()  # (V, C): t = tanh(s * u / c)
        if dtanh is not None:
            torch.mul(t, t, out=dtanh).neg_().add_(1.0)  # (V, C): 1 - t**2
        block.mul_(transform.softcap)
    if temperature != 1.0:
        block.div_(temperature)  # in place on our own block, never on an input
    return block


class _ChunkedLogprobs(torch.autograd.Function):
    """Dense rows only: h (M, H), weight (V, H), labels (M,), transform -> logp (M,) float32.

    Saves h, weight, labels and lse (M,) - no (M, V) tensor survives the forward.
    Peak extra memory: one (V, chunk) fp32 block (+ a low-precision copy for bf16 inputs) and, in
    backward, the fp32 grad_W accumulator (V, H) and, with a softcap, a second (V, chunk) fp32 block
    holding d tanh.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, temperature, chunk_size, transform):
        M, V = h.shape[0], weight.shape[0]
        logp = torch.empty(M, dtype=torch.float32, device=h.device)  # (M,)
        lse = torch.empty(M, dtype=torch.float32, device=h.device)  # (M,)
        buf = torch.empty(V * min(chunk_size, M), dtype=torch.float32, device=h.device)  # storage of a (V, C) block
        for start in range(0, M, chunk_size):
            rows = slice(start, min(start + chunk_size, M))
            zt = _chunk_logits_t(h[rows], weight, temperature, transform,
                                 buf[: V * (rows.stop - start)].view(V, -1))  # (V, C)
            target = zt.gather(0, labels[rows].unsqueeze(0)).squeeze(0)  # (C,), read before zt is overwritten
            # logsumexp over V in place on zt, so the block is the only V-sized tensor alive
            col_max = zt.amax(dim=0, keepdim=True)  # (1, C)
            lse[rows] = zt.sub_(col_max).exp_().sum(dim=0).log_() + col_max.squeeze(0)
            logp[rows] = target - lse[rows]
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.transform = transform
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # grad_logp (M,)
        h, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T, M, V, tf = ctx.temperature, h.shape[0], weight.shape[0], ctx.transform
        # g_i * s / T folds the constant factors of d logp / d u into the per-row scale (s = 1: the plain g / T)
        g = grad_logp.float() / T if tf.scale == 1.0 else grad_logp.float() * tf.scale / T  # (M,)
        grad_h = torch.empty_like(h) if need_h else None  # (M, H); every row is written below
        # fp32 accumulator across chunks even for bf16 weights: a bf16 running sum over thousands of
        # tokens would lose the small contributions.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, H)
        buf = torch.empty(V * min(ctx.chunk_size, M), dtype=torch.float32, device=h.device)
        dbuf = torch.empty_like(buf) if tf.softcap is not None else None  # storage of the (V, C) d tanh block
        for start in range(0, M, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, M))
            n = V * (rows.stop - start)
            dtanh = None if dbuf is None else dbuf[:n].view(V, -1)  # (V, C)
            zt = _chunk_logits_t(h[rows], weight, T, tf, buf[:n].view(V, -1), dtanh)  # (V, C), recomputed
            # G.T = g * (onehot(y) - p) [* D], built in place in the logits block
            Gt = zt.sub_(lse[rows].unsqueeze(0)).exp_().mul_(-g[rows].unsqueeze(0))  # (V, C): -g * p
            Gt.scatter_add_(0, labels[rows].unsqueeze(0), g[rows].unsqueeze(0))  # + g at the label
            if dtanh is not None:
                Gt.mul_(dtanh)  # the softcap's derivative, at the label too
            if need_h:
                grad_h[rows] = Gt.T.to(weight.dtype) @ weight  # (C, H); the sum over V is inside one GEMM
            if need_w:
                # fp32 GEMM (hidden chunk upcast, G already fp32): exact accumulation, and no (V, H)
                # low-precision temporary. On CUDA the triton backend is the fast path.
                grad_w.addmm_(Gt, h[rows].float())  # (V, H) += (V, C) @ (C, H)
        if need_w:
            grad_w = grad_w.to(weight.dtype)  # no-op for fp32 weights
        return grad_h, grad_w, None, None, None, None
