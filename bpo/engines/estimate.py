"""Decode throughput from first principles: which engine to generate with, and about how fast it goes.

Decoding one token per sequence is bound by memory traffic, not arithmetic: every step reads every weight once.

  server (vLLM, tensor-parallel over g GPUs of one node, continuous batching of B sequences of c tokens of context):
      t_step = (2 P / g + B c kv / g) / BW_hbm + 2 L t_allreduce          tokens/s = B / t_step
      kv = 2 x L x H_kv x 2 bytes per token of context (bf16 keys and values)
  hf under ZeRO-3 (decode.zero3) over N ranks, each decoding its own batch of B in lockstep:
      t_step = 2 P (N - 1) / N / BW_gather                                 tokens/s = N B / t_step
      (every rank receives the whole bf16 model once per token; compute is small beside it)
  hf with a replica per GPU (a model that fits one device): t_step = 2 P / BW_hbm per GPU, N B / t_step in all.

The bandwidths are achieved, not peak, figures (defaults: H100 SXM HBM3 at 2.0 of its 3.35 TB/s; NVLink all-gather
of ZeRO-3's layer-sized pieces at 100 GB/s per GPU; 15 us per tensor-parallel all-reduce of a decode step's
activations). They are estimates to choose an engine by, good to a factor of about two; measure before planning a
deadline on them.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    hbm_bytes_s: float = 2.0e12
    gather_bytes_s: float = 100e9  # ZeRO-3 all-gather within a node; over InfiniBand expect a fifth of it
    allreduce_s: float = 15e-6


def kv_bytes_per_token(dims):
    return 2 * dims.layers * dims.kv_dim * 2


def server_tokens_s(dims, gpus, batch, context, hw=Hardware()):
    weights = 2 * dims.total_params / gpus
    kv = batch * context * kv_bytes_per_token(dims) / gpus
    step = (weights + kv) / hw.hbm_bytes_s + 2 * dims.layers * hw.allreduce_s
    return batch / step


def zero3_tokens_s(dims, ranks, batch, hw=Hardware()):
    step = 2 * dims.total_params * (ranks - 1) / ranks / hw.gather_bytes_s
    return ranks * batch / step


def replica_tokens_s(dims, gpus, batch, hw=Hardware()):
    return gpus * batch / (2 * dims.total_params / hw.hbm_bytes_s)


def engine_advice(dims, gpus_per_node, gpu_mem_gib):
    """One paragraph for bpo.plan: which decode.engine suits this model on one node of these GPUs."""
    weights_gib = 2 * dims.total_params / 2**30
    if weights_gib < 0.6 * gpu_mem_gib:
        return (f"generation (blind responses, evaluation): bf16 weights {weights_gib:.0f} GiB fit one GPU, so "
                f"decode.engine=hf with a replica per GPU works (the reference path); decode.engine=vllm is faster "
                f"still (continuous batching) when a vLLM server is at hand")
    server = server_tokens_s(dims, gpus_per_node, batch=64, context=512)
    zero3 = zero3_tokens_s(dims, gpus_per_node, batch=4)
    return (f"generation (blind responses, evaluation): bf16 weights {weights_gib:.0f} GiB do not fit one "
            f"{gpu_mem_gib:g} GiB GPU. decode.engine=vllm (tensor parallel over {gpus_per_node} GPUs, 64 sequences "
            f"in flight): ~{server:,.0f} tokens/s per node; decode.engine=hf with decode.zero3 (all-gathers the "
            f"model for every token, batch 4 per rank): ~{zero3:,.0f} tokens/s per node (bpo/engines/estimate.py)")
