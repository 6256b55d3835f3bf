"""The data builder's LLM client: chat completions on an OpenAI-compatible endpoint, answers cached by content hash,
and a bounded re-ask loop for answers that cannot be used.

    client = ChatClient(cfg.build.llm, cache_dir)
    answer = client.ask(messages, max_tokens)                        # Answer(content, finish_reason, cached)
    outcome = ask_until_valid(client, messages, max_tokens, parse, max_attempts)

Requests go through bpo.engines.chat (retries on connection errors, 429 and 5xx; redirects refused), temperature
build.llm.temperature (0: greedy). Every answer the endpoint gives is cached under sha256 of (model, messages,
temperature, max_tokens), whatever it holds: deciding that an answer is unusable is this side's rule, so a rerun with
the same cache replays the same answers and re-asks, and makes the same records. The endpoint's URL is not in the
key (a server that moved answers the same). A cache entry can also be written by hand (`ChatClient.key` gives its
key), which is how the tests give well-formed answers.

Re-asking: when `parse(content)` finds a problem, the next request is the original messages followed by the
unusable answer (cut to ECHO_CHARS) and a user turn saying what was wrong, so the endpoint is asked something new
(the same request at temperature 0 would get the same answer). Only the last failed exchange is kept, so a request
never grows past the prompt plus one answer and one correction. After `max_attempts` answers the record is reported
with the last problem.

HTTP 400 for one request (a prompt longer than the endpoint's context) is that record's problem (`Refused`); any
other refusal, an endpoint that stays unreachable or a reply that is not a chat completion stops the job
(`LLMError`), since it would fail every record alike.
"""

import json
import re
import time
from dataclasses import dataclass

from bpo.engines.cache import AnswerCache
from bpo.engines.chat import ChatEndpoint, read_completion
from bpo.engines.http import GaveUp, HTTPStatusError, RedirectRefused

CACHE_FORMAT = "bpo-build-answer-v1"
ECHO_CHARS = 400  # of an unusable answer, repeated back when re-asking
REASK = "That answer cannot be used: {problem}. Answer again with only the JSON object described above."
BACKOFF_MAX_S = 60.0


class LLMError(RuntimeError):
    """The endpoint cannot answer this job at all; the message names it and the reason."""


class Refused(Exception):
    """The endpoint refused one request (HTTP 400), e.g. a prompt longer than its context."""


@dataclass(frozen=True)
class Answer:
    content: str
    finish_reason: str
    cached: bool


@dataclass(frozen=True)
class Problem:
    code: str  # short, for the report's counts: not_json, bad_field, not_in_request, bad_type, leak, ...
    text: str  # said to the endpoint when re-asking, and in the report

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Outcome:
    value: object  # what parse returned for the accepted answer; None when none was accepted
    attempts: int
    problem: Problem | None  # the last answer's problem when no answer was accepted
    last_answer: str  # the last answer's content


def fill(template, **values):
    """Put `values` into `{name}` placeholders in one pass, so a "{request}" inside a value stays text."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def find_json_object(text):
    """The first JSON object in `text`, or None. Models wrap JSON in prose or ``` fences; any "{" that starts a
    complete object counts, the rest of the text is ignored."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text or ""):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


class ChatClient:
    """build.llm's endpoint (bpo.engines.chat) with a content-hash answer cache. `sleep` and `rng` reach the retry
    loop."""

    def __init__(self, llm, cache_dir, sleep=time.sleep, rng=None):
        self.cfg = llm
        self.chat = ChatEndpoint(llm.url, llm.api_key_env, "build.llm", max_retries=llm.max_retries,
                                 backoff_s=llm.backoff_s, backoff_max_s=BACKOFF_MAX_S, timeout_s=llm.timeout_s,
                                 sleep=sleep, rng=rng)
        self.endpoint = self.chat.endpoint
        self.cache = AnswerCache(cache_dir)
        self.stats = self.chat.stats

    def describe(self):
        return (f"model {self.cfg.model!r} at {self.endpoint} ({self.chat.key_source()}, temperature "
                f"{self.cfg.temperature}, {self.cfg.workers} requests in flight, cache {self.cache.directory})")

    def key(self, messages, max_tokens):
        return AnswerCache.digest(CACHE_FORMAT, self.cfg.model, messages, float(self.cfg.temperature), max_tokens)

    def ask(self, messages, max_tokens):
        key = self.key(messages, max_tokens)
        hit = self.cache.get(key)
        if hit is not None and isinstance(hit.get("content"), str):
            self.chat.count("cache_hits")
            return Answer(hit["content"], str(hit.get("finish_reason", "")), True)
        payload = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                   "max_tokens": max_tokens, "n": 1}
        body = self._post(payload)
        try:
            content, finish_reason = read_completion(body)
        except ValueError:
            raise LLMError(f"{self.endpoint} answered with something that is not a chat completion: "
                           f"{body[:300]!r}") from None
        content = content if isinstance(content, str) else ""  # null content (a tool call): an empty answer
        answer = Answer(content, finish_reason, False)
        self.cache.put(key, {"content": answer.content, "finish_reason": answer.finish_reason,
                             "model": self.cfg.model})
        return answer

    def _post(self, payload):
        try:
            return self.chat.post(payload)
        except HTTPStatusError as e:
            if e.status == 400:
                raise Refused(f"the endpoint refused the request: HTTP 400: {e.body[:300]}") from None
            who = " (is the key in $" + self.cfg.api_key_env + " right?)" if e.status in (401, 403) else ""
            raise LLMError(f"{self.endpoint} refused the request: HTTP {e.status}{who}: {e.body[:500]}") from None
        except GaveUp as e:
            raise LLMError(f"{self.endpoint} did not answer ({e.attempts} attempts, last error: {e.last}); is the "
                           f"server running and build.llm.url its API base (usually ending in /v1)?") from None
        except RedirectRefused as e:
            raise LLMError(f"{e.url} answered HTTP {e.status}, a redirect to {e.location}; redirects are not "
                           f"followed (the API key would go along): set build.llm.url to the endpoint itself") from None


def ask_until_valid(client, messages, max_tokens, parse, max_attempts):
    """Ask until `parse(content)` -> (value, None) accepts an answer, at most `max_attempts` times.

    parse returns (value, None) for a usable answer or (None, Problem). Refused propagates (the record's problem)."""
    request = list(messages)
    answer, problem = None, None
    for attempt in range(1, max_attempts + 1):
        answer = client.ask(request, max_tokens)
        value, problem = parse(answer.content)
        if problem is None:
            return Outcome(value, attempt, None, answer.content)
        if answer.finish_reason == "length":
            problem = Problem(problem.code, f"{problem.text} (the answer was cut at {max_tokens} tokens)")
        request = list(messages) + [
            {"role": "assistant", "content": answer.content[:ECHO_CHARS]},
            {"role": "user", "content": REASK.format(problem=problem.text)},
        ]
    return Outcome(None, max_attempts, problem, answer.content)
