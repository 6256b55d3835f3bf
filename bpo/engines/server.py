"""Generation on an OpenAI-compatible server (decode.engine=vllm): vLLM, or SGLang's compatible server.

    engine = ServerEngine(cfg.decode, served_name, tokenizer, stop_ids)
    engine.check_model()                                        # the server serves `served_name`, or a clear error
    replies = engine.complete([(text, ids, add_bos), ...], seeds)   # blind prompts: POST {url}/completions
    replies = engine.chat([(messages, ids, add_bos), ...], seeds)   # prompts with images: POST {url}/chat/completions

What keeps it equal to the hf path (bpo.engines.hf), which stays the reference:
- Blind prompts go to the completions endpoint as the exact text the hf path renders with the chat template, with
  `add_special_tokens` set the way bpo.data.encode tokenises it (a BOS unless the template wrote one), so the server
  does not re-render the conversation with a template of its own. Prompts with an image go to the chat endpoint as
  messages with the image inline (a base64 data URL), which is the only way these servers take pixels.
- Decoding stops on the same token ids (`stop_token_ids`), greedy is temperature 0, and sampling gets a seed per
  request.
- vLLM returns the prompt and completion token ids (`return_token_ids`). The prompt ids are compared with the ids
  the hf path would feed the model, and a difference stops the job: the server holds another tokenizer or chat
  template than the local model directory. The reply text is decoded here from the completion ids with the local
  tokenizer, exactly as the hf path decodes, so equal tokens give equal text (the server's own text differs in
  details such as an incomplete UTF-8 character at a cut). A server that returns no ids (SGLang) is used as it
  answers, its text and its token count, with a warning (once) that nothing was checked.

Requests run `decode.concurrency` at a time on a thread pool; connection errors, 429 and 5xx are retried with
back-off (bpo.engines.http). A request the server refuses with HTTP 400 (a prompt longer than its context) becomes
that row's error; any other refusal, or a server that stays unreachable, stops the job with the reason.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bpo.engines.http import GaveUp, HTTPStatusError, Retry, image_data_url, request_json
from bpo.runtime import dist

BACKOFF_MAX_S = 60.0


class ServerError(RuntimeError):
    pass


@dataclass
class Reply:
    text: str
    new_tokens: int  # completion tokens before the first stop token
    finish_reason: str  # "stop" (a stop token) or "length" (cut at max_new_tokens)
    prompt_ids: list = None  # the server's prompt token ids, when it returns them
    error: str = ""  # the server refused this request (HTTP 400); text is empty then
    token_ids: list = None  # the completion's ids, its stop token included when it stopped; None: not returned


def adds_bos(tokenizer, text):
    """Whether tokenising `text` should add the BOS token: the rule bpo.data.encode applies (templates such as
    Llama-3's and Gemma's write BOS themselves and must not get a second one)."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class ServerEngine:
    def __init__(self, decode, served_name, tokenizer, stop_ids, sleep=time.sleep):
        self.decode = decode
        self.base = decode.server_url.rstrip("/")
        self.served_name = served_name
        self.tokenizer = tokenizer
        self.stop_ids = [int(i) for i in stop_ids]
        self._sleep = sleep
        self._pool = ThreadPoolExecutor(max_workers=decode.concurrency, thread_name_prefix="bpo-server")
        self.server_ids = True  # False once a reply came without token ids (see the module docstring)
        self._lock = threading.Lock()

    def _retry(self):
        return Retry(max_retries=self.decode.server_retries, backoff_s=self.decode.server_backoff_s,
                     backoff_max_s=BACKOFF_MAX_S, sleep=self._sleep)

    def _call(self, path, payload=None):
        url = self.base + path
        try:
            return request_json(url, payload, retry=self._retry(), timeout_s=self.decode.server_timeout_s)
        except GaveUp as e:
            raise ServerError(f"generation server {self.base} did not answer ({e.attempts} attempts, last error: "
                              f"{e.last}). Is it running and is decode.server_url right? slurm/vllm_serve.sh "
                              f"starts one; `curl {self.base}/models` should list the model.") from None

    def check_model(self):
        """The served model entry for `served_name`; raises when the server serves something else."""
        try:
            listing = json.loads(self._call("/models"))
            served = {m["id"]: m for m in listing["data"]}
        except HTTPStatusError as e:
            raise ServerError(f"{self.base}/models answered HTTP {e.status}: is {self.base} the API base of an "
                              f"OpenAI-compatible server (it usually ends in /v1)? {e.body[:300]}") from None
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.base}/models did not return an OpenAI model list; is decode.server_url the "
                              f"API base of an OpenAI-compatible server?") from None
        if self.served_name not in served:
            raise ServerError(f"the server at {self.base} serves {sorted(served)}, not {self.served_name!r}. Start "
                              f"it with this model (vllm serve MODEL --served-model-name NAME) or set "
                              f"decode.server_model to the name it serves this checkpoint under.")
        return served[self.served_name]

    def describe(self):
        d = self.decode
        return (f"server engine: model {self.served_name!r} at {self.base}, {d.concurrency} requests in flight, "
                f"{d.server_retries} retries")

    def _payload(self, max_new_tokens, seed, add_bos):
        d = self.decode
        body = {"model": self.served_name, "max_tokens": max_new_tokens, "n": 1,
                "stop_token_ids": self.stop_ids, "skip_special_tokens": True,
                "add_special_tokens": add_bos, "return_token_ids": True}
        if d.do_sample:
            body.update(temperature=d.temperature, top_p=d.top_p, seed=seed)
        else:
            body.update(temperature=0.0, top_p=1.0)  # temperature 0 is greedy on vLLM and SGLang
        return body

    def _one(self, path, body, local_ids, where):
        try:
            reply = json.loads(self._call(path, body))
        except HTTPStatusError as e:
            if e.status == 400:
                return Reply("", 0, "error", None, f"server refused the request: HTTP 400: {e.body[:300]}")
            raise ServerError(f"{where}: the server refused the request: HTTP {e.status}: {e.body[:1000]}") from None
        except ValueError:
            raise ServerError(f"{where}: the server's reply is not JSON") from None
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{where}: the server's reply has no choices: {str(reply)[:300]}") from None
        prompt_ids = choice.get("prompt_token_ids") or reply.get("prompt_token_ids")
        if prompt_ids is not None and list(prompt_ids) != list(local_ids):
            i = _first_difference(prompt_ids, local_ids)
            raise ServerError(
                f"{where}: the server tokenised the prompt differently from the local model directory (first "
                f"difference at token {i}: server {list(prompt_ids[i:i + 8])}, local {list(local_ids[i:i + 8])}; "
                f"{len(prompt_ids)} vs {len(local_ids)} tokens). It serves another tokenizer or chat template: serve "
                f"the same checkpoint directory the job reads.")
        finish = choice.get("finish_reason")
        if finish not in ("stop", "length"):
            raise ServerError(f"{where}: the server ended the reply with finish_reason {finish!r}")
        ids = choice.get("token_ids")
        if ids is None:  # no token ids from this server: take its text and count as they come
            with self._lock:
                if self.server_ids:
                    print(f"warning: {self.base} returns no token ids (not vLLM?): prompts are not checked against "
                          f"the local tokenizer, and replies are the server's own text", flush=True)
                self.server_ids = False
            text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content") or ""
            n = int((reply.get("usage") or {}).get("completion_tokens", 0))
        else:
            stops = set(self.stop_ids)
            n = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            ids = list(ids[:n + 1])
        return Reply(text.strip(), n, finish, prompt_ids, token_ids=ids)

    def _run(self, path, bodies, prompts, wheres):
        futures = [self._pool.submit(self._one, path, b, ids, w) for b, ids, w in zip(bodies, prompts, wheres)]
        try:
            return [f.result() for f in futures]  # input order
        except BaseException:
            for f in futures:  # one fatal error: drop what has not started instead of sending it too
                f.cancel()
            raise

    def complete(self, prompts, seeds, wheres, max_new_tokens=None):
        """prompts: list of (text, local_ids, add_bos) -> list of Reply, in order, from /completions."""
        n = max_new_tokens or self.decode.max_new_tokens
        bodies = [dict(self._payload(n, s, bos), prompt=text) for (text, _, bos), s in zip(prompts, seeds)]
        return self._run("/completions", bodies, [p[1] for p in prompts], wheres)

    def chat(self, prompts, seeds, wheres, max_new_tokens=None, template_kwargs=None):
        """prompts: list of (messages, local_ids, add_bos) -> list of Reply, in order, from /chat/completions.
        template_kwargs (data.chat_template_kwargs) go as the request's chat_template_kwargs (vLLM, SGLang)."""
        n = max_new_tokens or self.decode.max_new_tokens
        extra = {"chat_template_kwargs": dict(template_kwargs)} if template_kwargs else {}
        bodies = [dict(self._payload(n, s, bos), messages=msgs, **extra) for (msgs, _, bos), s in zip(prompts, seeds)]
        return self._run("/chat/completions", bodies, [p[1] for p in prompts], wheres)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def connect(decode, model_path, tokenizer, stop_ids):
    """A ServerEngine for decode.server_url whose server is checked to serve the configured model."""
    engine = ServerEngine(decode, decode.server_model or model_path, tokenizer, stop_ids)
    entry = engine.check_model()
    dist.print0(f"{engine.describe()}; the server reports max_model_len {entry.get('max_model_len', 'unknown')}")
    return engine


def chat_messages(messages, image_path):
    """bpo.data.conversation.to_messages output -> OpenAI chat messages, each image part carrying the file inline."""
    url = None
    out = []
    for m in messages:
        if isinstance(m["content"], str):  # a text turn for a template that prints content as it is (Chat.text_content)
            out.append({"role": m["role"], "content": m["content"]})
            continue
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                if url is None:
                    with open(image_path, "rb") as f:
                        url = image_data_url(f.read())
                content.append({"type": "image_url", "image_url": {"url": url}})
            else:
                content.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": content})
    return out
