"""Run under the deepspeed launcher (1 or 2 CPU ranks): two ZeRO-3 engines over the same fp32 model, one with
bpo.optim.share_fp32_master and one without, trained 3 steps on the same data; writes what happened to OUT.rank<r>.

    deepspeed --num_gpus 1 tests/scripts/fp32_master_probe.py OUT_JSON
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bpo.runtime import dist
from bpo.optim import share_fp32_master  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 500},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 1e9}


def network():
    """The same start every call: 1608 parameters, 2 sub-groups a rank on 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8))


def engine(share):
    model = network()
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS)
    freed = share_fp32_master(eng.optimizer) if share else 0
    return eng, freed


def train(eng):
    torch.manual_seed(1 + dist.rank())
    for _ in range(3):
        x, y = torch.randn(4, 16), torch.randn(4, 8)
        loss = ((eng(x) - y) ** 2).mean()
        eng.backward(loss)
        eng.step()
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
        return [p.detach().clone() for p in eng.module.parameters()]


def main():
    out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    dist.init_distributed()
    initial = [p.detach().clone() for p in network().parameters()]
    shared, freed = engine(share=True)
    opt = shared.optimizer
    aliased = [w.data_ptr() == m.data_ptr()
               for w, m in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)]
    partition = sum(w.numel() for w in opt.fp16_partitioned_groups_flat)
    with_share = train(shared)
    without = train(engine(share=False)[0])
    report = {"freed": freed, "partition_numel": partition, "aliased": aliased,
              "max_difference": max(float((a - b).abs().max()) for a, b in zip(with_share, without)),
              "max_update": max(float((a - b).abs().max()) for a, b in zip(with_share, initial))}
    with open(f"{out}.rank{dist.rank()}", "w") as f:
        json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main()
