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

from bpo import dist  # noqa: E402


def config(work):
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
    from bpo.model import part_of

    exported = os.path.join(work, "run", "hf_model")
    chat = load_chat(exported)  # the processor files came along
    model = AutoModelForImageTextToText.from_pretrained(exported, dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(os.path.join(work, "model"), dtype=torch.float32)
    records, _ = load_records(os.path.join(work, "train.jsonl"), os.path.join(work, "images"))
    record = next(r for r in records if r.image)
    ids, images, fields = encode_prompt(record, chat, os.path.join(work, "images"))
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


def main():
    from bpo import generate_blind, ref_logprobs, train

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    root, families = args[0], args[1:]
    dist.init_distributed()
    for family in families:
        work = os.path.join(root, family)
        cfg = config(work)
        generate_blind.main(["--config", cfg])
        ref_logprobs.main(["--config", cfg])
        train.main(["--config", cfg])
        if dist.is_rank0():
            blind = [json.loads(line) for line in open(os.path.join(work, "train_blind.jsonl"))]
            report = {"blind": [r["blind"] for r in blind], "blind_errors": sum("blind_error" in r for r in blind),
                      "metrics": [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))],
                      "world": dist.world_size(), **reload_check(work)}
            tmp = os.path.join(work, "report.json.tmp")
            with open(tmp, "w") as f:
                json.dump(report, f)
            os.replace(tmp, os.path.join(work, "report.json"))
        dist.barrier()


if __name__ == "__main__":
    main()
