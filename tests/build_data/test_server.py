"""The LLM stages' HTTP path against the real vLLM CPU server (tests/servers.py) serving the tiny random model: its
answers are noise, so what is tested is the plumbing: a chat request answered, a malformed answer re-asked with a
new request and the record reported after max_attempts, the answers cached so that a rerun asks nothing and decides
the same, a request over the server's context refused for that record only, and a wrong model name stopping the
job with the server's reason."""

import os

import pytest

from bpo.build_data.entity import LLMRecognizer
from bpo.build_data.llm import ChatClient, LLMError
from bpo.build_data.report import Drop
from bpo.config import from_dict

pytestmark = pytest.mark.server
ANSWER_CODES = {"not_json", "bad_field", "not_in_request", "bad_type"}  # what noise can be read as


def recognizer(server, cache_dir, model=None):
    b = from_dict({"build": {"llm": {"url": server.url, "model": model or server.model, "max_attempts": 3},
                             "entity": {"max_tokens": 16}}}).build
    client = ChatClient(b.llm, str(cache_dir))
    return LLMRecognizer(b, client), client


def cached_files(cache_dir):
    return sorted(f for _, _, fs in os.walk(cache_dir) for f in fs)


def test_noise_is_reasked_then_reported_and_a_rerun_replays_it(vllm_server, tmp_path):
    rec, client = recognizer(vllm_server, tmp_path / "cache")
    with pytest.raises(Drop) as first:
        rec.recognize("Where does Barack Obama live?", None)
    assert first.value.code in ANSWER_CODES
    assert first.value.reason.startswith("no usable answer in 3 attempt(s); last: ")
    # three different requests (each re-ask carries the last answer and its problem), all answered and cached
    assert client.stats == {"requests": 3, "retries": 0, "cache_hits": 0}
    assert len(cached_files(tmp_path / "cache")) == 3

    again, client2 = recognizer(vllm_server, tmp_path / "cache")
    with pytest.raises(Drop) as second:
        again.recognize("Where does Barack Obama live?", None)
    assert (second.value.code, second.value.reason) == (first.value.code, first.value.reason)
    assert client2.stats == {"requests": 0, "retries": 0, "cache_hits": 3}


def test_a_request_over_the_server_s_context_is_that_record_s_drop(vllm_server, tmp_path):
    rec, client = recognizer(vllm_server, tmp_path / "cache")
    with pytest.raises(Drop, match="the endpoint refused the request: HTTP 400") as e:
        rec.recognize("Is Barack Obama tall? " * 150, None)  # far past the server's 512 tokens
    assert e.value.code == "refused" and client.stats["requests"] == 1
    assert cached_files(tmp_path / "cache") == []  # a refusal is no answer


def test_a_model_the_server_does_not_serve_stops_the_job(vllm_server, tmp_path):
    rec, _ = recognizer(vllm_server, tmp_path / "cache", model="llava-72b")
    with pytest.raises(LLMError, match="refused the request: HTTP 404.*llava-72b"):
        rec.recognize("Where does Barack Obama live?", None)
