"""JSON over HTTP with retries, for the OpenAI-compatible endpoints bpo talks to (the judge, the generation server).

    body = request_json(url, payload, retry=Retry(max_retries=5), timeout_s=120)   # POST; payload=None: GET

stdlib only (urllib), so the client side needs no extra package. Redirects are refused (`RedirectRefused`): the
headers, an API key included, would follow them to another host. HTTP 429, 5xx and connection errors are retried
up to `max_retries` times, waiting Retry-After when the server sends it, else backoff_s * 2**attempt (capped at
backoff_max_s) with jitter in its upper half; any other status raises `HTTPStatusError` at once, and giving up
raises `GaveUp`, both with the reply or the last error in the message.
"""

import base64
import email.utils
import http.client
import ipaddress
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

MAX_RETRY_AFTER_S = 600.0  # a Retry-After longer than this is treated as this (a typo'd header must not hang a run)


class RequestError(RuntimeError):
    pass


class HTTPStatusError(RequestError):
    """A reply that retrying will not change (4xx other than 429)."""

    def __init__(self, url, status, body):
        self.url, self.status, self.body = url, status, body
        super().__init__(f"{url}: HTTP {status}: {body[:2000]}")


class RedirectRefused(RequestError):
    """The server answered with a redirect, which is never followed: urllib would send the same headers, an API key
    included, to whatever host the Location names, and that host's reply would be read as the answer."""

    def __init__(self, url, status, location):
        self.url, self.status, self.location = url, status, location
        super().__init__(f"{url} answered HTTP {status}, a redirect to {location}; redirects are not followed")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise RedirectRefused(req.full_url, code, newurl)


_OPENER = urllib.request.build_opener(_RefuseRedirects())


class GaveUp(RequestError):
    """Every attempt failed with a retryable error."""

    def __init__(self, url, attempts, last):
        self.url, self.attempts, self.last = url, attempts, last
        super().__init__(f"{url}: gave up after {attempts} attempts; last error: {last}")


@dataclass
class Retry:
    max_retries: int = 5  # retries after the first attempt
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    sleep: object = time.sleep  # injectable, so tests do not wait
    rng: random.Random = field(default_factory=random.Random)
    on_attempt: object = None  # called once per request sent (for counters)
    on_retry: object = None  # called once per retry


def is_local(url):
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_data_url(data):
    """Image file bytes -> a base64 data URL, the way chat-completions endpoints take an inline image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        raise ValueError("image is not PNG, JPEG, GIF or WebP, the formats chat-completions endpoints take")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def retry_after_s(value):
    """Retry-After header (seconds or an HTTP date) -> seconds to wait, or None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def read_error_body(err):
    try:
        return err.read().decode("utf-8", errors="replace")
    except Exception:  # the body of a failed response may itself fail to read; the status code still says enough
        return ""


def request_json(url, payload=None, retry=None, timeout_s=120.0, headers=None):
    """POST `payload` as JSON (GET when None) and return the reply body as text, retrying as the module says."""
    retry = retry or Retry()
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    attempt = 0
    while True:
        request = urllib.request.Request(url, data=data, headers=all_headers, method="GET" if data is None else "POST")
        if retry.on_attempt:
            retry.on_attempt()
        wait = None
        try:
            with _OPENER.open(request, timeout=timeout_s) as resp:
                return resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            text = read_error_body(e)
            if e.code != 429 and e.code < 500:
                raise HTTPStatusError(url, e.code, text) from None
            wait = retry_after_s(e.headers.get("Retry-After") if e.headers else None)
            last = f"HTTP {e.code}: {text[:200]}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt >= retry.max_retries:
            raise GaveUp(url, attempt + 1, last)
        if wait is None:
            cap = min(retry.backoff_max_s, retry.backoff_s * 2 ** attempt)
            wait = cap / 2 + retry.rng.uniform(0, cap / 2)
        if retry.on_retry:
            retry.on_retry()
        retry.sleep(wait)
        attempt += 1
