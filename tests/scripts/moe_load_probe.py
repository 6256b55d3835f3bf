"""Run under 1 or 2 ranks: load each model directory under ZeRO-3 as training does (bpo.model.load_model) and report,
per parameter, the largest difference between the gathered ZeRO-3 weights and those of a plain from_pretrained.

    deepspeed --num_gpus 2 tests/scripts/moe_load_probe.py OUT MODEL_DIR [MODEL_DIR ...]

Rank 0 writes OUT as {model_dir: {"max_diff": float, "error": str or None}}.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from bpo import dist  # noqa: E402
from bpo.config import ModelConfig, from_dict  # noqa: E402
from bpo.model import load_model  # noqa: E402
from bpo.train import build_ds_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, dirs = args[0], args[1:]
dist.init_distributed()
cfg = from_dict({"model": {"path": dirs[0], "dtype": "fp32"},
                 "train": {"ds_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}})
ds_config = build_ds_config(cfg, dist.world_size())
report = {}
for path in dirs:
    from transformers import AutoModelForImageTextToText

    model_cfg = ModelConfig(path=path, dtype="fp32")
    try:
        model = load_model(model_cfg, ds_config=ds_config)
    except Exception as e:  # noqa: BLE001 (reported, and the test names it)
        report[path] = {"max_diff": None, "error": f"{type(e).__name__}: {e}"[:2000]}
        continue
    plain = dict(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(worst, float((p.detach() - plain[name]).abs().max()))
    report[path] = {"max_diff": worst, "error": None}
if dist.is_rank0():
    with open(out, "w") as f:
        json.dump(report, f)
dist.barrier()
