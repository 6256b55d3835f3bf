"""The real templates on a real (throwaway, two-node, localhost) Slurm cluster, CPU profile.

`slurm/pipeline.sh` with BPO_PROFILE=cpu-tiny submits blind -> ref cache -> train (slurm/bpo_70b.sh on 2 nodes, one
gloo rank each) -> export -> eval, chained with afterok. As soon as training has written its first checkpoint, the
test sends USR1 to the training job's batch shell, as Slurm does 5 minutes before the time limit
(`--signal=B:USR1@300`); configs/cpu_tiny.yaml gives training 200 steps, seconds more than that takes, so it is
stopped part-way. Training must save at the step it was asked at (not fall back to its last periodic checkpoint),
the job must requeue itself, and the rerun must resume from exactly that step, finish, and let the rest of the chain
run. Needs root and apt (Slurm is installed when missing);
otherwise skipped. Deselect with `-m "not slurm"`.
"""

import glob
import json
import os
import subprocess
import time

import pytest

from .cluster import ClusterError, SlurmCluster, unavailable_reason

pytestmark = pytest.mark.slurm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def cpu_tiny_steps():
    from bpo.config import load_config

    return load_config(os.path.join(REPO, "configs", "cpu_tiny.yaml")).train.max_steps


STEPS = cpu_tiny_steps()
DEADLINE_S = 420  # the whole chain; it takes 2-3 minutes on two shared cores
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    request.addfinalizer(cluster.stop)  # registered first: a half-started cluster is stopped too
    try:
        cluster.start()
    except ClusterError as e:
        pytest.fail(f"could not bring up the test cluster: {e}")
    return cluster


def job_log(cluster, job_id):
    path = cluster.job(job_id).get("StdOut", "")
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return f"(no log at {path!r})"


def explain(cluster, jobs):
    parts = []
    for stage, job_id in jobs.items():
        info = cluster.job(job_id)
        parts.append(f"== {stage} job {job_id}: {info.get('JobState')} reason={info.get('Reason')} "
                     f"exit={info.get('ExitCode')} restarts={info.get('Restarts')}\n{job_log(cluster, job_id)[-3000:]}")
    return "\n".join(parts)


def states(cluster, jobs):
    """{stage: JobState} from one `scontrol show job` call."""
    everything = cluster.jobs()
    return {stage: everything.get(j, {}).get("JobState") for stage, j in jobs.items()}


def failed(cluster, jobs):
    """Jobs that ended other than COMPLETED (the rest of a chain then never starts)."""
    return {stage: s for stage, s in states(cluster, jobs).items() if s in DONE and s != "COMPLETED"}


def wait_for(condition, timeout, what, poll=0.2):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory):
    """Submit the CPU pipeline, requeue its training job part-way, wait for the chain; returns what happened."""
    from bpo.demo.sample_data import write_sample_data
    from bpo.demo.tiny import write_tiny_llava

    root = tmp_path_factory.mktemp("pipeline")
    run_root = str(root / "run")
    model = write_tiny_llava(str(root / "tiny"))
    data = write_sample_data(str(root / "data"), n_train=16, n_test=4)
    env = dict(cluster.env, BPO_PROFILE="cpu-tiny", SIZE="70b", NODES="2", RUN_ROOT=run_root, MODEL_PATH=model,
               DATA_DIR=data, LOG_DIR=str(root / "logs"), PY=os.path.join(REPO, ".venv", "bin", "python"),
               EXTRA_OVERRIDES="eval.limit=4")
    if not os.path.exists(env["PY"]):
        env.pop("PY")
    start = time.time()
    proc = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"pipeline.sh failed:\n{proc.stdout}\n{proc.stderr}"
    jobs = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and line.split("=")[1].isdigit())
    assert list(jobs) == ["blind", "ref", "train", "export", "eval"], proc.stdout

    # Stop training part-way, the way the time limit does: as soon as a checkpoint exists.
    run_dir = os.path.join(run_root, "train")
    latest = os.path.join(run_dir, "checkpoints", "latest")
    train = jobs["train"]

    checked = [0.0]

    def checkpoint_or_over():
        if not os.path.exists(latest):
            if time.time() - checked[0] < 2:  # a cheap poll for the file, a Slurm query every 2 s
                return False
            checked[0] = time.time()
            if failed(cluster, jobs):
                raise AssertionError(f"a job failed before training checkpointed:\n{explain(cluster, jobs)}")
            return False
        if cluster.job(train).get("JobState") != "RUNNING":
            raise AssertionError(f"training ended before it could be requeued:\n{explain(cluster, jobs)}")
        return True

    wait_for(checkpoint_or_over, DEADLINE_S, "the first training checkpoint")
    with open(latest) as f:
        requeued_after = f.read().strip()
    cluster.run("scancel", "--batch", "--signal=USR1", train)

    wait_for(lambda: failed(cluster, jobs) or set(states(cluster, jobs).values()) == {"COMPLETED"},
             DEADLINE_S - (time.time() - start), "the chain to finish", poll=1)
    final = states(cluster, jobs)
    assert set(final.values()) == {"COMPLETED"}, f"{final}\n{explain(cluster, jobs)}"
    return {"jobs": jobs, "run_root": run_root, "run_dir": run_dir, "requeued_after": requeued_after,
            "seconds": time.time() - start}


def test_chain_trains_on_two_nodes_and_exports(cluster, pipeline):
    run_dir = pipeline["run_dir"]
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step_{STEPS}"
    ranks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run_dir, "ranks", "*.json")))]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert sorted(r["slurm_node"] for r in ranks) == ["n1", "n2"]  # one rank on each node
    export = os.path.join(pipeline["run_root"], "hf_model")
    assert glob.glob(os.path.join(export, "*.safetensors")) and os.path.isfile(os.path.join(export, "config.json"))
    log = job_log(cluster, pipeline["jobs"]["train"])
    assert "2 node(s) [n[1-2]] x 1 rank(s) = 2" in log and log.count("preflight") >= 2


def test_requeued_training_resumes_from_its_checkpoint(cluster, pipeline):
    train = pipeline["jobs"]["train"]
    assert int(cluster.job(train).get("Restarts", 0)) >= 1
    log = job_log(cluster, train)  # --open-mode=append: both runs in one file
    step = int(pipeline["requeued_after"].split("_")[1])
    assert 0 < step < STEPS
    stopped = [int(line.split("stopped on request after step ")[1].split()[0]) for line in log.splitlines()
               if "stopped on request after step " in line]
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in log.splitlines()
               if "resumed from step " in line]
    assert stopped and step <= stopped[0] < STEPS, (step, stopped, log[-3000:])
    assert resumed and resumed[0] == stopped[0], (stopped, resumed, log[-3000:])  # no step lost to the requeue
    with open(os.path.join(pipeline["run_dir"], "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == list(range(1, STEPS + 1))  # each step once: the killed run's tail was dropped on resume


def test_eval_report(pipeline):
    eval_dir = os.path.join(pipeline["run_root"], "eval")
    with open(os.path.join(eval_dir, "report.json")) as f:
        assert json.load(f)
    assert os.path.getsize(os.path.join(eval_dir, "report.md")) > 0
