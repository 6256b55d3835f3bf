"""decode.engine=vllm against a real vLLM server (tests/servers.py), checked against the hf path.

Measured on the tiny model (fp32, CPU): every blind prompt and every evaluation prompt (image included) reaches the
server as the same token ids the hf path feeds the model, and greedy decoding gives the same tokens, so the rows are
equal; the tests assert exactly that.
"""

import json
import os

import pytest

from jobs import run_single, write_config
from ports import free_port

pytestmark = pytest.mark.server
MAX_NEW = 16


def rows(path):
    return [json.loads(line) for line in open(path)]


def blind_config(path, model_dir, sample_data_dir, **decode):
    return write_config(path, {
        "model": {"path": model_dir, "dtype": "fp32"},
        "data": {"train_file": os.path.join(sample_data_dir, "train.jsonl"),
                 "image_root": os.path.join(sample_data_dir, "images")},
        "decode": {"max_new_tokens": MAX_NEW, "batch_size": 4, "concurrency": 4, **decode},
        "blind": {"batches_per_shard": 1},
    })


@pytest.fixture(scope="module")
def blind_runs(vllm_server, sample_data_dir, tmp_path_factory):
    """(hf output, server output, server config) for the 48 sample records."""
    root = tmp_path_factory.mktemp("blind_server")
    hf_cfg = blind_config(root / "hf.yaml", vllm_server.model, sample_data_dir)
    hf_out = root / "hf.jsonl"
    run_single("generate_blind.py", hf_cfg, [f"blind.output_file={hf_out}"])
    server_cfg = blind_config(root / "server.yaml", vllm_server.model, sample_data_dir, engine="vllm",
                              server_url=vllm_server.url)
    server_out = root / "server.jsonl"
    proc = run_single("generate_blind.py", server_cfg, [f"blind.output_file={server_out}"])
    assert "server engine" in proc.stdout and "tok/s" in proc.stderr  # the bar carries tokens/s
    return hf_out, server_out, server_cfg


def test_greedy_blind_responses_equal_the_hf_path(blind_runs, sample_data_dir):
    hf_out, server_out, _ = blind_runs
    hf, server = rows(hf_out), rows(server_out)
    inputs = rows(os.path.join(sample_data_dir, "train.jsonl"))
    assert len(hf) == len(server) == len(inputs) == 48
    for src, a, b in zip(inputs, hf, server):
        assert {k: v for k, v in b.items() if k not in ("blind", "blind_meta", "blind_error")} == src
        assert b["blind"] == a["blind"] and b["blind"].startswith("ASSISTANT: ")
        for key in ("new_tokens", "finish_reason", "hit_max_new_tokens", "model"):
            assert b["blind_meta"][key] == a["blind_meta"][key], key
        assert {**b["blind_meta"]["decode"], "engine": "hf"} == a["blind_meta"]["decode"]
        assert a["blind_meta"]["engine"] == "hf" and b["blind_meta"]["engine"] == "vllm"
        assert b["blind_meta"]["server_model"] == os.path.abspath(b["blind_meta"]["model_path"])
        assert b["blind_meta"]["finish_reason"] in ("stop", "length")
        assert b["blind_meta"]["hit_max_new_tokens"] == (b["blind_meta"]["new_tokens"] == MAX_NEW)
    # A random tiny model seldom says </s>: most responses run to max_new_tokens and are marked so.
    assert sum(r["blind_meta"]["finish_reason"] == "length" for r in server) > 24


def test_blind_prompt_reaches_the_server_without_image(vllm_server, sample_data_dir):
    """The token ids vLLM reports it decoded from: the hf path's blind ids, with no image token; the same record
    sent with its image (chat endpoint) does carry the image tokens, so the check can tell the two apart."""
    from bpo.config import DecodeConfig
    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_prompt, render_prompt
    from bpo.data.records import image_path, load_records
    from bpo.engines.server import ServerEngine, adds_bos, chat_messages

    chat = load_chat(vllm_server.model)
    tok = chat.tokenizer
    image_root = os.path.join(sample_data_dir, "images")
    records, _ = load_records(os.path.join(sample_data_dir, "train.jsonl"), image_root)
    records = [r for r in records if r.image is not None][:4]
    image_id = tok.convert_tokens_to_ids("<image>")
    engine = ServerEngine(DecodeConfig(engine="vllm", server_url=vllm_server.url, max_new_tokens=4),
                          vllm_server.model, tok, [tok.eos_token_id])
    engine.check_model()
    blind = [(render_prompt(r, chat, with_image=False), encode_prompt(r, chat, image_root, False)[0])
             for r in records]
    replies = engine.complete([(t, ids, adds_bos(tok, t)) for t, ids in blind], [0] * 4, [r.id for r in records])
    for (text, ids), reply in zip(blind, replies):
        assert "<image>" not in text
        assert reply.prompt_ids == ids and image_id not in reply.prompt_ids
    seen = [encode_prompt(r, chat, image_root, True)[0] for r in records]
    chats = [(chat_messages(chat.messages(r.turns, with_image=True), image_path(r, image_root)), ids,
              adds_bos(tok, render_prompt(r, chat))) for r, ids in zip(records, seen)]
    for ids, reply in zip(seen, engine.chat(chats, [0] * 4, [r.id for r in records])):
        assert reply.prompt_ids == ids and image_id in reply.prompt_ids
    engine.close()


def test_kill_mid_run_resumes_without_duplicates(blind_runs, tmp_path):
    _, server_out, server_cfg = blind_runs
    out = tmp_path / "resumed.jsonl"
    proc = run_single("generate_blind.py", server_cfg, [f"blind.output_file={out}"],
                      env={"BPO_CRASH_AFTER": "blind_shards:3"}, check=False)
    assert proc.returncode != 0 and not out.exists()
    done = [p for p in os.listdir(f"{out}.parts") if p.startswith("shard_")]
    assert len(done) == 3  # of 12
    proc = run_single("generate_blind.py", server_cfg, [f"blind.output_file={out}"])
    assert "3 already done" in proc.stdout
    resumed = rows(out)
    assert len({r["id"] for r in resumed}) == len(resumed) == 48
    assert open(out, "rb").read() == open(server_out, "rb").read()


def test_evaluation_on_the_server_equals_the_hf_path(vllm_server, sample_data_dir, tmp_path):
    def evaluate(name, **decode):
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", {
            "model": {"path": vllm_server.model, "dtype": "fp32"},
            "decode": {"max_new_tokens": MAX_NEW, "batch_size": 4, **decode},
            "eval": {"test_file": os.path.join(sample_data_dir, "test.json"), "reward_accuracy": False,
                     "image_root": os.path.join(sample_data_dir, "images"), "output_dir": str(out)},
        })
        run_single("evaluate.py", config)
        return rows(out / "results.jsonl"), json.load(open(out / "report.json"))

    hf_rows, hf_report = evaluate("hf")
    server_rows, server_report = evaluate("server", engine="vllm", server_url=vllm_server.url)
    assert len(server_rows) == 32  # 16 test records, each asked again with its image withheld (eval.modality_probe)
    assert all(r["response"] is not None and r["verdict"] for r in server_rows)
    for a, b in zip(hf_rows, server_rows):
        for key in ("id", "prompt", "response", "new_tokens", "finish_reason", "pairwise_answer", "verdict"):
            assert b.get(key) == a.get(key), (a["id"], key)  # probe copies have no pairwise answer
    assert server_report["safety"] == hf_report["safety"] and server_report["pairwise"] == hf_report["pairwise"]
    assert server_report["modality_probe"] == hf_report["modality_probe"]


def test_wrong_model_name_is_a_clear_error(vllm_server, sample_data_dir, tmp_path):
    config = blind_config(tmp_path / "cfg.yaml", vllm_server.model, sample_data_dir, engine="vllm",
                          server_url=vllm_server.url, server_model="llava-72b")
    proc = run_single("generate_blind.py", config, [f"blind.output_file={tmp_path / 'out.jsonl'}"],
                      check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert f"serves ['{vllm_server.model}'], not 'llava-72b'" in err and "decode.server_model" in err
    assert "Traceback" not in err


def test_dead_server_is_a_clear_error(served_model_dir, sample_data_dir, tmp_path):
    port = free_port()  # a loopback port nothing listens on
    config = blind_config(tmp_path / "cfg.yaml", served_model_dir, sample_data_dir, engine="vllm",
                          server_url=f"http://127.0.0.1:{port}/v1", server_retries=1, server_backoff_s=0.1)
    proc = run_single("generate_blind.py", config, [f"blind.output_file={tmp_path / 'out.jsonl'}"],
                      check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert f"generation server http://127.0.0.1:{port}/v1 did not answer (2 attempts" in err
    assert "Connection refused" in err and "Traceback" not in err
