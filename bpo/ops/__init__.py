"""Fused kernels. `sequence_logprobs` is the log-prob head the trainer calls; `naive_sequence_logprobs` is its
readable reference; `resolve_impl` turns loss.logprob_impl (naive | fused | triton | auto: triton on CUDA with triton
installed, else fused) into the head that runs, and `check_backend` raises when an explicitly requested backend cannot
run (the caller logs the choice). The Triton kernels live in
`bpo.ops.triton_logprobs`, imported only when that backend is used. `LogitTransform` is the scaling / softcap a
model's forward applies to its logits (Gemma-4, PaliGemma 2, Cohere, Granite...), which every head takes."""

from bpo.ops.logit_transform import LogitTransform
from bpo.ops.logprobs import (BACKENDS, DEFAULT_CHUNK_SIZE, IMPLS, check_backend, naive_sequence_logprobs,
                              resolve_impl, sequence_logprobs)

__all__ = ["BACKENDS", "DEFAULT_CHUNK_SIZE", "IMPLS", "LogitTransform", "check_backend", "naive_sequence_logprobs",
           "resolve_impl", "sequence_logprobs"]
