"""Batched generation shared by the blind-response job and evaluation.

Work is cut into fixed global batches (batch k = items [k*B, (k+1)*B)) before it is split over ranks, so what a
batch contains, and therefore what greedy decoding writes, does not depend on the number of ranks or on resuming.

Model placement, by `zero3`:
- False: every rank holds a full copy and generates independently. Fastest whenever the model fits one device.
- True: ZeRO-3 inference, for models larger than one device. Each decoding step all-gathers every layer's weights
  from all ranks, so generation is communication-bound (one full model transfer per token); all ranks must also
  step together (`synced_gpus`), so a rank with no batch left decodes a dummy one. Tensor-parallel inference (vLLM,
  DeepSpeed-Inference) scales far better for large models and is the recommended route at 70B.
"""

import torch

from bpo import dist
from bpo.model import load_model


def load_generator(model_cfg, path, zero3):
    if not zero3:
        model = load_model(model_cfg, path=path)
        return model.to(dist.device()).eval()
    import deepspeed

    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": model_cfg.dtype == "bf16"},
          "fp16": {"enabled": model_cfg.dtype == "fp16"}}
    model = load_model(model_cfg, path=path, ds_config=ds)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine.module


def left_pad(prompts, pad_id):
    """prompts: list of token-id lists -> input_ids, attention_mask (B, T), padded on the left for decoding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def concat_image_inputs(items):
    """Per-prompt image tensors (e.g. pixel_values (1, C, H, W)) -> one batch, concatenated along dim 0."""
    keys = sorted({k for it in items for k in it})
    return {k: torch.cat([it[k] for it in items if k in it]) for k in keys}


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, image_inputs, gen_cfg, seed, synced):
    """Decode one batch. prompts: list of token-id lists; image_inputs: list of dicts (may be empty dicts).

    Returns the decoded continuations, prompt and special tokens stripped, and the number of new tokens of each.
    """
    param = next(model.parameters())
    device = param.device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    extra = {k: v.to(device, param.dtype if v.is_floating_point() else v.dtype)
             for k, v in concat_image_inputs(image_inputs).items()}
    torch.manual_seed(seed)  # sampling draws depend only on (seed, batch), not on rank or history
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), **extra,
        max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample,
        temperature=gen_cfg.temperature if gen_cfg.do_sample else None,
        top_p=gen_cfg.top_p if gen_cfg.do_sample else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
    )
    new = out[:, ids.shape[1]:].cpu()  # (B, new tokens)
    lengths = []
    for row in new:
        stop = (row == tokenizer.eos_token_id).nonzero()
        lengths.append(int(stop[0]) if len(stop) else len(row))
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new, lengths)]
    return texts, lengths

