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
    ("loss.sft_weight=-0.5", "loss.sft_weight must be >= 0"),
    ("train.max_tokens_per_sequence=-1", "train.max_tokens_per_sequence must be >= 0, got -1"),
    ("loss.logprob_impl=torch", r"loss.logprob_impl must be one of \('naive', 'fused', 'triton', 'auto'\)"),
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


def test_build_section_three_levels_deep_and_phrases_merge(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("build:\n  llm:\n    model: m\n  replace:\n    phrases:\n      animal: the animal in the image\n")
    cfg = load_config(str(path), ["build.llm.url=http://h:8000/v1", "build.replace.phrases.event=",
                                  "build.image.min_similarity=0.5"])
    b = cfg.build
    assert (b.llm.url, b.llm.model, b.image.min_similarity, b.entity.backend) == ("http://h:8000/v1", "m", 0.5, "llm")
    assert b.replace.phrases["animal"] == "the animal in the image" and b.replace.phrases["event"] == ""
    assert b.replace.phrases["person"] == "the person in the image"  # the defaults stay


def test_judge_section_type_picks_its_keys_and_merges(tmp_path):
    """eval.judge is a section of the tree: the file's keys and the overrides merge, read as every key is, and the
    saved config reads back the same."""
    from bpo.config import HFJudgeConfig, OpenAIJudgeConfig, RefusalJudgeConfig

    assert load_config().eval.judge == RefusalJudgeConfig()
    path = tmp_path / "e.yaml"
    path.write_text("eval:\n  judge: {type: openai, url: 'http://127.0.0.1:8000/v1', model: guard, workers: 2}\n")
    cfg = load_config(str(path), ["eval.judge.max_tokens=4", "eval.judge.timeout_s=30"])
    assert cfg.eval.judge == OpenAIJudgeConfig(url="http://127.0.0.1:8000/v1", model="guard", workers=2, max_tokens=4,
                                               timeout_s=30.0)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg
    cfg = load_config(None, ["eval.judge.type=hf", "eval.judge.path=/guard", "eval.judge.input=conversation"])
    assert cfg.eval.judge == HFJudgeConfig(path="/guard", input="conversation")


@pytest.mark.parametrize("overrides,msg", [
    (["eval.judge.type=gpt"], r"eval.judge.type must be one of \['hf', 'openai', 'refusal'\]"),
    (["eval.judge.url=http://h/v1"], r"unknown key\(s\) \['url'\] for a refusal judge"),
    (["eval.judge.type=openai", "eval.judge.url=http://h/v1", "eval.judge.model=m", "eval.judge.workers=four"],
     "config key eval.judge.workers: cannot read 'four' as int"),
    (["eval.judge.type=openai", "eval.judge.url=h:8000"], "an openai judge needs url"),
    (["eval.judge.type=hf", "eval.judge.path=x", "eval.judge.dtype=int8"], "eval.judge: dtype must be"),
    (["eval.judge=refusal"], "'eval.judge' is a section"),
])
def test_bad_judge_settings_name_the_key(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


@pytest.mark.parametrize("key", ["train.log_every=1", "cache.per_token=false"])
def test_removed_keys_are_unknown(key):
    """train.log_every (never read) and cache.per_token (written, never read back) are gone."""
    with pytest.raises(ConfigError, match=f"unknown config key '{key.split('=')[0]}'"):
        load_config(None, [key])


@pytest.mark.parametrize("overrides,msg", [
    (["build.entity.backend=regex"], r"build.entity.backend must be one of \('llm', 'spacy', 'given'\)"),
    (["build.image.min_similarity=1.5"], r"build.image.min_similarity must be in \(0, 1\]"),
    (["build.llm.max_attempts=0"], "build.llm.max_attempts must be positive"),
    (["build.llm.temperture=0"], "unknown config key 'build.llm.temperture'"),
    (["build.replace.phrases.person=USER: x"], "build.replace.phrases.person must be a phrase of plain text"),
    (["build.image.diffusers_prompt=a photo"], "must contain {entity}"),
])
def test_bad_build_settings_name_the_key(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,msg", [
    ([], "build.input_file is required"),
    (["build.input_file=a", "build.output_file=b"],
     "build.entity.backend=llm and build.rewrite.backend=llm ask an OpenAI-compatible endpoint: set build.llm.url"),
    (["build.input_file=a", "build.output_file=b", "build.entity.backend=given", "build.llm.url=http://h/v1"],
     "build.rewrite.backend=llm ask an OpenAI-compatible endpoint: .* model=''"),
    (["build.input_file=a", "build.output_file=b", "build.entity.backend=spacy", "build.rewrite.backend=none"],
     "needs build.entity.spacy_model"),
    (["build.input_file=a", "build.output_file=b", "build.entity.backend=given", "build.rewrite.backend=none"],
     "needs build.image.bank"),
])
def test_the_build_job_names_what_it_needs(overrides, msg):
    from bpo.config import require_build

    with pytest.raises(ConfigError, match=msg):
        require_build(load_config(None, overrides).build)


def test_build_job_errors_are_one_line(tmp_path):
    from bpo import cli
    from bpo.build_data.job import main

    data = tmp_path / "in.jsonl"
    data.write_text("")
    base = [f"build.input_file={data}", f"build.output_file={tmp_path / 'out.jsonl'}", "build.entity.backend=given",
            "build.rewrite.backend=none"]
    for argv, message in [
        (base + [f"build.image.bank={tmp_path / 'none'}"], "error: data file"),  # the input is read first
        (base, "error: build.image.backend=bank needs build.image.bank"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        assert str(e.value).startswith(message), e.value
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(SystemExit) as e:
        cli.run(main, base + [f"build.image.bank={tmp_path / 'none'}"])
    assert str(e.value) == f"error: build.image.bank '{tmp_path / 'none'}' is neither a directory nor an index file"


def test_build_transport_keys_are_llm_keys():
    from bpo.config import BUILD_TRANSPORT_KEYS, BuildLLMConfig

    assert set(BUILD_TRANSPORT_KEYS) <= set(vars(BuildLLMConfig())) and "model" not in BUILD_TRANSPORT_KEYS


def test_the_shipped_build_config_has_what_the_job_needs():
    from bpo.config import require_build
    from jobs import REPO

    b = load_config(f"{REPO}/configs/build_hh.yaml").build
    require_build(b)
    assert (b.entity.backend, b.image.backend, b.rewrite.backend) == ("llm", "bank", "llm")


def test_sft_refuses_what_it_would_ignore():
    cfg = load_config(None, ["loss.type=sft"])
    assert cfg.loss.type == "sft" and cfg.loss.sft_weight == 0.0
    assert load_config(None, ["loss.type=dpo", "loss.sft_weight=0.2"]).loss.sft_weight == 0.2
    for extra in ("train.ref_cache=cache", "train.ref_model_path=ref", "loss.sft_weight=1"):
        with pytest.raises(ConfigError, match=f"loss.type=sft .* unset {extra.split('=')[0]}"):
            load_config(None, ["loss.type=sft", extra])


def test_chat_template_kwargs_is_a_mapping_from_file_or_override(tmp_path):
    from bpo.config import from_dict

    assert load_config().data.chat_template_kwargs == {}
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  chat_template_kwargs: {enable_thinking: false}\n")
    assert load_config(str(path)).data.chat_template_kwargs == {"enable_thinking": False}
    assert load_config(str(path), ["data.chat_template_kwargs.add_vision_id=true"]).data.chat_template_kwargs == {
        "enable_thinking": False, "add_vision_id": True}
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        from_dict({}, ["data.chat_template_kwargs=[1, 2]"])
    with pytest.raises(ConfigError, match="add_generation_prompt.*bpo sets itself"):
        from_dict({"data": {"chat_template_kwargs": {"add_generation_prompt": False}}})
    with pytest.raises(ConfigError, match="not a template variable name"):
        from_dict({"data": {"chat_template_kwargs": {"enable thinking": False}}})
