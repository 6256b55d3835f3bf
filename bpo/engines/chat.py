"""The client of an OpenAI-compatible chat-completions endpoint (POST {url}/chat/completions), as the openai judge
(bpo.eval.judges) and the data builder (bpo.build_data.llm) both ask one.

    chat = ChatEndpoint(url, "OPENAI_API_KEY", "build.llm", max_retries=5, backoff_s=1.0, backoff_max_s=60.0,
                        timeout_s=120.0)
    body = chat.post({"model": model, "messages": [...], "max_tokens": 16})   # the reply body, as text
    content, finish_reason = read_completion(body)                            # ValueError: not a chat completion

The API key is read from the environment variable the config names (never from the config itself) and sent as a
bearer token; only a localhost endpoint may run without one. Requests go through bpo.engines.http (retries on
connection errors, 429 and 5xx; redirects refused), and `post` raises what request_json raises (HTTPStatusError,
GaveUp, RedirectRefused): what each means for a job (a record's problem, a stopped job, an unreadable verdict) is
the caller's to say. What an answer is cached under is the caller's too: a verdict and a data-building answer depend
on different things. `stats` counts requests, retries and the caller's cache hits across worker threads.
"""

import json
import os
import random
import threading
import time

from bpo.config import ConfigError
from bpo.engines.http import Retry, is_local, request_json


class ChatEndpoint:
    """`section` is the config section the endpoint comes from (eval.judge, build.llm), named in the key error.
    `sleep` and `rng` reach the retry loop, so tests do not wait and jitter can be seeded."""

    def __init__(self, url, api_key_env, section, max_retries, backoff_s, backoff_max_s, timeout_s, sleep=time.sleep,
                 rng=None):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if not self.api_key and not is_local(url):
            name = api_key_env or f"({section}.api_key_env is empty)"
            raise ConfigError(f"{section}.url {url} needs an API key: set the environment variable {name} "
                              f"({section}.api_key_env names it); only a localhost endpoint may run without a key")
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def count(self, name):
        with self._lock:
            self.stats[name] += 1

    def key_source(self):
        """How the key was found, for a describe() line."""
        return f"key from ${self.api_key_env}" if self.api_key else "no API key"

    def post(self, payload):
        """POST `payload` (a chat-completions request) and return the reply body as text."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        retry = Retry(max_retries=self.max_retries, backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s,
                      sleep=self._sleep, rng=self._rng, on_attempt=lambda: self.count("requests"),
                      on_retry=lambda: self.count("retries"))
        return request_json(self.endpoint, payload, retry=retry, timeout_s=self.timeout_s, headers=headers)


def read_completion(body):
    """A reply body -> (content, finish_reason) of its first choice; content as the reply holds it (null for a tool
    call, so not always a string), finish_reason "" when absent. ValueError when the body is not a chat completion."""
    try:
        choice = json.loads(body)["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {body[:300]!r}") from None
    return content, str(choice.get("finish_reason") or "")
