"""The sbatch templates without a cluster: they parse, follow the header conventions, and the files they name exist."""

import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "slurm", "*.sh")))
JOBS = [s for s in SCRIPTS if os.path.basename(s) not in ("common.sh", "pipeline.sh")]
GPU_JOBS = [s for s in JOBS if os.path.basename(s) != "export.sh"]
PATH_RE = re.compile(r"\b((?:configs|slurm|ds_configs|bpo|launch)/[\w./-]+\.(?:yaml|sh|json|py))\b")


def text(path):
    with open(path) as f:
        return f.read()


def name(path):
    return os.path.basename(path)


def test_the_expected_templates_exist():
    assert {name(s) for s in SCRIPTS} >= {"common.sh", "pipeline.sh", "bpo_70b.sh", "bpo_7b.sh", "blind_gen.sh",
                                          "ref_logprobs.sh", "export.sh", "eval.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=name)
def test_bash_parses(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def named_paths():
    paths = set()
    for script in SCRIPTS:
        paths.update(PATH_RE.findall(text(script)))
    return sorted(paths)


@pytest.mark.parametrize("rel", named_paths())
def test_named_file_exists(rel):
    assert os.path.isfile(os.path.join(REPO, rel)), f"a template names {rel}, which is not in the repo"


def default_configs():
    found = set()
    for script in SCRIPTS:
        found.update(re.findall(r"DEFAULT_CONFIG=(configs/[\w.]+\.yaml)", text(script)))
    return sorted(found | {"configs/cpu_tiny.yaml"})


@pytest.mark.parametrize("config", default_configs())
def test_configs_load_and_their_ds_config_exists(config):
    from bpo.config import load_config

    cfg = load_config(os.path.join(REPO, config))
    assert os.path.isfile(os.path.join(REPO, cfg.train.ds_config)), f"{config}: no {cfg.train.ds_config}"


def test_pipeline_train_templates_exist_for_each_size():
    for size in re.findall(r"SIZE=([\w]+)", text(os.path.join(REPO, "slurm", "pipeline.sh"))):
        if size != "SIZE":
            assert os.path.isfile(os.path.join(REPO, "slurm", f"bpo_{size}.sh"))
            assert os.path.isfile(os.path.join(REPO, "configs", f"bpo_{size}.yaml"))


@pytest.mark.parametrize("script", JOBS, ids=name)
def test_job_header_conventions(script):
    body = text(script)
    lines = body.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert f"sbatch slurm/{name(script)}" in "\n".join(lines[:12]), "the header opens with the submit command"
    sbatch = {line.split()[1].split("=")[0]: line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    assert sbatch["--ntasks-per-node"] == "--ntasks-per-node=1"  # one launcher per node starts the GPU ranks
    assert sbatch["--output"] == "--output=logs/%x-%j.out"
    assert sbatch["--open-mode"] == "--open-mode=append"  # a requeued run appends to the same log
    assert "--requeue" in sbatch and sbatch["--signal"].startswith("--signal=B:USR1@")
    assert "--job-name" in sbatch and "--time" in sbatch and "--nodes" in sbatch
    if script in GPU_JOBS:
        assert "--exclusive" in sbatch and "--gpus-per-node" in sbatch
    assert 'source "$REPO/slurm/common.sh"' in body


def test_training_always_resumes_and_70b_uses_the_cache_and_fused_head():
    common = text(os.path.join(REPO, "slurm", "common.sh"))
    body = common[common.index("bpo_train() {"):]
    assert "train.resume=true" in body and 'train.ref_cache="$REF_CACHE"' in body
    from bpo.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "bpo_70b.yaml"))
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.model.attn_implementation == "auto" and cfg.loss.logprob_impl == "auto"
    assert "zero3" in cfg.train.ds_config and 'USE_REF_CACHE=${USE_REF_CACHE:-1}' in text(
        os.path.join(REPO, "slurm", "bpo_70b.sh"))
    assert "#SBATCH --nodes=8" in text(os.path.join(REPO, "slurm", "bpo_70b.sh"))


def test_pipeline_chains_on_afterok_with_parsable_ids():
    body = text(os.path.join(REPO, "slurm", "pipeline.sh"))
    assert "--parsable" in body and "--dependency=afterok:" in body
    stages = re.findall(r"^\s*submit (\w+) ", body, flags=re.M)
    assert stages == ["blind", "ref", "train", "export", "eval"]


def test_70b_generates_on_a_tensor_parallel_server_so_eval_is_submitted():
    from bpo.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "bpo_70b.yaml"))
    assert cfg.decode.engine == "vllm" and not cfg.decode.zero3 and not cfg.eval.reward_accuracy
    common = text(os.path.join(REPO, "slurm", "common.sh"))
    serve = common[common.index("bpo_vllm_serve() {"):common.index("bpo_generate() {")]
    assert '--tensor-parallel-size "$GPUS_PER_NODE"' in serve and "/health" in serve
    assert "trap _bpo_vllm_stop EXIT" in serve and "trap '_bpo_vllm_stop; _bpo_on_usr1' USR1" in serve
    for job in ("blind_gen.sh", "eval.sh"):
        assert "bpo_generate " in text(os.path.join(REPO, "slurm", job))
    # The pipeline skips eval only for ZeRO-3 on the hf engine, which the 70B config no longer uses.
    pipeline = text(os.path.join(REPO, "slurm", "pipeline.sh"))
    assert '[ "$ENGINE" = hf ] && [ "$(bpo_config_value decode.zero3)" = True ]' in pipeline
