"""Run under 2 ranks: build two models under ZeRO-3 in one process, as training does (policy, then live reference),
and report, for each, which modules of a `kernels`-decorated class lack their per-instance kernel table, and the
logits of one forward pass on a fixed input."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from bpo.runtime import dist
from bpo.config import load_config  # noqa: E402
from bpo.model.load import load_model  # noqa: E402
from bpo.train import build_ds_config  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, overrides = args[0], args[1:]
cfg = load_config(None, overrides)
dist.init_distributed()
ds_config = build_ds_config(cfg, dist.world_size())
report = []
for _ in range(2):
    model = load_model(cfg.model, ds_config=ds_config)
    # kernels' use_kernelized_func gives a class a forward that reads self._kernel_funcs, set by its __init__.
    kernelized = [name for name, m in model.named_modules()
                  if "_kernel_funcs" in getattr(getattr(type(m).forward, "__code__", None), "co_names", ())]
    missing = [name for name in kernelized if "_kernel_funcs" not in vars(model.get_submodule(name))]
    ids = torch.arange(3, 11).unsqueeze(0)  # (1, 8): text only, every rank the same
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, 8, V)
    report.append({"kernelized": kernelized, "missing": missing, "logits": logits[0, :, :16].tolist()})
with open(f"{out}.rank{dist.rank()}.json", "w") as f:
    json.dump(report, f)
dist.barrier()
