"""slurm/common.sh's server stage outside Slurm: bpo_generate with ENGINE=vllm starts the real vLLM CPU server (from a
vLLM-named copy of a checkpoint it cannot read as saved), waits for health, runs the blind client, and the server is
stopped when the batch shell gets USR1 (the requeue signal) and when it exits."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from jobs import REPO

from .vllm_env import VLLM_PYTHON, need_vllm

pytestmark = pytest.mark.server

SCRIPT = r'''
source slurm/common.sh
ENGINE=vllm bpo_generate "$MODEL_PATH" bpo/generate_blind.py --config "$CONFIG" "${BPO_OVERRIDES[@]}" \
    blind.input_file="$TRAIN_FILE" blind.output_file="$BLIND_FILE" decode.concurrency=4
echo "client done; server pid $BPO_VLLM_PID at $BPO_SERVER_URL"
if [ "${WAIT_FOR_SIGNAL:-0}" = 1 ]; then sleep 600 & wait $!; fi
'''


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; only its parent has not reaped it yet
        return f.read().split(")")[-1].split()[0] != "Z"


def answers(url):
    try:
        urllib.request.urlopen(url.replace("/v1", "/health"), timeout=5)
        return True
    except OSError:
        return False


def start(tiny128_dir, sample_data_dir, tmp_path, wait_for_signal):
    """The batch shell, its output to tmp_path/out.log: a file, not a pipe, which a left-behind child could hold open."""
    os.makedirs(tmp_path, exist_ok=True)
    env = dict(os.environ, BPO_PROFILE="cpu-tiny", CONFIG="configs/cpu_tiny.yaml", RUN_ROOT=str(tmp_path / "run"),
               MODEL_PATH=tiny128_dir, DATA_DIR=sample_data_dir, LOG_DIR=str(tmp_path), PY=sys.executable,
               VLLM_PY=VLLM_PYTHON, PYTHONPATH=REPO, WAIT_FOR_SIGNAL=str(int(wait_for_signal)),
               BLIND_FILE=str(tmp_path / "run" / "blind.jsonl"), SLURM_JOB_ID="4242")
    env.pop("ENGINE", None)
    with open(tmp_path / "out.log", "w") as out:
        return subprocess.Popen(["bash", "-c", SCRIPT], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def output(tmp_path):
    return open(tmp_path / "out.log").read()


def server_of(output):
    line = next(x for x in output.splitlines() if x.startswith("client done"))
    return int(line.split("server pid ")[1].split()[0]), line.split(" at ")[1].strip()


@pytest.fixture
def shells():
    """The test's bash process groups, killed at the end whatever happened (a failed run must leave nothing)."""
    started = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_server_stage_stops_its_server_on_exit_and_on_requeue(tiny128_dir, sample_data_dir, tmp_path, shells):
    need_vllm()
    # 1. A normal end: the EXIT trap stops the server.
    proc = start(tiny128_dir, sample_data_dir, tmp_path / "exit", wait_for_signal=False)
    shells.append(proc)
    proc.wait(timeout=1800)
    out = output(tmp_path / "exit")
    assert proc.returncode == 0, out[-4000:]
    pid, url = server_of(out)
    assert "needs a vLLM-named copy" in out and "vLLM server healthy" in out and "stopping the vLLM server" in out
    assert os.path.isfile(tmp_path / "exit" / "run" / "served" / "model" / "config.json")  # the renamed copy
    rows = [json.loads(line) for line in open(tmp_path / "exit" / "run" / "blind.jsonl")]
    assert len(rows) == 48 and all(r["blind_meta"]["engine"] == "vllm" for r in rows)
    assert rows[0]["blind_meta"]["server_model"] == tiny128_dir
    assert not alive(pid) and not answers(url)

    # 2. USR1 (time limit near, or preemption): the server is stopped before the requeue is asked for.
    proc = start(tiny128_dir, sample_data_dir, tmp_path / "usr1", wait_for_signal=True)
    shells.append(proc)
    while "client done" not in output(tmp_path / "usr1"):  # the client has finished and the shell waits
        assert proc.poll() is None, output(tmp_path / "usr1")[-4000:]
        time.sleep(1)
    pid, url = server_of(output(tmp_path / "usr1"))
    assert alive(pid) and answers(url)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == 1
    out = output(tmp_path / "usr1")
    assert "USR1" in out and "stopping the vLLM server" in out
    assert "requeueing job 4242" in out and "scontrol requeue 4242 failed" in out  # no Slurm here: the job stops
    t0 = time.time()
    while alive(pid) and time.time() - t0 < 120:
        time.sleep(1)
    assert not alive(pid) and not answers(url)
