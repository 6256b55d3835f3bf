"""Triton backend for ``bpo.ops.logprobs.sequence_logprobs`` (``backend="triton"``).

Layers, bottom up: two ``@triton.jit`` kernels -> ``_TritonLogprobs`` (autograd.Function) ->
``triton_valid_row_logprobs`` (plain function over the non-ignored rows; ``sequence_logprobs`` does
the ignore_index bookkeeping and is the entry point to use). The readable reference is
``naive_sequence_logprobs`` in logprobs.py; tests/ops/test_triton_logprobs.py holds them together.

On CPU the kernels run only under the Triton interpreter: set TRITON_INTERPRET=1 before this module is
first imported (the mode is fixed when ``@triton.jit`` decorates the kernels). ``INTERPRETED`` tells
which mode the kernels were built in.

Notation: h (M, H) hidden rows, W (V, H) lm_head weight, y (M,) labels, T temperature, s and c the
scale and softcap of the model's final-logit transform (``bpo.ops.logit_transform``), u = h @ W.T,
t = tanh(s * u / c), z = c * t / T (z = s * u / T without a cap; never stored), lse_i = logsumexp_v z_{i, v},
p = exp(z - lse). The constexpr flags HAS_SCALE and SOFTCAP compile the transform in only where a model
has one; without them the kernels are the plain z = u / T ones.

Forward (kernel ``_lse_fwd_kernel``), per block of rows and per slice ("split") of the vocabulary:
walk over vocabulary tiles, build each (BLOCK_M, BLOCK_V) logits tile as a sum of tl.dot over hidden
tiles, and fold it into a running (max m, sum s) pair - the online log-sum-exp:

    m' = max(m, max_v z_tile)      s' = s * exp(m - m') + sum_v exp(z_tile - m')

The label's logit is picked out of whichever tile holds it. Each split writes lse_part = m + log(s)
and its part of the target logit; torch combines the splits (logsumexp over a (M, splits) tensor).
Splitting the vocabulary gives the GPU enough programs when M is small.

Backward (kernel ``_bwd_kernel``), with g (M,) the incoming gradient:

    G = g[:, None] * s / T * (onehot(y) - p) * D    # (M, V), one (BLOCK_M, BLOCK_V) tile at a time,
                                               # D = 1 - t**2 with a softcap (d tanh), else 1
    grad_h = G @ W                             # (M, H)
    grad_W = G.T @ h                           # (V, H)

One program per (row block, vocab block) tile recomputes its logits tile, forms G, then for each hidden
tile adds G @ W_tile into grad_h and G.T @ h_tile into grad_W with fp32 atomics. Choice: atomics
rather than a second pass over vocabulary tiles, because a kernel that owns whole rows of grad_h (or
grad_W) must either recompute the logits once per hidden tile (H / BLOCK_H times the work) or hold a
(BLOCK_M, H) accumulator in registers (too large at H = 4096). The cost of atomics is that grad bits
depend on the order the tiles finish (not bit-reproducible run to run); the torch backend is the
deterministic one. Logits are recomputed once in backward, as in the torch backend.

Performance note: the block sizes below are reasonable defaults, not tuned on hardware.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from bpo.ops.logit_transform import LogitTransform

NO_TRANSFORM = LogitTransform()


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST_DOT is set only under the interpreter, whose tl.dot multiplies the raw bit patterns of
    bf16 operands (https://github.com/triton-lang/triton/issues/11584, "not supported yet"). bf16
    values are exact in fp32, so upcasting gives what the GPU computes: exact products, fp32 sums.
    """
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr,  # h (M, H), W (V, H), any strides
    rows, cols,  # (BLOCK_M,) row ids, (BLOCK_V,) vocabulary ids of this tile
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """(BLOCK_M, BLOCK_V) fp32 tile of h @ W.T; out-of-range rows/cols read zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    # int64 offsets: V * H passes 2**31 for large vocabularies (262144 x 8192)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm  # (BLOCK_M, 1) pointers
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv  # (BLOCK_V, 1) pointers
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        h = tl.load(h_rows + ks[None, :] * stride_hk,
                    mask=(rows[:, None] < M) & (ks[None, :] < H), other=0.0)  # (BLOCK_M, BLOCK_H)
        w = tl.load(w_rows + ks[None, :] * stride_wk,
                    mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)  # (BLOCK_V, BLOCK_H)
        acc = _dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _tanh(x):
    """tanh from exp, as triton.language has none and libdevice's does not run under the interpreter.
    sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: never overflows; near 0 the absolute error is a few
    fp32 ulps of 1 (~1e-7), i.e. ~1e-7 * c in a capped logit."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _transform(u, scale, softcap, inv_temp, HAS_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """(z, t) from a logits tile u: z = c * tanh(s * u / c) / T as in LogitTransform.__call__; t = the tanh
    (for the backward's 1 - t**2), u itself when there is no softcap (unused then)."""
    if HAS_SCALE:
        u = u * scale
    t = u
    if SOFTCAP:
        t = _tanh(u / softcap)
        u = t * softcap
    return u * inv_temp, t


@triton.jit
def _lse_fwd_kernel(
    h_ptr, w_ptr,  # h (M, H), W (V, H)
    labels_ptr,  # (M,) int64, all in [0, V)
    lse_part_ptr,  # (M, n_splits) fp32 out: logsumexp of z over this split's vocabulary slice
    target_part_ptr,  # (M, n_splits) fp32 out: z at the label if the label is in this slice, else 0
    M, V, H, n_splits,
    stride_hm, stride_hk, stride_wv, stride_wk,
    inv_temp,  # 1 / T
    scale, softcap,  # the final-logit transform; read only under HAS_SCALE / SOFTCAP
    tiles_per_split,  # vocabulary tiles walked by one program
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row block
    pid_s = tl.program_id(1)  # vocabulary split
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < M
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)  # -1 never matches a column

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(z - m)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # The host sizes the splits so that every split's first tile starts below V; m is finite after it.
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(tile_lo, tile_hi):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        u = _logits_tile(h_ptr, w_ptr, rows, cols, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
                         BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        z, _ = _transform(u, scale, softcap, inv_temp, HAS_SCALE, SOFTCAP)  # (BLOCK_M, BLOCK_V)
        z = tl.where(cols[None, :] < V, z, float("-inf"))  # padding columns drop out of the softmax
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_part_ptr + rows * n_splits + pid_s, m + tl.log(s), mask=row_ok)
    tl.store(target_part_ptr + rows * n_splits + pid_s, target, mask=row_ok)


@triton.jit
def _bwd_kernel(
    h_ptr, w_ptr,  # h (M, H), W (V, H)
    labels_ptr,  # (M,) int64
    lse_ptr,  # (M,) fp32 from the forward
    g_ptr,  # (M,) fp32: incoming grad * s / T
    grad_h_ptr,  # (M, H) fp32, contiguous, zero-initialised; accumulated with atomics
    grad_w_ptr,  # (V, H) fp32, contiguous, zero-initialised; accumulated with atomics
    M, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk,
    inv_temp,
    scale, softcap,  # as in the forward
    NEED_H: tl.constexpr, NEED_W: tl.constexpr,  # skip the work for inputs that need no grad
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row block
    pid_v = tl.program_id(1)  # vocabulary block
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    row_ok = rows < M
    col_ok = cols < V

    u = _logits_tile(h_ptr, w_ptr, rows, cols, M, V, H, stride_hm, stride_hk, stride_wv, stride_wk,
                     BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    z, t = _transform(u, scale, softcap, inv_temp, HAS_SCALE, SOFTCAP)  # (BLOCK_M, BLOCK_V) each
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # padding rows get g = 0, hence G = 0
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    G = g[:, None] * (onehot - p)  # (BLOCK_M, BLOCK_V) fp32
    if SOFTCAP:
        G = G * (1.0 - t * t)  # d tanh
    G = G.to(h_ptr.dtype.element_ty)  # the dots' input dtype

    rows64 = rows.to(tl.int64)[:, None]  # (BLOCK_M, 1), int64 offsets as in _logits_tile
    cols64 = cols.to(tl.int64)[:, None]  # (BLOCK_V, 1)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        k_ok = ks < H
        if NEED_H:
            w = tl.load(w_ptr + cols64 * stride_wv + ks[None, :] * stride_wk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
            dh = _dot(G, w, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(grad_h_ptr + rows64 * H + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            h = tl.load(h_ptr + rows64 * stride_hm + ks[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_H)
            dw = _dot(tl.trans(G), h, tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(grad_w_ptr + cols64 * H + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


# Which mode @triton.jit chose when this module was imported (see the module docstring).
INTERPRETED = isinstance(_lse_fwd_kernel, InterpretedFunction)


def default_config(device, M, V):
    """Block sizes and vocabulary splits. tl.dot needs every block dimension >= 16."""
    if INTERPRETED:
        # tiny tiles keep the interpreter fast; two splits exercise the split combine in tests
        return dict(BLOCK_M=16, BLOCK_V=16, BLOCK_H=16, n_splits=2, num_warps=4)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(max(M, 1), 64)
    # aim for ~2 programs per SM in the forward; backward's 2-D grid is large on its own
    n_splits = max(1, triton.cdiv(2 * sm_count, row_blocks))
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=64, n_splits=n_splits, num_warps=8)


def _dot_flags(dtype):
    # fp32 inputs: "ieee", since the default tf32 would round the operands to 10 mantissa bits and miss
    # the naive fp32 reference by ~1e-3. bf16/fp16 dots ignore the setting on the GPU.
    precision = "ieee" if (dtype == torch.float32 or INTERPRETED) else "tf32"
    return dict(DOT_PRECISION=precision, UPCAST_DOT=INTERPRETED)


class _TritonLogprobs(torch.autograd.Function):
    """h (M, H), weight (V, H) same dtype, labels (M,) in [0, V) -> logp (M,) float32."""

    @staticmethod
    def forward(ctx, h, weight, labels, temperature, config, transform):
        M, H = h.shape
        V = weight.shape[0]
        cfg = dict(default_config(h.device, M, V), **(config or {}))
        labels = labels.contiguous()
        # An out-of-range label would silently match no tile; assert on the device instead of syncing.
        torch._assert_async(((labels >= 0) & (labels < V)).all(), "labels must be in [0, V) or ignore_index")
        if M == 0:
            lse = torch.zeros(0, dtype=torch.float32, device=h.device)
            logp = torch.zeros(0, dtype=torch.float32, device=h.device)
        else:
            n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
            tiles_per_split = triton.cdiv(n_tiles, min(cfg["n_splits"], n_tiles))
            n_splits = triton.cdiv(n_tiles, tiles_per_split)  # so that no split starts past V
            lse_part = torch.empty(M, n_splits, dtype=torch.float32, device=h.device)  # (M, S)
            target_part = torch.empty(M, n_splits, dtype=torch.float32, device=h.device)  # (M, S)
            grid = (triton.cdiv(M, cfg["BLOCK_M"]), n_splits)
            with _on_device(h.device):
                _lse_fwd_kernel[grid](
                    h, weight, labels, lse_part, target_part,
                    M, V, H, n_splits,
                    h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
                    1.0 / temperature, *_transform_args(transform), tiles_per_split,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                    num_warps=cfg["num_warps"], **_dot_flags(h.dtype), **_transform_flags(transform),
                )
            lse = torch.logsumexp(lse_part, dim=1)  # (M,)
            logp = target_part.sum(dim=1) - lse  # (M,)
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.temperature = temperature
        ctx.cfg = cfg
        ctx.transform = transform
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # (M,)
        h, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cfg, T, tf = ctx.cfg, ctx.temperature, ctx.transform
        M, H = h.shape
        V = weight.shape[0]
        g = (grad_logp.float() / T if tf.scale == 1.0 else grad_logp.float() * tf.scale / T).contiguous()  # (M,)
        # fp32 accumulators: the atomics sum M / BLOCK_M (grad_W) or V / BLOCK_V (grad_h) partial tiles
        grad_h = torch.zeros(M, H, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_w else None
        if M > 0 and (need_h or need_w):
            grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
            with _on_device(h.device):
                _bwd_kernel[grid](
                    h, weight, labels, lse, g,
                    grad_h if need_h else grad_w, grad_w if need_w else grad_h,  # unused one is never written
                    M, V, H,
                    h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
                    1.0 / T, *_transform_args(tf),
                    NEED_H=need_h, NEED_W=need_w,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                    num_warps=cfg["num_warps"], **_dot_flags(h.dtype), **_transform_flags(tf),
                )
        grad_h = grad_h.to(h.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def triton_valid_row_logprobs(h, weight, labels, temperature=1.0, config=None, transform=NO_TRANSFORM):
    """log p(labels) for dense rows: h (M, H), weight (V, H), labels (M,) in [0, V) -> (M,) float32.

    No ignore_index handling here; use ``sequence_logprobs(..., backend="triton")``. ``config``
    overrides entries of ``default_config`` (tests use it to force several vocabulary splits).
    ``transform``: the model's final-logit scaling / softcap, applied before the temperature.
    """
    if h.dtype != weight.dtype:
        raise ValueError(f"h and weight must share a dtype, got {h.dtype} and {weight.dtype}")
    return _TritonLogprobs.apply(h, weight, labels, float(temperature), config, transform)


def _transform_args(transform):
    # runtime floats; 1.0 stand in for the ones a flag compiles out, so the kernels' signature never changes
    return float(transform.scale), float(transform.softcap or 1.0)


def _transform_flags(transform):
    return dict(HAS_SCALE=transform.scale != 1.0, SOFTCAP=transform.softcap is not None)


def _on_device(device):
    # Triton launches on torch's current CUDA device; make it the tensors' device.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
