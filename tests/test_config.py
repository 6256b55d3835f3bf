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
    ("loss.sft_weight=-0.5", "loss.sft_weight must be >= 0"),
])
def test_bad_settings_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_sft_refuses_what_it_would_ignore():
    cfg = load_config(None, ["loss.type=sft"])
    assert cfg.loss.type == "sft" and cfg.loss.sft_weight == 0.0
    assert load_config(None, ["loss.type=dpo", "loss.sft_weight=0.2"]).loss.sft_weight == 0.2
    for extra in ("train.ref_cache=cache", "train.ref_model_path=ref", "loss.sft_weight=1"):
        with pytest.raises(ConfigError, match=f"loss.type=sft .* unset {extra.split('=')[0]}"):
            load_config(None, ["loss.type=sft", extra])
