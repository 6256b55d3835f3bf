"""What bpo does with templates that cannot work as they are: none at all (PaliGemma), one whose generation prompt
does not end on a token boundary, and LLaVA-1.5's lossy published one with the shipped Vicuna v1 fix."""

import json
import os

import pytest

from jobs import write_config

SAMPLE = "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("template_data")
    Image.new("RGB", (48, 40), (30, 120, 200)).save(root / "p.png")
    rows = [{"id": f"r{i}", "question": SAMPLE, "image": "p.png", "chosen": "ASSISTANT: I can't share that.",
             "rejected": "ASSISTANT: Sure, it is 1 Example Road."} for i in range(2)]
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def test_no_chat_template_is_refused_at_load_naming_the_fix(replica):
    from bpo.data.chat import ChatTemplateError, load_chat

    with pytest.raises(ChatTemplateError, match="has no chat template.*data.chat_template"):
        load_chat(replica("paligemma"))


@pytest.mark.parametrize("job", ["generate_blind", "ref_logprobs", "train", "evaluate"])
def test_every_job_refuses_it_before_loading_weights(job, replica, data, tmp_path):
    import importlib

    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": replica("paligemma"), "dtype": "fp32"},
        "data": {"train_file": str(data / "train.jsonl"), "image_root": str(data)},
        "blind": {"output_file": str(tmp_path / "blind.jsonl")},
        "cache": {"output_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run")},
        "eval": {"test_file": str(data / "train.jsonl"), "output_dir": str(tmp_path / "eval")},
    })
    from bpo import cli

    with pytest.raises(SystemExit) as exit_:  # how the job's entry point ends: one line, no traceback
        cli.run(importlib.import_module(f"bpo.{job}").main, ["--config", config])
    assert "has no chat template" in str(exit_.value) and "data.chat_template=FILE" in str(exit_.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_inspect_refuses_it_with_status_2(replica, data, capsys):
    from bpo.data.inspect import main

    code = main([str(data / "train.jsonl"), "--image-root", str(data), "--model", replica("paligemma"),
                 "--max-length", "200"])
    assert code == 2 and "data.chat_template" in capsys.readouterr().err


def test_inspect_names_the_record_and_tokens_when_prompt_and_reply_tokenize_together(replica, data, tmp_path,
                                                                                     capsys):
    """A generation prompt ending in a space: SentencePiece glues that space to the reply's first word (`▁I`), so the
    prompt's tokens (`:`, `▁`) are no prefix of the conversation's; scoring would see tokens the model never sees."""
    from bpo.data.chat import read_template
    from bpo.data.inspect import main

    template = read_template(os.path.join(os.path.dirname(__import__("bpo.demo.tiny").demo.tiny.__file__), "templates",
                                          "llava15.jinja"))
    spaced = tmp_path / "spaced.jinja"
    spaced.write_text(template.replace("{{ 'ASSISTANT:' }}", "{{ 'ASSISTANT: ' }}"))
    code = main([str(data / "train.jsonl"), "--image-root", str(data), "--model", replica("llava15"),
                 "--max-length", "200", "--chat-template", str(spaced)])
    out = capsys.readouterr().out
    assert code == 1
    assert "(id r0): cannot encode:" in out and "(id r1): cannot encode:" in out
    assert "not a prefix" in out and "'▁'" in out and "'▁I'" in out
    # The checkpoint's own template passes the same check, image tokens and all.
    assert main([str(data / "train.jsonl"), "--image-root", str(data), "--model", replica("llava15"),
                 "--max-length", "200"]) == 0


def test_llava15_published_template_is_flagged_and_vicuna_v1_restores_its_training_format(replica):
    from bpo.data.chat import load_chat
    from bpo.data.conversation import parse_conversation, to_messages
    from bpo.data.records import Record

    published = load_chat(replica("llava15"))
    assert published.end_of_turn_id is None and "WARNING" in published.describe()
    assert "data.chat_template=vicuna_v1" in published.describe()
    vicuna = load_chat(replica("llava15"), chat_template="vicuna_v1")
    assert vicuna.end_of_turn_id == vicuna.tokenizer.eos_token_id and "WARNING" not in vicuna.describe()
    record = Record(id="r", turns=parse_conversation(SAMPLE), image="p.png", chosen="No.", rejected="Yes.")
    text = vicuna.processor.apply_chat_template(to_messages(record.turns), add_generation_prompt=True,
                                                tokenize=False)
    # Vicuna v1 as LLaVA-1.5 was trained (LLaVA's conv_vicuna_v1): system text, " " after a user turn, "</s>" after
    # an answer, the image first in its turn.
    assert text == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions. USER: Hi ASSISTANT: Hello!</s>"
                    "USER: <image>\nWhere does the person in the image live? ASSISTANT:")
    lossy = published.processor.apply_chat_template(to_messages(record.turns), add_generation_prompt=True,
                                                    tokenize=False)
    assert lossy == "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:"


def test_a_processor_missing_its_package_stops_the_job_naming_the_pip_package(replica, data, tmp_path, monkeypatch):
    """SmolVLM2's processor needs num2words; without it the job ends at start with one line that says what to
    install, not a traceback from inside transformers."""
    import importlib

    import transformers.models.smolvlm.processing_smolvlm as smolvlm

    model_dir = replica("smolvlm2")  # built while num2words is there
    monkeypatch.setattr(smolvlm, "num2words", None)  # what the module holds when the import failed
    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": model_dir, "dtype": "fp32"},
        "data": {"train_file": str(data / "train.jsonl"), "image_root": str(data)},
        "blind": {"output_file": str(tmp_path / "blind.jsonl")},
    })
    from bpo import cli

    with pytest.raises(SystemExit) as exit_:
        cli.run(importlib.import_module("bpo.generate_blind").main, ["--config", config])
    message = str(exit_.value)
    assert message.startswith("error: ") and model_dir in message
    assert "pip install num2words" in message and '".[families]"' in message
