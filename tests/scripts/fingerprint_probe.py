"""Run under 2 ranks (torchrun): the reference-cache fingerprint as the jobs compute it, recording which files each
rank opened for reading bytes while computing it. Each rank gets its own empty digest index, as on a fresh cluster
with node-local caches."""

import builtins
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from bpo.ref_cache import store as ref_cache
from bpo.config import from_dict  # noqa: E402

out, model_dir, data_file, image_root = sys.argv[1:5]
rank = int(os.environ["RANK"])
os.environ["BPO_CACHE_DIR"] = f"{out}.index{rank}"
torch.distributed.init_process_group("gloo")
cfg = from_dict({"model": {"path": model_dir}, "data": {"train_file": data_file, "image_root": image_root}})
processor = AutoProcessor.from_pretrained(model_dir)
hashed = []
real_open = builtins.open


def recording_open(file, mode="r", *args, **kwargs):
    if "rb" in mode and isinstance(file, str):
        hashed.append(file)
    return real_open(file, mode, *args, **kwargs)


builtins.open = recording_open
fp = ref_cache.fingerprint(cfg, processor, data_file)
builtins.open = real_open
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"hashed": hashed, "fingerprint": fp}, f)
torch.distributed.barrier()
# Left to interpreter teardown, gloo's threads can outlive the group and abort the process (torch 2.14,
# "terminate called without an active exception"), as bpo.runtime.dist.init_distributed's atexit hook explains.
torch.distributed.destroy_process_group()
