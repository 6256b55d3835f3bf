import pytest

from bpo.config import ConfigError, load_config, save_config


def test_paper_defaults():
    cfg = load_config()
    assert (cfg.loss.beta, cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == (0.1, 1e-6, "cosine", 10)
    assert (cfg.train.epochs, cfg.optim.grad_clip, cfg.train.seed) == (1, 1.0, 42)
    assert not cfg.model.train_vision_tower and cfg.model.train_projector and cfg.model.train_language_model


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  beta: 0.5\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(str(path), ["loss.beta=0.2", "train.resume=true", "optim.betas=[0.8, 0.9]"])
    assert cfg.loss.beta == 0.2 and cfg.optim.lr == 1e-4 and cfg.train.resume is True
    assert cfg.optim.betas == [0.8, 0.9]
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


@pytest.mark.parametrize("override,msg", [
    ("loss.betta=1", "unknown config key 'loss.betta'"),
    ("loss.type=ppo", "loss.type must be one of"),
    ("loss.beta=-1", "loss.beta must be positive"),
    ("train.micro_batch_size=abc", "train.micro_batch_size: cannot read"),
    ("nonsense", "must look like section.key=value"),
    ("train.seed=[1", r"override train.seed=\[1: the value is not valid YAML"),
    ("train.micro_batch_size=true", "train.micro_batch_size: cannot read True as int"),
    ("loss.beta=false", "loss.beta: cannot read False as float"),
    ("train.epochs=0", "train.epochs must be at least 1, got 0"),
    ("train.save_every=-2", "train.save_every must be >= 0, got -2"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("train.max_steps=0", r"train.max_steps must be -1 \(run all epochs\) or at least 1"),
    ("data.max_image_pixels=0", "data.max_image_pixels must be at least 1"),
])
def test_bad_settings_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("job", ["train", "ref_logprobs", "evaluate", "generate_blind"])
def test_overrides_may_follow_any_flag(job):
    import importlib

    parse_args = importlib.import_module(f"bpo.{job}").parse_args
    args = parse_args(["loss.beta=0.2", "--config", "c.yaml", "train.seed=3", "--local_rank=1", "optim.lr=1"])
    assert args.config == "c.yaml" and args.overrides[:3] == ["loss.beta=0.2", "train.seed=3", "optim.lr=1"]
    if job == "train":
        args = parse_args(["--config", "c.yaml", "train.seed=3", "--resume", "train.max_steps=9"])
        assert args.overrides == ["train.seed=3", "train.max_steps=9", "train.resume=true"]


def test_job_errors_are_one_line_naming_the_key(tmp_path, capsys):
    from bpo import cli
    from bpo.train import main

    for argv, message in [
        ([f"model.path={tmp_path / 'nope'}", "data.train_file=x.jsonl"],
         f"error: model.path '{tmp_path / 'nope'}' is not a model directory (no config.json in it)"),
        (["train.seed=[1"], "error: override train.seed=[1: the value is not valid YAML"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        assert str(e.value).startswith(message), e.value


def test_hf_is_the_default_engine():
    assert load_config().decode.engine == "hf"


@pytest.mark.parametrize("overrides,msg", [
    (["decode.engine=sglang"], r"decode.engine must be one of \('hf', 'vllm'\)"),
    (["decode.engine=vllm"], "decode.engine=vllm needs decode.server_url"),
    (["decode.engine=vllm", "decode.server_url=127.0.0.1:8000"], "decode.engine=vllm needs decode.server_url"),
    (["decode.engine=vllm", "decode.server_url=http://h:8000/v1", "decode.zero3=true"], "set decode.zero3=false"),
    (["decode.concurrency=0"], "decode.concurrency must be positive"),
    (["decode.server_retries=-1"], "decode.server_retries must be >= 0"),
])
def test_bad_engine_settings_name_the_key(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


def test_transport_keys_are_decode_keys():
    """What a resumed generation job may change (bpo.config.TRANSPORT_KEYS) must name real decode settings."""
    from bpo.config import TRANSPORT_KEYS, DecodeConfig

    assert set(TRANSPORT_KEYS) <= set(vars(DecodeConfig())) and "engine" not in TRANSPORT_KEYS
