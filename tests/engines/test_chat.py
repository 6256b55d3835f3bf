"""bpo.engines.chat: reading a chat-completions reply, and the API-key rule (the fake endpoints of
tests/eval/test_judges.py and tests/build_data/ hold the requests and retries)."""

import json

import pytest

from bpo.config import ConfigError
from bpo.engines.chat import ChatEndpoint, read_completion


def test_read_completion():
    body = json.dumps({"choices": [{"message": {"content": "safe"}, "finish_reason": "length"}]})
    assert read_completion(body) == ("safe", "length")
    assert read_completion(json.dumps({"choices": [{"message": {"content": None}}]})) == (None, "")
    for bad in ("not json", "{}", '{"choices": []}', '{"choices": ["x"]}', '{"choices": [{"text": "x"}]}'):
        with pytest.raises(ValueError, match="not a chat completion"):
            read_completion(bad)


def test_a_remote_endpoint_needs_a_key_named_by_its_section(monkeypatch):
    monkeypatch.delenv("BPO_TEST_CHAT_KEY", raising=False)
    kwargs = dict(max_retries=0, backoff_s=1.0, backoff_max_s=1.0, timeout_s=1.0)
    with pytest.raises(ConfigError, match=r"build.llm.url https://h.invalid/v1 needs an API key: .*BPO_TEST_CHAT_KEY"):
        ChatEndpoint("https://h.invalid/v1", "BPO_TEST_CHAT_KEY", "build.llm", **kwargs)
    local = ChatEndpoint("http://127.0.0.1:8000/v1/", "BPO_TEST_CHAT_KEY", "eval.judge", **kwargs)
    assert local.endpoint == "http://127.0.0.1:8000/v1/chat/completions" and local.key_source() == "no API key"
    monkeypatch.setenv("BPO_TEST_CHAT_KEY", "k")
    remote = ChatEndpoint("https://h.invalid/v1", "BPO_TEST_CHAT_KEY", "build.llm", **kwargs)
    assert remote.key_source() == "key from $BPO_TEST_CHAT_KEY"
