"""Run under the deepspeed launcher: load a model partitioned with ZeRO-3 and save a checkpoint without training.

    deepspeed --num_gpus 2 benchmarks/make_zero3_checkpoint.py MODEL_DIR CKPT_DIR

The checkpoint has the layout training writes (per-rank fp32 partitions, frozen-parameter fragments), so export
can be measured on models larger than it is worth training on a CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402

from bpo.runtime import dist
from bpo.config import from_dict  # noqa: E402
from bpo.model.load import load_model  # noqa: E402
from bpo.model.parts import set_trainable  # noqa: E402
from bpo.model.scorer import SequenceScorer  # noqa: E402
from bpo.train import build_ds_config  # noqa: E402

model_dir, ckpt_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
cfg = from_dict({"model": {"path": model_dir, "dtype": "fp32"},
                 "train": {"ds_config": os.path.join(os.path.dirname(__file__), "..", "ds_configs/zero3_cpu.json")}})
dist.init_distributed()
ds = build_ds_config(cfg, dist.world_size())
model = load_model(cfg.model, ds_config=ds)
set_trainable(model, cfg.model)
scorer = SequenceScorer(model)
engine, *_ = deepspeed.initialize(model=scorer, model_parameters=[p for p in scorer.parameters() if p.requires_grad],
                                  config=ds)
engine.save_checkpoint(ckpt_dir, tag="step_0")
