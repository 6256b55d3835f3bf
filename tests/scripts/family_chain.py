"""bpo's whole chain on replicas of real families: blind responses, reference cache, BPO training on ZeRO-3, export,
and a reload of the export with from_pretrained and a forward.

    python tests/scripts/family_chain.py WORK FAMILY [FAMILY ...]                   # one rank
    deepspeed --num_gpus 2 tests/scripts/family_chain.py WORK FAMILY [FAMILY ...]   # two ranks

WORK/FAMILY/ must hold `model/` (the replica), `train.jsonl` and `images/`. Each stage is the job's own entry point
(`main(argv)`) with the config a user would write; running the stages in one process only saves each one's
interpreter start-up (tens of seconds on two cores). Rank 0 writes WORK/FAMILY/report.json.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import yaml  # noqa: E402

from bpo.runtime import dist


# Per-family settings on top of the common config. Qwen3-VL-MoE (two ranks, so routing differs per rank): the router's
# auxiliary loss and its MoE block named a ZeRO-3 leaf module, both exercised under ZeRO-3.
FAMILY_SETTINGS = {"qwen3_vl_moe": {"loss": {"router_aux_coef": 0.01},
                                    "model": {"z3_leaf_modules": ["Qwen3VLMoeTextSparseMoeBlock"]}}}
# Families whose export is loaded again under ZeRO-3 (bpo -> export -> bpo), beside a copy of the base checkpoint in
# the Hub's expert layout: transformers converts both at load time (bpo.model.load.full_shapes_for_weight_conversions).
ZERO3_RELOAD = {"qwen3_vl_moe"}


def config(work, family):
    sections = {
        "model": {"path": os.path.join(work, "model"), "dtype": "fp32"},
        "data": {"train_file": os.path.join(work, "train_blind.jsonl"), "image_root": os.path.join(work, "images"),
                 "max_length": 512, "skip_bad": True, "keep_cut_blind": True},
        "loss": {"type": "bpo"},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"output_dir": os.path.join(work, "run"), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                  "micro_batch_size": 1, "grad_accum": 1, "max_steps": 2, "ref_cache": os.path.join(work, "cache"),
                  "export_16bit": True, "plot": False, "tensorboard": False},
        "decode": {"max_new_tokens": 8, "batch_size": 4},
        "blind": {"input_file": os.path.join(work, "train.jsonl"), "output_file": os.path.join(work, "train_blind.jsonl")},
        "cache": {"output_dir": os.path.join(work, "cache"), "shard_size": 4, "batch_size": 2},
    }
    for section, values in FAMILY_SETTINGS.get(family, {}).items():
        sections[section].update(values)
    path = os.path.join(work, "config.yaml")
    if dist.is_rank0():
        with open(path, "w") as f:
            yaml.safe_dump(sections, f)
    dist.barrier()
    return path


def reload_check(work):
    """Load the export as a user would and compare it with the base checkpoint part by part."""
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_prompt
    from bpo.data.records import load_records
    from bpo.model.parts import part_of

    exported = os.path.join(work, "run", "hf_model")
    chat = load_chat(exported)  # the processor files came along
    model = AutoModelForImageTextToText.from_pretrained(exported, dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(os.path.join(work, "model"), dtype=torch.float32)
    records, _ = load_records(os.path.join(work, "train.jsonl"), os.path.join(work, "images"))
    record = next(r for r in records if r.image)
    ids, images, fields = encode_prompt(record, chat, os.path.join(work, "images"))
    images = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in images.items()}  # Llama-4's are bf16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **images,
                       **{k: torch.tensor([v]) for k, v in fields.items()}).logits
    changed = {}
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        diff = float((p - base_params[name]).abs().max())
        part = part_of(name)
        changed[part] = max(changed.get(part, 0.0), diff)
    return {"finite": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape),
            "max_change": changed, "end_of_turn": chat.response_end_id}


def hub_layout_copy(src, dst):
    """A copy of a Qwen3-VL-MoE checkpoint with its fused experts in the Hub's layout: gate_up_proj (E, H, 2I) and
    down_proj (E, I, H), the transpose of what transformers 5 (and bpo's export) write."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(dst, name))
            tensors = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()}
            save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})


def zero3_reload(work):
    """Every rank: load the export and a Hub-layout copy of the base under ZeRO-3 as training does; the largest
    difference of each, gathered, from a plain from_pretrained of the same directory."""
    import deepspeed
    from transformers import AutoModelForImageTextToText

    from bpo.config import load_config
    from bpo.model.load import load_model
    from bpo.train import build_ds_config

    hub = os.path.join(work, "model_hub_layout")
    if dist.is_rank0() and not os.path.isdir(hub):
        hub_layout_copy(os.path.join(work, "model"), hub)
    dist.barrier()
    cfg = load_config(os.path.join(work, "config.yaml"), [])
    ds_config = build_ds_config(cfg, dist.world_size())
    out = {}
    for key, path in (("export", os.path.join(work, "run", "hf_model")), ("hub_layout", hub)):
        model = load_model(cfg.model, path=path, ds_config=ds_config)
        plain = dict(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).named_parameters())
        worst = 0.0
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                worst = max(worst, float((p.detach() - plain[name]).abs().max()))
        out[key] = worst
    return out


def main():
    from bpo import generate_blind, ref_logprobs, train

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    root, families = args[0], args[1:]
    dist.init_distributed()
    for family in families:
        work = os.path.join(root, family)
        cfg = config(work, family)
        generate_blind.main(["--config", cfg])
        ref_logprobs.main(["--config", cfg])
        train.main(["--config", cfg])
        reloaded = zero3_reload(work) if family in ZERO3_RELOAD else None
        if dist.is_rank0():
            blind = [json.loads(line) for line in open(os.path.join(work, "train_blind.jsonl"))]
            report = {"blind": [r["blind"] for r in blind], "blind_errors": sum("blind_error" in r for r in blind),
                      "metrics": [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))],
                      "world": dist.world_size(), "zero3_reload": reloaded, **reload_check(work)}
            tmp = os.path.join(work, "report.json.tmp")
            with open(tmp, "w") as f:
                json.dump(report, f)
            os.replace(tmp, os.path.join(work, "report.json"))
        dist.barrier()


if __name__ == "__main__":
    main()
