"""Run under 2 ranks: LoRA's reference (the policy engine with its adapters off) against a separate frozen copy.

    deepspeed --num_gpus 2 tests/scripts/lora_reference_probe.py OUT DATA IMAGE_ROOT MODEL_DIR [MODEL_DIR ...]

For each model: the LoRA policy engine is built as training builds it (bpo.train.build_policy), its lora_B weights
are set to random values so the adapters change the model, and each rank scores its micro-batches three ways:
with adapters off (bpo.model.reference.AdapterOffReference), with a second ZeRO-3 engine that loaded the same directory
without adapters (bpo.train.build_reference with train.ref_model_path, a LiveReference), and with the adapters on.
Writes OUT.rank{r}.json: {model_dir: {"off": [...], "copy": [...], "on": [...]}} sequence log-probs.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from bpo.runtime import dist


def probe(model_dir, data, image_root, work):
    import deepspeed

    from bpo.config import from_dict
    from bpo.data.chat import load_chat
    from bpo.data.dataset import PreferenceDataset, collate
    from bpo.data.encode import blank_image_example
    from bpo.data.records import load_records
    from bpo.ops.logprobs import response_mask, sequence_logps
    from bpo.model.scorer import model_inputs
    from bpo.model.reference import AdapterOffReference
    from bpo.data.sampler import micro_batches
    from bpo.train import build_ds_config, build_policy, build_reference

    sections = {"model": {"path": model_dir, "dtype": "fp32", "finetune": "lora"}, "lora": {"r": 4, "alpha": 8},
                "data": {"train_file": data, "image_root": image_root, "max_length": 512},
                "train": {"output_dir": work, "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                          "micro_batch_size": 2}}
    cfg = from_dict(sections)
    chat = load_chat(model_dir)
    records, _ = load_records(data, image_root)
    dataset = PreferenceDataset(records[:8], chat, image_root, cfg.data.max_length)
    blank = blank_image_example(chat)
    ds = build_ds_config(cfg, dist.world_size())
    torch.manual_seed(0)
    engine, _ = build_policy(cfg, ds, total_steps=1, blank=blank)
    generator = torch.Generator().manual_seed(1)
    for name, p in engine.module.named_parameters():
        if ".lora_B." in name:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    copy_cfg = from_dict(sections, [f"train.ref_model_path={model_dir}"])  # forces a separate frozen copy
    copy = build_reference(copy_cfg, ds, chat, dataset, blank)
    off = AdapterOffReference(engine, cfg.loss.reduction)
    out = {"off": [], "copy": [], "on": []}
    for step in range(2):
        (indices,) = micro_batches(len(dataset), 0, 0, step, 2, 1, dist.world_size(), dist.rank())
        batch = collate([dataset[i] for i in indices], chat.pad_id)
        inputs = model_inputs(batch, engine.device)
        out["off"] += off(batch, inputs).tolist()
        out["copy"] += copy(batch, inputs).tolist()
        with torch.no_grad():
            out["on"] += sequence_logps(engine(**inputs), response_mask(inputs["labels"]), "sum").tolist()
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, data, image_root, models = args[0], args[1], args[2], args[3:]
    dist.init_distributed()
    report = {m: probe(m, data, image_root, f"{out}.work/{os.path.basename(m)}") for m in models}
    with open(f"{out}.rank{dist.rank()}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main()
