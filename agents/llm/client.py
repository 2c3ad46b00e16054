"""A client of an OpenAI-compatible completions endpoint, for the LLM agent (``LLMAgent(endpoint=URL)``).

It needs two things of the server: ``GET /v1/models`` and ``POST /v1/completions`` answering ``echo: true`` with
``logprobs`` (the log-probability of every prompt token). rudder's own service (:mod:`rudder.agents.llm.server`) does;
so does vLLM's OpenAI server. Only the standard library is used (``urllib``); every failure is an
:class:`EndpointError` whose message is one line naming the endpoint and what went wrong.

Access: every request carries ``Authorization: Bearer TOKEN``, the token being ``api_key`` if given, else
``$RUDDER_LLM_TOKEN`` (what ``train.py --llm-service auto`` hands its trainers for the job's own service), else
``$OPENAI_API_KEY`` (the convention of OpenAI's clients, for a user's own endpoint); none is sent without one.

Transient failures (a connection refused or reset, HTTP 503 or 429: a service starting, restarting or busy) are
retried up to ``attempts`` times with exponential backoff and jitter (honouring ``Retry-After``), so that many
trainers asking at once do not fail on a full listen queue; a timeout is not retried (the service was computing).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request

SERVICE_HINT = "start one with: python -m rudder.agents.llm.server --model smollm2 --port PORT"
TOKEN_VARS = ("RUDDER_LLM_TOKEN", "OPENAI_API_KEY")  # where the bearer token is looked for, in this order
RETRY_STATUSES = (429, 503)
TRANSIENT = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


class EndpointError(ValueError):
    """The endpoint cannot be used: unreachable, not the OpenAI API, or without the model asked for."""


def base_url(url: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/`` -> ``http://host:port/v1``."""
    url = str(url).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"LLM endpoint {url!r}: expected an http:// or https:// URL (e.g. http://127.0.0.1:8011)")
    return url if url.endswith("/v1") else url + "/v1"


class EndpointClient:
    """Talks to ``url`` (``http://host:port`` or ``.../v1``); ``model`` None: the first model it lists.

    ``api_key``: the bearer token (None: from the environment, see above); ``attempts``: tries per request on a
    transient failure, the ``k``-th retry after about ``backoff_s * 2**k`` seconds (at most ``max_backoff_s``)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        attempts: int = 6,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ):
        self.url = base_url(url)
        self.timeout_s = float(timeout_s)
        if api_key is None:
            api_key = next((os.environ[v] for v in TOKEN_VARS if os.environ.get(v)), None)
        self.api_key = api_key or None
        self.attempts = max(1, int(attempts))
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.retries = 0  # transient failures retried, over this client's life
        self._random = random.Random()
        served = self.models()
        if model is None:
            if not served:
                raise EndpointError(f"LLM endpoint {self.url}: /v1/models lists no model")
            model = served[0]
        elif model not in served:
            raise EndpointError(
                f"LLM endpoint {self.url}: model {model!r} is missing (it serves: {', '.join(served) or 'nothing'})"
            )
        self.model = model

    def _pause(self, attempt: int, retry_after: str | None = None) -> None:
        """Sleep before retry ``attempt`` (0-based): exponential backoff with jitter, or the server's
        ``Retry-After`` if longer (both at most ``max_backoff_s``)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + self._random.random())
        try:
            delay = max(delay, min(self.max_backoff_s, float(retry_after)))
        except (TypeError, ValueError):
            pass
        self.retries += 1
        time.sleep(delay)

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        t0 = time.monotonic()
        for attempt in range(self.attempts):
            last = attempt + 1 == self.attempts
            req = urllib.request.Request(
                self.url + path, data=data, method="GET" if body is None else "POST", headers=headers
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUSES and not last:
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    exc.close()
                    self._pause(attempt, retry_after)
                    continue
                hint = ""
                if exc.code == 401:
                    hint = f" (token sent: {'yes' if self.api_key else 'none'}; set ${' or $'.join(TOKEN_VARS)})"
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                raise EndpointError(
                    f"LLM endpoint {self.url}{path}: HTTP {exc.code}: {_error_message(exc)}{hint}{tries}"
                ) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                    raise EndpointError(
                        f"LLM endpoint {self.url}{path}: no answer within {self.timeout_s:g} s"
                    ) from None
                transient = isinstance(reason, TRANSIENT) or isinstance(exc, (*TRANSIENT, http.client.HTTPException))
                if transient and not last:
                    self._pause(attempt)
                    continue
                tries = f"; {attempt + 1} attempts in {time.monotonic() - t0:.1f} s" if attempt else ""
                raise EndpointError(f"LLM endpoint {self.url}: unreachable ({reason}{tries}); {SERVICE_HINT}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise EndpointError(
                f"LLM endpoint {self.url}{path}: the answer is not JSON (is this an OpenAI-compatible "
                f"API?): {raw[:80]!r}"
            ) from None

    def models(self) -> list[str]:
        """Ids of the models the endpoint serves."""
        got = self._request("/models")
        data = got.get("data") if isinstance(got, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise EndpointError(
                f"LLM endpoint {self.url}/models: expected the OpenAI shape "
                f'{{"data": [{{"id": ...}}]}}, got {_shape(got)}'
            )
        return [m["id"] for m in data]

    def echo_logprobs(self, prompts: list[str]) -> list[dict]:
        """Per prompt: ``tokens``, ``token_logprobs`` and ``text_offset`` (may be None) of every prompt token."""
        got = self._request(
            "/completions", dict(model=self.model, prompt=prompts, max_tokens=0, echo=True, logprobs=0, temperature=0)
        )
        choices = got.get("choices") if isinstance(got, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise EndpointError(
                f"LLM endpoint {self.url}/completions: expected {len(prompts)} choices, got {_shape(got)}"
            )
        out = [None] * len(prompts)
        for c in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            lp = c.get("logprobs") if isinstance(c, dict) else None
            if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
                raise EndpointError(
                    f"LLM endpoint {self.url}/completions: answered without echo log-probabilities "
                    f"(choice keys {sorted(c) if isinstance(c, dict) else type(c).__name__}): it "
                    "must support echo with logprobs"
                )
            out[int(c.get("index", 0))] = lp
        return out

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> dict:
        """Generated text for ``prompt``: ``text`` and ``completion_tokens``."""
        body = dict(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=temperature)
        if seed is not None:
            body["seed"] = seed
        got = self._request("/completions", body)
        try:
            text = got["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"LLM endpoint {self.url}/completions: expected choices[0].text, got {_shape(got)}"
            ) from None
        usage = got.get("usage") or {}
        return dict(
            text=text,
            completion_tokens=int(usage.get("completion_tokens", 0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
        )


def _shape(obj) -> str:
    if isinstance(obj, dict):
        return "an object with keys " + (", ".join(sorted(obj)[:8]) or "none")
    return f"a {type(obj).__name__}"


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return str(msg or body)[:200]
    except Exception:  # noqa: BLE001 - any unreadable error body: the reason phrase is enough
        return str(exc.reason)
