"""Fused kernels. `sequence_logprobs` is the log-prob head the trainer calls; `naive_sequence_logprobs` is its
readable reference; `resolve_backend` picks "triton" on CUDA, else "torch", and `check_backend` raises when an
explicitly requested backend cannot run (the caller logs the choice). The Triton kernels live in
`bpo.ops.triton_logprobs`, imported only when that backend is used."""

from bpo.ops.logprobs import BACKENDS, check_backend, naive_sequence_logprobs, resolve_backend, sequence_logprobs

__all__ = ["BACKENDS", "check_backend", "naive_sequence_logprobs", "resolve_backend", "sequence_logprobs"]
