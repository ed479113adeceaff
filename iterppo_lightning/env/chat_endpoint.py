"""A client for any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama, a hosted API).

The LLM customer and its judge can run behind such an endpoint instead of as an
in-process model (llm_customer.py). Only the standard library is used (urllib,
json, a thread pool), so no client package is needed.

Why it is built this way:

* One request per conversation, sent from a thread pool of `concurrency`
  workers: that is how these servers batch (continuous batching on their side),
  and the limit keeps a hosted API's rate limits and a laptop's Ollama sane.
* Retries with exponential backoff only where trying again can help: connection
  errors, timeouts, HTTP 429 and 5xx. Any other 4xx (a bad key, an unknown
  model) fails at once, with the server's own message.
* A batch is all or nothing: the first request that still fails after its
  retries cancels the rest and raises one `ChatEndpointError` naming the URL
  and the cause. The caller (a collection round) then writes nothing.
* The API key never sits in a config file: the config names an environment
  variable (`api_key_env`) and the key is read from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses worth another try; any other 4xx/5xx is the request's own fault (or a permanent one)."""


class ChatEndpointError(RuntimeError):
    """A chat endpoint could not answer: the message names the URL and the cause."""


@dataclass
class ChatEndpointConfig:
    """An OpenAI-compatible chat endpoint (``model.customer_endpoint`` / ``model.judge_endpoint`` of a run config)."""

    base_url: str = ""
    """The API root, e.g. ``http://localhost:8000/v1``; requests go to ``{base_url}/chat/completions``."""
    model: str = ""
    """The model name the server knows (the ``model`` field of each request)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as ``Authorization: Bearer``); ``null`` sends
    none. The key itself never goes in a config."""
    timeout_s: float = 60.0
    """Seconds to wait for one answer before the attempt counts as failed."""
    max_retries: int = 3
    """Further attempts after a connection error, a timeout, HTTP 429 or 5xx (0 = try once)."""
    backoff_s: float = 1.0
    """Wait before the first retry; it doubles with every further retry."""
    concurrency: int = 8
    """Most requests in flight at once."""
    temperature: float | None = None
    """Sampling temperature; ``null``: the customer uses ``llm_customer.temperature``, the judge 0."""
    max_tokens: int | None = None
    """Length cap of one answer; ``null``: the customer uses ``llm_customer.max_new_tokens``, the judge 8."""
    seed: int | None = None
    """When set, every request carries a seed derived from it and the conversation (for servers that honour
    ``seed``, e.g. vLLM and llama.cpp): a resumed run asks the same questions with the same seeds."""
    logprobs: bool = False
    """Judge only: ask for the first answer token's top log-probabilities and use P(yes) from them when the server
    returns them; otherwise (or when false) the answer text is read as yes (1.0) or no (0.0)."""

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def config_problems(cfg: ChatEndpointConfig, key: str, environ: dict[str, str] | None = None) -> list[str]:
    """Every invalid field of `cfg`, named as in a run config (``key.<field>``), the API key variable included."""
    env = os.environ if environ is None else environ
    out: list[str] = []
    if not isinstance(cfg.base_url, str) or not re.match(r"^https?://[^/\s]+", cfg.base_url or ""):
        out.append(f"{key}.base_url must be an http(s) URL such as http://localhost:8000/v1, got {cfg.base_url!r}")
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        out.append(f"{key}.model must name the model the server serves, got {cfg.model!r}")
    if cfg.api_key_env is not None:
        if not isinstance(cfg.api_key_env, str) or not cfg.api_key_env.strip():
            out.append(f"{key}.api_key_env must name an environment variable or be null, got {cfg.api_key_env!r}")
        elif not env.get(cfg.api_key_env):
            out.append(
                f"{key}.api_key_env names the environment variable {cfg.api_key_env}, which is not set "
                f"(export {cfg.api_key_env}=... or set {key}.api_key_env to null for a server without a key)"
            )
    if not cfg.timeout_s > 0:
        out.append(f"{key}.timeout_s must be > 0, got {cfg.timeout_s}")
    if cfg.max_retries < 0:
        out.append(f"{key}.max_retries must be >= 0, got {cfg.max_retries}")
    if cfg.backoff_s < 0:
        out.append(f"{key}.backoff_s must be >= 0, got {cfg.backoff_s}")
    if cfg.concurrency < 1:
        out.append(f"{key}.concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.temperature is not None and cfg.temperature < 0:
        out.append(f"{key}.temperature must be >= 0 or null, got {cfg.temperature}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        out.append(f"{key}.max_tokens must be >= 1 or null, got {cfg.max_tokens}")
    return out


@dataclass
class ChatRequest:
    """One chat completion to ask for."""

    messages: Messages
    temperature: float
    max_tokens: int
    seed: int | None = None
    logprobs: bool = False


@dataclass
class ChatAnswer:
    text: str
    top_logprobs: dict[str, float] | None = None
    """The first answer token's alternatives (token -> log-probability), when asked for and returned."""


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix."""


class ChatEndpoint:
    """Sends chat completions to one endpoint; `complete_many` runs a batch concurrently, all or nothing."""

    def __init__(self, config: ChatEndpointConfig, role: str = "chat", key: str = "endpoint") -> None:
        """role: what the endpoint plays (``customer``, ``judge``), for messages; key: its config key."""
        problems = config_problems(config, key)
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.role = role
        self.url = config.url
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key_env:
            self._headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"

    # ------------------------------------------------------------------ public
    def complete(self, request: ChatRequest, cancelled: threading.Event | None = None) -> ChatAnswer:
        """One completion, retried on transient failures; raises ChatEndpointError when it cannot be had.

        cancelled: set by `complete_many` when another request of the batch failed: no further retries.
        """
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._attempt(request)
            except _Retryable as err:
                if attempt + 1 == attempts or (cancelled is not None and cancelled.is_set()):
                    raise ChatEndpointError(
                        f"{self.role} endpoint {self.url}: {err} (gave up after {attempt + 1} attempt"
                        f"{'s' if attempt else ''})"
                    ) from None
                delay = self.config.backoff_s * 2**attempt
                log.warning("%s endpoint %s: %s; retrying in %.2f s", self.role, self.url, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        """Every request's answer, in order, at most `concurrency` in flight; the first failure fails the batch."""
        if not requests:
            return []
        workers = min(self.config.concurrency, len(requests))
        if workers == 1:
            return [self.complete(r) for r in requests]
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.role}-endpoint")
        cancelled = threading.Event()
        try:
            futures = [pool.submit(self.complete, r, cancelled) for r in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            cancelled.set()
            # Queued requests are dropped; the ones in flight finish (at most timeout_s) and are discarded.
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.config.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = 5
        return payload

    def _attempt(self, request: ChatRequest) -> ChatAnswer:
        body = json.dumps(self._payload(request)).encode("utf-8")
        http_request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            cause = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
            if err.code in RETRYABLE_STATUS:
                raise _Retryable(cause) from None
            hint = " (check the API key and its variable)" if err.code in (401, 403) else ""
            raise ChatEndpointError(f"{self.role} endpoint {self.url}: {cause}{hint}; not retried") from None
        except urllib.error.URLError as err:
            raise _Retryable(self._describe_network_error(err.reason)) from None
        except TimeoutError:
            raise _Retryable(f"no answer within timeout_s={self.config.timeout_s} s") from None
        except OSError as err:  # e.g. the connection dropped while the answer was read
            raise _Retryable(f"connection failed ({err})") from None
        return self._parse(raw)

    def _describe_network_error(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the server running at this address?)"
        if isinstance(reason, socket.gaierror):
            return f"the host name could not be resolved (DNS: {reason})"
        if isinstance(reason, TimeoutError):
            return f"no answer within timeout_s={self.config.timeout_s} s"
        return f"connection failed ({reason})"

    def _parse(self, raw: bytes) -> ChatAnswer:
        try:
            data = json.loads(raw)
        except ValueError:
            snippet = raw[:200].decode("utf-8", errors="replace")
            raise ChatEndpointError(
                f"{self.role} endpoint {self.url}: the answer is not JSON (is base_url the API root, "
                f"e.g. ending in /v1?): {snippet!r}"
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ChatEndpointError(
                f"{self.role} endpoint {self.url}: the answer has no 'choices' (not an OpenAI-compatible chat "
                f"completion): {json.dumps(data)[:200]}"
            )
        message = choices[0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise ChatEndpointError(
                f"{self.role} endpoint {self.url}: choices[0].message.content is missing or not text: "
                f"{json.dumps(choices[0])[:200]}"
            )
        return ChatAnswer(text=text, top_logprobs=_first_token_logprobs(choices[0]))


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI style ``{"error": {"message": ...}}``, or the body's start)."""
    try:
        raw = err.read()
    except OSError:
        return ""
    try:
        data = json.loads(raw)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:300]
        if isinstance(error, str):
            return error[:300]
    except ValueError:
        pass
    return raw[:300].decode("utf-8", errors="replace").strip()


def _first_token_logprobs(choice: dict) -> dict[str, float] | None:
    """``choices[0].logprobs.content[0].top_logprobs`` as token -> log-probability, or None when absent."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    top = content[0].get("top_logprobs")
    if not isinstance(top, list):
        return None
    out: dict[str, float] = {}
    for entry in top:
        if not isinstance(entry, dict):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        if isinstance(token, str) and isinstance(logprob, (int, float)):
            out[token] = float(logprob)
    return out or None


# ---------------------------------------------------------------------- the judge's answer
_YES_NO = re.compile(r"\b(yes|no)\b")


def yes_probability(answer: ChatAnswer) -> float | None:
    """P(yes) of a yes/no answer: from the first token's log-probabilities when they name yes or no, else the text
    (1.0 for yes, 0.0 for no, whichever word comes first); None when the answer says neither."""
    if answer.top_logprobs:
        yes = sum(math.exp(lp) for tok, lp in answer.top_logprobs.items() if tok.strip().lower() == "yes")
        no = sum(math.exp(lp) for tok, lp in answer.top_logprobs.items() if tok.strip().lower() == "no")
        if yes + no > 0:
            return yes / (yes + no)
    match = _YES_NO.search(answer.text.lower())
    if match is None:
        return None
    return 1.0 if match.group(1) == "yes" else 0.0


def request_seed(base: int | None, *parts: int) -> int | None:
    """A per-request seed from the configured one and the conversation's coordinates (stable across processes)."""
    if base is None:
        return None
    value = base
    for part in parts:
        value = (value * 1_000_003 + part) % 2**31
    return value
