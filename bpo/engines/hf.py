"""Batched generation shared by the blind-response job and evaluation.

Work is cut into fixed global batches (batch k = items [k*B, (k+1)*B)) before it is split over ranks, so what a
batch contains, and therefore what greedy decoding writes, does not depend on the number of ranks or on resuming.

Decoding stops on any of the checkpoint's end tokens (`Chat.stop_ids`: the generation config's, the tokenizer's EOS
and the chat template's end-of-turn marker), so ChatML / Gemma-style models stop at the end of their turn instead of
running to max_new_tokens. Every processor output of a prompt that the model's forward takes is passed, per-token
fields (token_type_ids, mm_token_type_ids) left-padded like the ids.

Model placement, by `zero3`:
- False: every rank holds a full copy and generates independently. Fastest whenever the model fits one device.
- True: ZeRO-3 inference, for models larger than one device. Each decoding step all-gathers every layer's weights
  from all ranks, so generation is communication-bound (one full model transfer per token); all ranks must also
  step together (`synced_gpus`), so a rank with no batch left decodes a dummy one. Tensor-parallel inference (vLLM,
  DeepSpeed-Inference) scales far better for large models and is the recommended route at 70B.
"""

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from bpo.data.dataset import cat_padded
from bpo.model.load import load_model
from bpo.runtime import dist
from bpo.runtime.ds_configs import inference_config


def load_generator(model_cfg, path, zero3):
    if model_cfg.attn_implementation == "auto":
        # auto picks a kernel for the shared-prompt scoring masks (flex_attention on CUDA); decoding has no such
        # masks, and SDPA is transformers' everyday generation path.
        model_cfg = dataclasses.replace(model_cfg, attn_implementation="sdpa")
    if not zero3:
        model = load_model(model_cfg, path=path)
        return model.to(dist.device()).eval()
    import deepspeed  # here, not at the top: ZeRO-3 inference alone needs it, and it takes seconds to import

    ds = inference_config(model_cfg)  # ds_configs/zero3_inference.json, as the reference-cache job reads it
    model = load_model(model_cfg, path=path, ds_config=ds)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine.module


def left_pad(rows, fill):
    """rows: list of int lists -> (B, T) long tensor, each row right-aligned, `fill` on the left."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    return out


def batch_prompts(prompts, pad_id):
    """prompts: list of (ids, image_inputs, prompt_fields) as `bpo.data.encode.encode_prompt` returns them -> the
    keyword arguments of one left-padded generate call (input_ids, attention_mask, fields, image inputs)."""
    ids = [p[0] for p in prompts]
    batch = {"input_ids": left_pad(ids, pad_id), "attention_mask": left_pad([[1] * len(i) for i in ids], 0)}
    for key in sorted({k for _, _, fields in prompts for k in fields}):
        # Padding and any prompt without the field take the text-token value, read off a prompt's first token.
        fill = next(fields[key][0] for _, _, fields in prompts if key in fields)
        batch[key] = left_pad([fields.get(key, [fill] * len(i)) for i, _, fields in prompts], fill)
    for key in sorted({k for _, images, _ in prompts for k in images}):
        batch[key] = cat_padded([images[key] for _, images, _ in prompts if key in images])
    return batch


@dataclass(frozen=True)
class Generation:
    text: str  # decoded, special tokens and surrounding whitespace stripped
    token_ids: list  # the generated ids, the stop token included when decoding stopped on one (None: unknown)
    stopped: bool  # False: cut at max_new_tokens, the model never ended its turn
    new_tokens: int  # generated tokens, the stop token excluded


@torch.no_grad()
def generate(model, chat, prompts, gen_cfg, seed, synced):
    """Decode one batch of prompts (list of (ids, image_inputs, prompt_fields)) -> one Generation per prompt."""
    param = next(model.parameters())
    device = param.device
    accepted = set(inspect.signature(model.forward).parameters)
    batch = {k: v.to(device, param.dtype if v.is_floating_point() else v.dtype)
             for k, v in batch_prompts(prompts, chat.pad_id).items() if k in accepted}
    torch.manual_seed(seed)  # sampling draws depend only on (seed, batch), not on rank or history
    out = model.generate(
        **batch, max_new_tokens=gen_cfg.max_new_tokens, do_sample=gen_cfg.do_sample,
        temperature=gen_cfg.temperature if gen_cfg.do_sample else None,
        top_p=gen_cfg.top_p if gen_cfg.do_sample else None,
        pad_token_id=chat.pad_id, eos_token_id=list(chat.stop_ids), synced_gpus=synced,
    )
    new = out[:, batch["input_ids"].shape[1]:].cpu()  # (B, new tokens), padded after a row's stop token
    stops = torch.tensor(chat.stop_ids)
    results = []
    for row in new:
        stop = torch.isin(row, stops).nonzero()
        ids = row[:int(stop[0]) + 1] if len(stop) else row
        text = chat.tokenizer.decode(ids[:len(ids) - bool(len(stop))], skip_special_tokens=True).strip()
        results.append(Generation(text, ids.tolist(), bool(len(stop)), len(ids) - bool(len(stop))))
    return results


def generate_texts(model, chat, prompts, gen_cfg, seed, synced):
    """(texts, new token counts) of `generate`, for callers that need only the text."""
    results = generate(model, chat, prompts, gen_cfg, seed, synced)
    return [g.text for g in results], [g.new_tokens for g in results]
