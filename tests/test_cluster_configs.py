"""The shipped GPU configs rehearse on CPU: configs/bpo_7b.yaml and configs/bpo_70b.yaml, with only the model, data
and output paths swapped for a tiny replica of the family they name, run two BPO steps on 2 CPU ranks in their own
dtype (bf16), DeepSpeed config (ds_configs/zero3.json, DeepSpeed's own AdamW), attention (auto) and the shared
layout. What a cluster user starts is then the path these tests take, but for sizes and the device."""

import json
import os

import pytest
import yaml

from jobs import REPO, add_blind, read_metrics, run_job

pytestmark = pytest.mark.slow

# config -> the family its model.path names (LLaVA-1.5-7B; LLaVA-NeXT-72B)
CONFIGS = {"bpo_7b.yaml": "llava15", "bpo_70b.yaml": "llava_next"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_trains_two_steps_on_cpu(name, tmp_path):
    from bpo.demo.sample_data import write_sample_data
    from bpo.demo.tiny import write_family

    config = os.path.join(REPO, "configs", name)
    with open(config) as f:
        shipped = yaml.safe_load(f)
    model = write_family(CONFIGS[name], str(tmp_path / "model"))
    data = write_sample_data(str(tmp_path / "data"))
    train_file = add_blind(os.path.join(data, "train.jsonl"), tmp_path / "train_blind.jsonl")
    run = tmp_path / "run"
    proc = run_job("train.py", config, [f"model.path={model}", f"data.train_file={train_file}",
                                        f"data.image_root={os.path.join(data, 'images')}", f"train.output_dir={run}",
                                        "train.max_steps=2"], timeout=1200)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows)  # finite, and gradients flowed
    assert "scoring: shared" in proc.stdout
    used = yaml.safe_load(open(run / "config.yaml"))
    assert used["model"]["dtype"] == shipped["model"]["dtype"] == "bf16"
    assert used["train"]["ds_config"].endswith(shipped["train"]["ds_config"])
    batch = shipped["train"]["micro_batch_size"] * shipped["train"]["grad_accum"] * 2
    assert rows[0]["count/pairs"] == batch  # the config's own batch shape, on 2 ranks
    with open(os.path.join(REPO, shipped["train"]["ds_config"])) as f:
        assert "torch_adam" not in json.load(f)["optimizer"]["params"]  # DeepSpeed's own AdamW, as on the cluster
