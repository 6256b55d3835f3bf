"""Fingerprints: in a multi-rank job only rank 0 reads the files to hash them, and every rank gets its answer."""

import json
import os
import subprocess
import sys

from jobs import REPO, free_port


def test_only_rank_0_hashes(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "probe"
    script = os.path.join(REPO, "tests", "scripts", "fingerprint_probe.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           script, str(out), str(tiny_model_dir), os.path.join(sample_data_dir, "train.jsonl"),
           os.path.join(sample_data_dir, "images")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[1]["hashed"] == []  # at 72B: 145 GB not read a second (or 64th) time
    names = {os.path.basename(p) for p in ranks[0]["hashed"]}
    assert "model.safetensors" in names and "train.jsonl" in names and "train_0000.png" in names
