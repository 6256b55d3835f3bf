"""launch/: the Slurm -> torch.distributed environment and the preflight checks, without a Slurm cluster (a stand-in
`scontrol` answers the two questions slurm_env asks)."""

import json
import os
import subprocess
import sys

import pytest

from launch import preflight, slurm_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1"}


def test_job_env_for_two_nodes_of_eight():
    env = slurm_env.job_env(SLURM, ["gpu07", "gpu08"], "10.0.0.7", 8)
    assert env["NNODES"] == "2" and env["GPUS_PER_NODE"] == "8" and env["WORLD_SIZE"] == "16"
    assert env["MASTER_ADDR"] == "10.0.0.7" and env["NODE_RANK"] == "1"
    assert env["MASTER_PORT"] == str(15000 + 123456 % 15000) == "18456"
    assert env["BPO_DIST_TIMEOUT_S"] == "1800" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_overrides_win():
    env = slurm_env.job_env({**SLURM, "BPO_MASTER_PORT": "29999", "BPO_MASTER_ADDR": "head",
                             "BPO_DIST_TIMEOUT_S": "60"}, ["gpu07"], "10.0.0.7", 4)
    assert (env["MASTER_PORT"], env["MASTER_ADDR"], env["BPO_DIST_TIMEOUT_S"]) == ("29999", "head", "60")


@pytest.mark.parametrize("job_id", [0, 1, 14999, 15000, 32767, 10**9 + 7])
def test_port_stays_below_the_ephemeral_range(job_id):
    assert 15000 <= slurm_env.master_port(job_id) < 30000


def test_gpus_per_node_sources():
    assert slurm_env.gpus_per_node({}, 4) == 4
    assert slurm_env.gpus_per_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert slurm_env.gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8
    assert slurm_env.gpus_per_node({}) == 1


def test_srun_rank_env_and_its_error():
    task = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert slurm_env.srun_rank_env(task) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}
    with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_PROCID"):
        slurm_env.srun_rank_env({})


def test_outside_a_job_is_a_clear_error():
    with pytest.raises(slurm_env.SlurmEnvError, match="not running inside a Slurm job"):
        slurm_env.job_env({}, ["a"], "a", 1)


def test_hostfile_and_exports_format():
    assert slurm_env.hostfile_text(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    assert slurm_env.exports({"A": "1", "B": "x y"}) == "export A=1\nexport B='x y'\n"


def test_rank_file(tmp_path):
    path = slurm_env.write_rank_file(str(tmp_path / "ranks"), {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    record = json.loads(open(path).read())
    assert os.path.basename(path) == f"{record['host']}-3.json"
    assert (record["rank"], record["local_rank"], record["world_size"], record["pid"]) == (3, 1, 4, os.getpid())


@pytest.fixture
def fake_scontrol(tmp_path):
    """A `scontrol` that expands gpu[07-08] and reports each node's NodeAddr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text('#!/bin/sh\n'
                      'if [ "$2" = hostnames ]; then printf "gpu07\\ngpu08\\n"; exit 0; fi\n'
                      'if [ "$2" = node ]; then echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=$4"; fi\n')
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path), PYTHONPATH=REPO, **SLURM)


def run_slurm_env(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm_env.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_exports_and_writes_the_hostfile(fake_scontrol, tmp_path):
    proc = run_slurm_env(["--gpus-per-node", "8", "--write-hostfile"], fake_scontrol)
    assert proc.returncode == 0, proc.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in proc.stdout.splitlines())
    assert exports["MASTER_ADDR"] == "10.0.0.7" and exports["WORLD_SIZE"] == "16"
    assert open(exports["BPO_HOSTFILE"]).read() == "gpu07 slots=8\ngpu08 slots=8\n"
    assert exports["BPO_HOSTFILE"] == str(tmp_path / "bpo-hostfile-123456")


def test_cli_exec_per_srun_task_sets_ranks_and_records_them(fake_scontrol, tmp_path):
    env = dict(fake_scontrol, SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NTASKS="16")
    show = "import os, json; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', " \
           "'MASTER_ADDR', 'MASTER_PORT')}), os.getpid())"
    proc = run_slurm_env(["--srun-ranks", "--gpus-per-node", "8", "--rank-dir", str(tmp_path / "ranks"), "--exec",
                          "--", sys.executable, "-c", show], env)
    assert proc.returncode == 0, proc.stderr
    seen, pid = proc.stdout.rsplit(" ", 1)
    assert json.loads(seen) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.7",
                                "MASTER_PORT": "18456"}
    (record_file,) = (tmp_path / "ranks").iterdir()
    assert json.loads(record_file.read_text())["pid"] == int(pid)  # exec kept the pid: it is the rank's own


def test_cli_outside_slurm_fails_clearly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = run_slurm_env([], env)
    assert proc.returncode != 0 and "not running inside a Slurm job" in proc.stderr


def test_preflight_passes_and_fails_with_messages(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert preflight.main(["--readable", str(data), str(tmp_path), "--writable", str(tmp_path / "out"),
                           "--need-gb", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "GPU check skipped" in out and f"readable {data}" in out and "free at" in out
    assert preflight.main(["--readable", str(tmp_path / "missing"), "--writable", str(tmp_path / "out"),
                           "--need-gb", "1e9"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "does not exist on this node" in captured.out
    assert "GiB free at" in captured.out and "2 check(s) failed" in captured.err


def test_preflight_gpu_count(monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: (4, "nvidia-smi -L"))
    ok, message = preflight.check_gpus(8)
    assert not ok and "4 GPUs visible" in message and "8 requested" in message
    assert preflight.check_gpus(4)[0]


def test_preflight_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    ok, message = preflight.check_writable(str(blocker / "sub"))
    assert not ok and "cannot write" in message


def test_preflight_checkpoint_estimate_counts_existing_checkpoints(tmp_path, tiny_model_dir):
    from bpo.plan.catalog import load_dims
    from bpo.plan.estimate import checkpoint_bytes

    one = checkpoint_bytes(load_dims(tiny_model_dir))
    assert preflight.checkpoint_need(tiny_model_dir, 2, str(tmp_path)) == (3 * one, one)
    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
    assert preflight.checkpoint_need(tiny_model_dir, 2, str(tmp_path)) == (one, one)
