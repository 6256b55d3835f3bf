"""Run under 2 ranks: load the tiny model the way training does and report how its parameters are partitioned."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bpo.runtime import dist
from bpo.config import load_config  # noqa: E402
from bpo.model.load import load_model  # noqa: E402
from bpo.train import build_ds_config  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, overrides = args[0], args[1:]
cfg = load_config(None, overrides)
dist.init_distributed()
model = load_model(cfg.model, ds_config=build_ds_config(cfg, dist.world_size()))
report = {}
for name, p in model.named_parameters():
    part = p.ds_tensor
    report[name] = {"local_numel": p.numel(), "full_numel": p.ds_numel, "shard_numel": part.numel(),
                    "shard_sum": float(part.float().sum())}
with open(f"{out}.rank{dist.rank()}.json", "w") as f:
    json.dump(report, f)
dist.barrier()
