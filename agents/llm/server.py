"""A small decision service: one transformers model per host, for every trainer of that host, over the
OpenAI-compatible completions API.

    python -m rudder.agents.llm.server --model smollm2 --port 8011          # listens on 127.0.0.1:8011

Endpoints (the OpenAI legacy completions API, the subset an LLM agent needs):

- ``GET /v1/models``: the one model served (``{"object": "list", "data": [{"id": NAME, ...}]}``).
- ``POST /v1/completions`` with ``model``, ``prompt`` (a string or a list of strings: one choice each),
  ``max_tokens`` (0 with ``echo``: score the prompt only), ``echo``, ``logprobs`` (top alternatives per token, 0-20),
  ``temperature`` and ``seed``. ``choices[i].logprobs`` holds ``tokens``, ``token_logprobs`` (the first token's is
  null), ``top_logprobs`` and ``text_offset``, as OpenAI defines them.
- ``POST /v1/chat/completions``: greedy or sampled chat answers (no log-probabilities), for checking by hand.
- ``GET /stats`` (rudder's own): scoring batches, forward passes, prompts scored, tokens prefilled, prefixes kept.

Why a service: every trainer rank that builds an LLM agent would otherwise load its own copy of the model (about
1.1 GB for SmolLM2-135M in fp32). The service loads it once; an agent started with ``endpoint=URL`` sends it
text and gets log-probabilities back, so the agent can equally be pointed at vLLM or another server that speaks
this API with ``echo`` + ``logprobs``.

Batching: HTTP requests are handled on threads; the prompts they carry are queued and one worker thread takes
everything queued (waiting up to ``--batch-window-ms`` after the first arrival) and scores it in as few forward passes
as a token budget allows, however many clients sent them. Prompt prefixes recur (every decision of a trainer repeats
its system message and examples): the service keeps the KV cache of up to ``--prefix-entries`` shared prefixes,
found as the longest common token prefix of a new prompt with the prompts of earlier batches, and then prefills only
what follows; when the prompts of one request share more than that (an agent's options), the shared part is
prefilled once first. Rows with different cached prefixes share one forward pass: their caches are left-padded to one
length
and masked, each row keeping its own positions. Generation (``max_tokens > 0``) runs one prompt at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_TOP_LOGPROBS = 20  # as OpenAI's legacy API: logprobs is at most 5 there; vLLM allows 20
DEFAULT_TOKEN_BUDGET = 2048  # prompt tokens per forward pass (rows x longest new part): bounds the logits' memory
MIN_PREFIX_TOKENS = 32
PLAIN_HEAD_MODELS = ("llama", "qwen2", "qwen3", "mistral")
SHARED_MIN_NEW = 16  # a request's shared part is prefilled on its own first when it is this much longer than kept


@dataclass
class PrefixEntry:
    """The KV cache of a prompt prefix seen before, with what echo needs about its tokens."""

    tokens: tuple[int, ...]
    keys: list  # per layer, (1, kv_heads, L, head_dim)
    values: list
    token_logprobs: list  # log p(token i | tokens < i) for i = 1 .. L-1
    top: list  # per token i = 1 .. L-1: [(token id, logprob), ...], ``top_n`` of them
    top_n: int


@dataclass
class Scored:
    """Echo of one prompt: per token, its log-probability (None for the first) and the best alternatives."""

    tokens: list[int]
    token_logprobs: list
    top: list = field(default_factory=list)


def _common(a, b) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class Engine:
    """Scores and generates with one model; not thread-safe (the :class:`Batcher`'s worker is its only user).

    Prefix reuse: after each scoring pass, the KV cache of every request's shared part (the common prefix of its
    prompts: for an agent's request, the prompt without the options' answers) is kept, up to ``prefix_entries``
    (least recently used dropped). A later prompt sharing ``c >= min_prefix`` tokens with a kept entry reuses its
    first ``c - 1`` positions and prefills the rest.
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        prefix_entries: int = 8,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        min_prefix: int = MIN_PREFIX_TOKENS,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prefix_entries = int(prefix_entries)
        self.token_budget = int(token_budget)
        self.min_prefix = int(min_prefix)
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()  # LRU
        # models whose logits are the output embedding of the decoder's last hidden state, nothing more: their
        # logits are computed a row at a time instead of for the whole batch at once (B x S x vocab floats)
        plain = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
        self._head = model.get_output_embeddings() if plain else None
        self.forward_passes = 0
        self.rows_scored = 0
        self.tokens_prefilled = 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _lookup(self, row: tuple, top_n: int) -> tuple[PrefixEntry | None, int]:
        """The kept entry sharing the longest prefix with ``row`` and the positions of it to reuse (0: none)."""
        best, best_c = None, 0
        for entry in self._entries.values():
            if entry.top_n >= top_n:
                c = _common(entry.tokens, row)
                if c > best_c:
                    best, best_c = entry, c
        if best is None or best_c < self.min_prefix:
            return None, 0
        self._entries.move_to_end(best.tokens)
        return best, best_c - 1  # the last shared position is prefilled again: its logits predict the next token

    # ------------------------------------------------------------------ scoring
    def score(self, requests: list[list[list[int]]], top_n: int = 0) -> list[list[Scored]]:
        """Echo log-probabilities of every token of every prompt of every request, in as few forward passes as the
        token budget allows."""
        import torch

        with torch.inference_mode():
            if self.prefix_entries:
                self._prefill_shared(requests, top_n)
            out = self._score(requests, top_n)
        self.rows_scored += sum(map(len, requests))
        return out

    def _prefill_shared(self, requests: list[list[list[int]]], top_n: int) -> None:
        """A request's prompts that share more than the kept entries cover (an agent's options: the same prompt,
        then each option's answer) get that shared part prefilled once, in one pass for all such requests, and kept;
        the prompts then only prefill what differs."""
        shared = []
        for rows in requests:
            if len(rows) < 2:
                continue
            n = min(_common(rows[0], r) for r in rows[1:])
            part = list(rows[0][:n])
            _, m = self._lookup(tuple(part) + (-1,), top_n)
            if n >= self.min_prefix and n - m > SHARED_MIN_NEW and [part] not in shared:
                shared.append([part])
        if shared:
            self._score(shared, top_n)

    def _score(self, requests: list[list[list[int]]], top_n: int) -> list[list[Scored]]:
        plan = []  # (request, row index, tokens, entry, reused positions)
        for r, rows in enumerate(requests):
            for i, row in enumerate(rows):
                key = tuple(row)
                entry, m = self._lookup(key, top_n) if self.prefix_entries else (None, 0)
                plan.append((r, i, key, entry, m))
        out: list[list] = [[None] * len(rows) for rows in requests]
        kept: dict[int, tuple] = {}  # request -> its shared part's KV and echo, from its first row
        plan.sort(key=lambda p: len(p[2]) - p[4])
        group: list = []
        for p in plan:
            if group and (len(group) + 1) * (len(p[2]) - p[4]) > self.token_budget:
                self._score_group(group, out, kept, requests, top_n)
                group = []
            group.append(p)
        if group:
            self._score_group(group, out, kept, requests, top_n)
        for r, item in kept.items():
            if item is None:
                continue
            tokens, keys, values, token_lp, top = item
            if tokens not in self._entries:
                self._entries[tokens] = PrefixEntry(tokens, keys, values, token_lp, top, top_n)
                while len(self._entries) > self.prefix_entries:
                    self._entries.popitem(last=False)
        return out

    def _score_group(self, group: list, out: list, kept: dict, requests: list, top_n: int) -> None:
        import torch
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        news = [list(key[m:]) for _, _, key, _, m in group]
        B, P, S = len(group), max(p[4] for p in group), max(len(n) for n in news)
        ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        positions = torch.zeros((B, S), dtype=torch.long)
        for b, ((*_, m), new) in enumerate(zip(group, news)):
            ids[b, : len(new)] = torch.tensor(new, dtype=torch.long)
            mask[b, P - m : P + len(new)] = 1
            positions[b] = torch.arange(m, m + S)
        cache = DynamicCache(config=self.model.config)
        if P:
            ref = next(p[3] for p in group if p[4])
            for layer in range(len(ref.keys)):
                ks, vs = [], []
                for _, _, _, entry, m in group:
                    k = entry.keys[layer][:, :, :m] if m else ref.keys[layer][:, :, :0]
                    v = entry.values[layer][:, :, :m] if m else ref.values[layer][:, :, :0]
                    if m < P:  # left padding, masked out
                        shape = (1, k.shape[1], P - m, k.shape[3])
                        k = torch.cat([k.new_zeros(shape), k], dim=2)
                        v = torch.cat([v.new_zeros(shape), v], dim=2)
                    ks.append(k)
                    vs.append(v)
                cache.update(torch.cat(ks), torch.cat(vs), layer)
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        if self._head is not None:  # hidden states only: each row's logits below, one row at a time (memory)
            result = self.model.get_decoder()(**inputs)
            hidden = result.last_hidden_state
        else:
            result = self.model(**inputs)
        self.forward_passes += 1
        self.tokens_prefilled += sum(map(len, news))
        cache = result.cache
        for b, ((r, i, key, entry, m), new) in enumerate(zip(group, news)):
            logits = (
                self._head(hidden[b, : len(new) - 1]) if self._head is not None else result.logits[b, : len(new) - 1]
            )
            logp = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(new[1:], dtype=torch.long)
            token_lp = (
                [None] + (entry.token_logprobs[:m] if m else []) + logp.gather(1, targets[:, None])[:, 0].tolist()
            )
            top = []
            if top_n:
                v, t = logp.topk(top_n, dim=-1) if len(new) > 1 else (logp[:0, :top_n], logp[:0, :top_n].long())
                top = (
                    [[]]
                    + [x[:top_n] for x in (entry.top[:m] if m else [])]
                    + [list(zip(a.tolist(), c.tolist())) for a, c in zip(t, v)]
                )
            out[r][i] = Scored(list(key), token_lp, top)
            if r not in kept:  # the request's shared part: the common prefix of its prompts
                n = len(key)
                for other in requests[r]:
                    n = min(n, _common(key, other))
                lo = P - m
                if n < self.min_prefix or key[:n] in self._entries:
                    kept[r] = None
                    continue
                kept[r] = (
                    key[:n],
                    [layer.keys[b : b + 1, :, lo : lo + n].clone() for layer in cache.layers],
                    [layer.values[b : b + 1, :, lo : lo + n].clone() for layer in cache.layers],
                    token_lp[1:n],
                    top[1:n] if top_n else [],
                )

    # ------------------------------------------------------------------ generation
    def generate(
        self, row: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None, top_n: int = 0
    ) -> tuple[list[int], list[float], list, str]:
        """New tokens (greedy, or sampled at ``temperature``), their log-probabilities, alternatives, finish reason."""
        import torch

        with torch.inference_mode():
            eos = self.tokenizer.eos_token_id
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            ids = torch.tensor([row], dtype=torch.long)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.forward_passes += 1
            new, lps, tops, reason = [], [], [], "length"
            for _ in range(max_tokens):
                logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                if temperature > 0:
                    probs = torch.softmax(out.logits[0, -1].float() / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(logp.argmax())
                new.append(token)
                lps.append(float(logp[token]))
                if top_n:
                    v, i = logp.topk(top_n)
                    tops.append(list(zip(i.tolist(), v.tolist())))
                if token == eos:
                    reason = "stop"
                    break
                out = self.model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
                self.forward_passes += 1
            return new, lps, tops, reason


class Batcher:
    """One worker thread over the engine: scoring jobs queued together run together."""

    def __init__(self, engine: Engine, window_s: float = 0.005):
        self.engine = engine
        self.window_s = float(window_s)
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: str, **job) -> Future:
        fut: Future = Future()
        self._queue.put((kind, job, fut))
        return fut

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            deadline = time.monotonic() + self.window_s
            while True:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            scoring = [j for j in jobs if j[0] == "score"]
            if scoring:
                self.batches += 1
                top_n = max(job["top_n"] for _, job, _ in scoring)
                try:
                    scored = self.engine.score([job["rows"] for _, job, _ in scoring], top_n)
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for _, _, fut in scoring:
                        fut.set_exception(exc)
                else:
                    for (_, job, fut), result in zip(scoring, scored):
                        fut.set_result(
                            [Scored(s.tokens, s.token_logprobs, [t[: job["top_n"]] for t in s.top]) for s in result]
                        )
            for kind, job, fut in jobs:
                if kind == "generate":
                    try:
                        fut.set_result(self.engine.generate(**job))
                    except Exception as exc:  # noqa: BLE001
                        fut.set_exception(exc)


class RequestError(Exception):
    """A request the API rejects: HTTP status, OpenAI error type and one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def _field(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(
            400,
            f"'{name}' must be {kind.__name__ if not isinstance(kind, tuple) else 'a number'}, got {json.dumps(value)}",
            code="invalid_type",
        )
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be in [{low}, {high}], got {value}", code="invalid_value")
    return value


class Service:
    """The API over an engine and its batcher (what the HTTP handler calls)."""

    def __init__(self, engine: Engine, batcher: Batcher):
        self.engine, self.batcher = engine, batcher
        self.created = int(time.time())

    def models(self) -> dict:
        return dict(
            object="list", data=[dict(id=self.engine.name, object="model", created=self.created, owned_by="rudder")]
        )

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.engine.name:
            raise RequestError(
                404,
                f"The model '{model}' does not exist: this service serves '{self.engine.name}'",
                code="model_not_found",
            )

    def _tokens(self, ids: list[int]) -> list[str]:
        return [self.engine.tokenizer.decode([i]) for i in ids]

    def _logprobs(self, ids: list[int], lps: list, tops: list, start: int = 0) -> dict:
        tokens = self._tokens(ids)
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        out = dict(tokens=tokens, token_logprobs=lps, text_offset=offsets)
        out["top_logprobs"] = (
            [None if not t else {self.engine.tokenizer.decode([i]): lp for i, lp in t} for t in tops] if tops else None
        )
        return out

    def completions(self, body: dict) -> dict:
        self._check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", code="invalid_prompt")
        max_tokens = _field(body, "max_tokens", int, 16, 0, 4096)
        echo = _field(body, "echo", bool, False)
        top_n = body.get("logprobs")
        top_n = None if top_n is None else _field(body, "logprobs", int, 0, 0, MAX_TOP_LOGPROBS)
        temperature = float(_field(body, "temperature", (int, float), 1.0, 0, 2))
        seed = body.get("seed")
        if _field(body, "n", int, 1, 1, 1) != 1:
            raise RequestError(400, "'n' must be 1")
        if max_tokens == 0 and not echo:
            raise RequestError(400, "'max_tokens' 0 returns nothing without 'echo'")
        rows = [self.engine.encode(p) for p in prompts]
        if any(not r for r in rows):
            raise RequestError(400, "a prompt is empty")
        choices, usage_prompt, usage_new = [], sum(map(len, rows)), 0
        scored = self.batcher.submit("score", rows=rows, top_n=top_n or 0).result() if echo else [None] * len(rows)
        for index, (text, row, s) in enumerate(zip(prompts, rows, scored)):
            ids, lps, tops, reason = [], [], [], "length"
            if max_tokens:
                ids, lps, tops, reason = self.batcher.submit(
                    "generate", row=row, max_tokens=max_tokens, temperature=temperature, seed=seed, top_n=top_n or 0
                ).result()
                usage_new += len(ids)
            new_text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
            choice = dict(index=index, text=(text if echo else "") + new_text, finish_reason=reason, logprobs=None)
            if top_n is not None:
                lp = (
                    self._logprobs(s.tokens, s.token_logprobs, s.top)
                    if echo
                    else dict(tokens=[], token_logprobs=[], text_offset=[], top_logprobs=[] if top_n else None)
                )
                if ids:
                    more = self._logprobs(ids, lps, tops, start=len(text) if echo else 0)
                    for k in ("tokens", "token_logprobs", "text_offset"):
                        lp[k] = lp[k] + more[k]
                    if lp["top_logprobs"] is not None:
                        lp["top_logprobs"] = lp["top_logprobs"] + (more["top_logprobs"] or [])
                choice["logprobs"] = lp
            choices.append(choice)
        return dict(
            id=f"cmpl-{uuid.uuid4().hex[:24]}",
            object="text_completion",
            created=int(time.time()),
            model=self.engine.name,
            choices=choices,
            usage=dict(prompt_tokens=usage_prompt, completion_tokens=usage_new, total_tokens=usage_prompt + usage_new),
        )

    def chat(self, body: dict) -> dict:
        self._check_model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects")
        max_tokens = _field(body, "max_tokens", int, 256, 1, 4096)
        temperature = float(_field(body, "temperature", (int, float), 1.0, 0, 2))
        text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        row = self.engine.encode(text)
        ids, _, _, reason = self.batcher.submit(
            "generate", row=row, max_tokens=max_tokens, temperature=temperature, seed=body.get("seed"), top_n=0
        ).result()
        answer = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        return dict(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            object="chat.completion",
            created=int(time.time()),
            model=self.engine.name,
            choices=[dict(index=0, message=dict(role="assistant", content=answer), finish_reason=reason)],
            usage=dict(prompt_tokens=len(row), completion_tokens=len(ids), total_tokens=len(row) + len(ids)),
        )


def make_handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rudder-llm/1"

        def log_message(self, *args):  # quiet: one line per request would drown a training job's log
            pass

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: RequestError) -> None:
            self._send(exc.status, dict(error=dict(message=str(exc), type=exc.kind, param=None, code=exc.code)))

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, service.models())
            elif self.path.rstrip("/") in ("/health", ""):
                self._send(200, dict(status="ok", model=service.engine.name))
            elif self.path.rstrip("/") == "/stats":  # not OpenAI's: what batching and prefix reuse did
                e = service.engine
                self._send(
                    200,
                    dict(
                        batches=service.batcher.batches,
                        forward_passes=e.forward_passes,
                        rows_scored=e.rows_scored,
                        tokens_prefilled=e.tokens_prefilled,
                        prefix_entries=len(e._entries),
                    ),
                )
            else:
                self._error(RequestError(404, f"no route GET {self.path}", code="not_found"))

        def do_POST(self):  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as exc:
                    raise RequestError(400, f"the body is not JSON: {exc.msg} at column {exc.colno}") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the body must be a JSON object")
                route = self.path.rstrip("/")
                if route in ("/v1/completions", "/completions"):
                    self._send(200, service.completions(body))
                elif route in ("/v1/chat/completions", "/chat/completions"):
                    self._send(200, service.chat(body))
                else:
                    raise RequestError(404, f"no route POST {self.path}", code="not_found")
            except RequestError as exc:
                self._error(exc)
            except Exception as exc:  # noqa: BLE001 - the client gets one line, the service goes on
                self._error(RequestError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    return Handler


def build_service(
    model_spec=None, prefix_entries: int = 8, window_s: float = 0.005, token_budget: int = DEFAULT_TOKEN_BUDGET
) -> Service:
    """Load the model (:func:`rudder.agents.llm.models.load_model`) and put an engine and a batcher over it."""
    from rudder.agents.llm.models import load_model

    model, tokenizer, info = load_model(model_spec)
    engine = Engine(model, tokenizer, info["name"], prefix_entries=prefix_entries, token_budget=token_budget)
    return Service(engine, Batcher(engine, window_s))


def serve(service: Service, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``service`` on ``host:port`` (0: a free port; see ``server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rudder.agents.llm.server",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="model spec: smollm2, a Hugging Face folder or a .gguf file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8011, help="port (0: a free one, printed)")
    p.add_argument("--prefix-entries", type=int, default=8, help="shared prompt prefixes whose KV cache is kept")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long the worker waits after a request for others to batch with it",
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=DEFAULT_TOKEN_BUDGET,
        help="prompt tokens per forward pass (rows x longest new part)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    from rudder.agents.llm.models import ModelLoadError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        service = build_service(args.model, args.prefix_entries, args.batch_window_ms / 1000, args.token_budget)
        server = serve(service, args.host, args.port)
    except (ModelLoadError, OSError) as exc:
        print(f"rudder-llm: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"rudder-llm: serving {service.engine.name} on http://{host}:{port}/v1 (pid {os.getpid()})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
