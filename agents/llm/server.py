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
and masked, each row keeping its own positions.

Generation (``max_tokens > 0``) never holds scoring up: the worker advances a generation one step at a time (a
prefill chunk of ``--prefill-chunk`` tokens, or one new token), round robin over the generations in progress, and
takes whatever scoring is queued between steps, so a decision waits at most one such step behind a long generation.

Limits (no request can take the service down; every refusal is JSON with one line in ``error.message``):

- a body over ``--max-body-bytes`` (1 MB) is refused with 413 before it is read; a ``Content-Length`` that is not
  a number is 400; a body that does not arrive within ``--read-timeout-s`` is 408;
- a prompt longer than the model's context (``max_position_embeddings``: 8,192 tokens for SmolLM2) is 400, and
  ``max_tokens`` is capped by what is left of the context; at most 64 prompts and ``--max-request-tokens`` prompt
  tokens per request; the prompt tokens of all requests queued or in progress at once are bounded too (a request
  past that waits, then gets 503), and so are the kept prefixes (``--prefix-tokens``): the memory a client can make
  the service use is bounded whatever it sends;
- at most ``--max-connections`` connections are served at once (one thread each; the next gets 503 at once), a
  connection that sends nothing for ``--idle-timeout-s`` is closed, and the listen backlog
  (:data:`LISTEN_BACKLOG`) carries hundreds of trainers connecting at the same moment; the client
  (:mod:`rudder.agents.llm.client`) retries a refused or reset connection and a 503 with backoff;
- malformed JSON, invalid UTF-8, lone surrogates, NaN, fields of the wrong type or range: 400; other methods than
  GET and POST: 405; a client that hangs up gets its queued or running work cancelled and leaves no traceback in the
  log.

Access: with a token in the environment variable ``RUDDER_LLM_TOKEN`` (or ``--api-key-file``), every request must
carry it as the OpenAI API does, ``Authorization: Bearer TOKEN``; without it, 401. ``train.py --llm-service auto``
makes a fresh token per job, gives it to the services it starts and to its trainers (the same variable), so other
users of a shared node cannot use (or fill) a job's service. To serve trainers by hand, or point them at your own
endpoint (rudder's service, vLLM's ``--api-key``, a hosted API), set the same token on both sides::

    export RUDDER_LLM_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python -m rudder.agents.llm.server --port 8011 &
    python train.py gnn --agent llm --llm-endpoint http://127.0.0.1:8011

The client sends ``RUDDER_LLM_TOKEN``, else ``OPENAI_API_KEY`` (the OpenAI clients' convention), as its bearer
token. Without a token the service answers anyone who can reach its port (it listens on 127.0.0.1 only by default)
and says so when it starts.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rudder.agents.llm.models import ModelLoadError, load_model

MAX_TOP_LOGPROBS = 20  # as OpenAI's legacy API: logprobs is at most 5 there; vLLM allows 20
DEFAULT_TOKEN_BUDGET = 2048  # prompt tokens per forward pass (rows x longest new part): bounds the logits' memory
MIN_PREFIX_TOKENS = 32
PLAIN_HEAD_MODELS = ("llama", "qwen2", "qwen3", "mistral")
SHARED_MIN_NEW = 16  # a request's shared part is prefilled on its own first when it is this much longer than kept
DEFAULT_CONTEXT_TOKENS = 2048  # for a model whose config names no context length
DEFAULT_PREFIX_TOKENS = 16384  # kept prefixes, all together (SmolLM2-135M fp32: ~46 KB of KV cache per token)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens a generation prefills per step (scoring may run between steps)
LONG_CHUNK = 512  # a scored row longer than the token budget is prefilled in chunks of this many tokens
LOGIT_ROWS = 256  # positions whose logits (a vocabulary of floats each) are computed at once

TOKEN_VAR = "RUDDER_LLM_TOKEN"  # the bearer token a job's service requires and its trainers send
DEFAULT_MAX_BODY_BYTES = 1 << 20  # an agent's request is a few KB; a full 8k-token prompt ~40 KB
DEFAULT_IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed (and frees its thread)
DEFAULT_READ_TIMEOUT_S = 30.0  # a request's body must arrive within this long
DEFAULT_MAX_CONNECTIONS = 128  # connections served at once (one thread each); more get 503 at once
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (capped by net.core.somaxconn)
MAX_PROMPTS = 64  # prompts in one request
DEFAULT_MAX_REQUEST_TOKENS = 32768  # prompt tokens in one request, all its prompts together
DEFAULT_MAX_QUEUED_TOKENS = 131072  # prompt tokens of all requests queued or in progress at once
QUEUE_WAIT_S = 30.0  # how long a request waits for room among those before it gets 503
PARSERS = 4  # requests parsed and tokenized at once (each may hold a whole body's objects)
LINGER_S = 1.0  # after refusing a body unread: how long its bytes are drained (not kept) so the client reads the answer
LINGER_BYTES = 16 << 20


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
    entries of ``prefix_tokens`` tokens in all (least recently used dropped). A later prompt sharing
    ``c >= min_prefix`` tokens with a kept entry reuses its first ``c - 1`` positions and prefills the rest.
    """

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        prefix_entries: int = 8,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        min_prefix: int = MIN_PREFIX_TOKENS,
        prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
        context_tokens: int | None = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prefix_entries = int(prefix_entries)
        self.prefix_tokens = int(prefix_tokens)
        # the longest sequence (prompt + generated tokens) the model takes
        self.context_tokens = int(
            context_tokens or getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT_TOKENS
        )
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
            self._score(shared, top_n, keep_new=True)

    def _score(self, requests: list[list[list[int]]], top_n: int, keep_new: bool = False) -> list[list[Scored]]:
        """Echo of every row (see :meth:`score`); the shared parts computed are kept as prefixes, those just added
        spared by the eviction that follows if ``keep_new`` (their rows come next)."""
        plan = []  # (request, row index, tokens, entry, reused positions)
        first: dict[tuple, tuple] = {}  # a row's tokens -> where it is first met: the same row is computed once
        twins = []  # (request, row index, where its twin is)
        for r, rows in enumerate(requests):
            for i, row in enumerate(rows):
                key = tuple(row)
                if key in first:
                    twins.append((r, i, first[key]))
                    continue
                first[key] = (r, i)
                entry, m = self._lookup(key, top_n) if self.prefix_entries else (None, 0)
                plan.append((r, i, key, entry, m))
        out: list[list] = [[None] * len(rows) for rows in requests]
        kept: dict[int, tuple] = {}  # request -> its shared part's KV and echo, from its first row
        plan.sort(key=lambda p: len(p[2]) - p[4])
        group: list = []
        for p in plan:
            if len(p[2]) - p[4] > self.token_budget:  # one long row: alone, in chunks (memory)
                self._score_long(p, out, kept, requests, top_n)
                continue
            if group and (len(group) + 1) * (len(p[2]) - p[4]) > self.token_budget:
                self._score_group(group, out, kept, requests, top_n)
                group = []
            group.append(p)
        if group:
            self._score_group(group, out, kept, requests, top_n)
        for r, i, (r0, i0) in twins:
            out[r][i] = out[r0][i0]
        new = set()
        for item in kept.values():
            if item is not None and item[0] not in self._entries:
                tokens, keys, values, token_lp, top = item
                self._entries[tokens] = PrefixEntry(tokens, keys, values, token_lp, top, top_n)
                new.add(tokens)
        self._evict(new if keep_new else set())
        return out

    def _evict(self, protect: set) -> None:
        """Drop kept prefixes until at most ``prefix_entries`` of ``prefix_tokens`` tokens in all remain. First to
        go: the least recently used of those that extend another kept prefix (a decision's own prompt, beyond its
        trainer's system message and examples, which every later decision of that trainer shares), then the least
        recently used of the rest; those in ``protect`` (about to be used) last."""
        total = sum(map(len, self._entries))
        while self._entries and (len(self._entries) > self.prefix_entries or total > self.prefix_tokens):
            keys = list(self._entries)  # least recently used first
            extends = [k for k in keys if any(len(o) < len(k) and k[: len(o)] == o for o in keys)]
            victim = next(
                (k for k in extends if k not in protect), next((k for k in keys if k not in protect), keys[0])
            )

            del self._entries[victim]
            total -= len(victim)

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
        for b, (p, new) in enumerate(zip(group, news)):
            states = hidden[b, : len(new) - 1] if self._head is not None else result.logits[b, : len(new) - 1]
            lps, tops = self._row_scores(states, new[1:], top_n)
            lo = P - p[4]

            def kv(n, b=b, lo=lo):
                return (
                    [layer.keys[b : b + 1, :, lo : lo + n].clone() for layer in cache.layers],
                    [layer.values[b : b + 1, :, lo : lo + n].clone() for layer in cache.layers],
                )

            self._finish(p, lps, tops, kv, out, kept, requests, top_n)

    def _score_long(self, p: tuple, out: list, kept: dict, requests: list, top_n: int) -> None:
        """One row whose new part exceeds the token budget, prefilled in chunks of at most :data:`LONG_CHUNK`
        tokens on its own cache: memory stays that of a chunk (attention, logits) whatever the row's length."""
        import torch
        from transformers import DynamicCache

        _, _, key, entry, m = p
        new = list(key[m:])
        cache = DynamicCache(config=self.model.config)
        if m:
            for layer in range(len(entry.keys)):
                cache.update(entry.keys[layer][:, :, :m], entry.values[layer][:, :, :m], layer)
        step = max(1, min(LONG_CHUNK, self.token_budget))
        lps, tops = [], []
        for a in range(0, len(new), step):
            chunk = new[a : a + step]
            inputs = dict(
                input_ids=torch.tensor([chunk], dtype=torch.long),
                position_ids=torch.arange(m + a, m + a + len(chunk))[None],
                cache=cache,
                use_cache=True,
            )
            if self._head is not None:
                result = self.model.get_decoder()(**inputs)
                states = result.last_hidden_state[0]
            else:
                result = self.model(**inputs)
                states = result.logits[0]
            cache = result.cache
            self.forward_passes += 1
            self.tokens_prefilled += len(chunk)
            targets = new[a + 1 : a + 1 + len(chunk)]  # the row's last position predicts nothing
            more_lps, more_tops = self._row_scores(states[: len(targets)], targets, top_n)
            lps += more_lps
            tops += more_tops

        def kv(n):
            return (
                [layer.keys[:, :, :n].clone() for layer in cache.layers],
                [layer.values[:, :, :n].clone() for layer in cache.layers],
            )

        self._finish(p, lps, tops, kv, out, kept, requests, top_n)

    def _row_scores(self, states, targets: list[int], top_n: int) -> tuple[list, list]:
        """For each position: log p(its target) and the ``top_n`` best alternatives, from ``states`` (the decoder's
        hidden states, or logits for a model without a plain head), :data:`LOGIT_ROWS` positions at a time (each
        position's logits are a vocabulary of floats)."""
        import torch

        lps, tops = [], []
        for a in range(0, len(targets), LOGIT_ROWS):
            part = states[a : a + LOGIT_ROWS]
            logp = torch.log_softmax((self._head(part) if self._head is not None else part).float(), dim=-1)
            t = torch.tensor(targets[a : a + LOGIT_ROWS], dtype=torch.long)
            lps += logp.gather(1, t[:, None])[:, 0].tolist()
            if top_n:
                v, i = logp.topk(top_n, dim=-1)
                tops += [list(zip(x.tolist(), y.tolist())) for x, y in zip(i, v)]
        return lps, tops

    def _finish(self, p: tuple, lps: list, tops: list, kv, out: list, kept: dict, requests: list, top_n: int) -> None:
        """A row's echo (the reused entry's scores, then its new part's) into ``out``; for the request's first row,
        its shared part's KV cache (``kv(n)``: keys and values of the first ``n`` positions) to keep."""
        r, i, key, entry, m = p
        token_lp = [None] + (entry.token_logprobs[:m] if m else []) + lps
        top = ([[]] + [x[:top_n] for x in (entry.top[:m] if m else [])] + tops) if top_n else []
        out[r][i] = Scored(list(key), token_lp, top)
        if r in kept:
            return
        n = min(_common(key, other) for other in requests[r])  # the request's shared part: its prompts' common prefix
        held = [item for item in kept.values() if item is not None]
        if (
            n < self.min_prefix
            or n > self.prefix_tokens
            or key[:n] in self._entries
            or len(held) >= self.prefix_entries
            or any(item[0] == key[:n] for item in held)
        ):  # not kept, or kept already: its KV cache is not copied (many requests of one batch may share it)
            kept[r] = None
            return
        keys, values = kv(n)
        kept[r] = (key[:n], keys, values, token_lp[1:n], top[1:n] if top_n else [])

    # ------------------------------------------------------------------ generation
    def generation(
        self,
        row: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        top_n: int = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        """A generator that generates for ``row`` one step per ``next()``: a prefill chunk of ``prefill_chunk``
        prompt tokens, or one new token (greedy, or sampled at ``temperature``), so that its user can do other
        work between steps. Its return value (``StopIteration.value``): the new tokens, their log-probabilities,
        alternatives and the finish reason."""
        import torch

        eos = self.tokenizer.eos_token_id
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        out, cache = None, None
        for start in range(0, len(row), max(1, int(prefill_chunk))):
            with torch.inference_mode():
                ids = torch.tensor([row[start : start + prefill_chunk]], dtype=torch.long)
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            self.forward_passes += 1
            yield
        new, lps, tops, reason = [], [], [], "length"
        while len(new) < max_tokens:
            with torch.inference_mode():
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
                if len(new) == max_tokens:
                    break
                out = self.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.cache
            self.forward_passes += 1
            yield
        return new, lps, tops, reason

    def generate(
        self, row: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None, top_n: int = 0
    ) -> tuple[list[int], list[float], list, str]:
        """New tokens (greedy, or sampled at ``temperature``), their log-probabilities, alternatives, finish reason:
        :meth:`generation` run to its end."""
        steps = self.generation(row, max_tokens, temperature, seed, top_n)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Give ``fut`` its result unless its requester gave up on it (cancelled) meanwhile."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """One worker thread over the engine. Scoring jobs queued together run together, before anything else;
    generations advance one step at a time (:meth:`Engine.generation`: a prefill chunk or one token), round robin,
    one step between two looks at the queue, so that scoring waits at most one step behind any generation.

    A job whose future was cancelled (its client hung up) is dropped: before it is scored, or at its next step."""

    def __init__(self, engine: Engine, window_s: float = 0.005, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.engine = engine
        self.window_s = float(window_s)
        self.prefill_chunk = int(prefill_chunk)
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.generation_steps = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: str, **job) -> Future:
        """Queue a job (``score``: ``rows``, ``top_n``; ``generate``: :meth:`Engine.generation`'s arguments)."""
        fut: Future = Future()
        self._queue.put((kind, job, fut))
        return fut

    def _take(self, block: bool, scoring: list, active: deque) -> None:
        """Move what is queued into ``scoring`` and ``active`` (waiting for a first job if ``block``); once a
        scoring job is among them, wait ``window_s`` for others to batch with it."""
        deadline = None
        while True:
            if deadline is None and scoring and self.window_s > 0:
                deadline = time.monotonic() + self.window_s
            try:
                if block:
                    item = self._queue.get()
                    block = False
                elif deadline is not None:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return
            kind, job, fut = item
            if kind == "score":
                scoring.append(item)
            else:
                active.append((fut, self.engine.generation(**job, prefill_chunk=self.prefill_chunk)))

    def _run(self) -> None:
        active: deque = deque()  # (future, generation steps) in progress
        while True:
            scoring: list = []
            self._take(not active, scoring, active)
            live = [j for j in scoring if not j[2].cancelled()]
            self.cancelled += len(scoring) - len(live)
            if live:
                self.batches += 1
                top_n = max(job["top_n"] for _, job, _ in live)
                try:
                    scored = self.engine.score([job["rows"] for _, job, _ in live], top_n)
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for _, _, fut in live:
                        _settle(fut, exc=exc)
                else:
                    for (_, job, fut), result in zip(live, scored):
                        trimmed = [
                            Scored(s.tokens, s.token_logprobs, [t[: job["top_n"]] for t in s.top]) for s in result
                        ]
                        _settle(fut, trimmed)
            if active:  # one generation step, then look at the queue again
                fut, steps = active.popleft()
                if fut.cancelled():
                    steps.close()
                    self.cancelled += 1
                    continue
                try:
                    next(steps)
                except StopIteration as done:
                    _settle(fut, done.value)
                except Exception as exc:  # noqa: BLE001 - the request gets the error
                    _settle(fut, exc=exc)
                else:
                    self.generation_steps += 1
                    active.append((fut, steps))


class RequestError(Exception):
    """A request the API rejects: HTTP status, OpenAI error type and one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


class ClientGone(Exception):
    """The client closed its connection while its request was queued or computed."""


_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _field(body: dict, name: str, kind, default, low=None, high=None):
    """``body[name]`` (``default`` if absent or null) checked to be of ``kind`` (int, float: any finite number,
    bool, str) and within ``[low, high]``; RequestError 400 in one line otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise RequestError(400, f"'{name}' must be {_KINDS[kind]}, got {_show(value)}", code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be in [{low}, {high}], got {value}", code="invalid_value")
    return value


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _unsupported(body: dict, defaults: dict) -> None:
    """Options of the OpenAI API this service does not implement: accepted at their neutral value (or null),
    400 otherwise, so that a client never gets silently different behaviour."""
    for name, neutral in defaults.items():
        value = body.get(name)
        if value is None or value == neutral and type(value) is type(neutral):
            continue
        if isinstance(neutral, (int, float)) and not isinstance(neutral, bool):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral:
                continue
        raise RequestError(
            400, f"'{name}' {_show(value)} is not supported by this service (only {_show(neutral)})", code="unsupported"
        )


UNSUPPORTED = dict(stream=False, n=1, best_of=1, top_p=1, presence_penalty=0, frequency_penalty=0, stop=[], suffix="")
UNSUPPORTED_CHAT = dict(stream=False, n=1, top_p=1, presence_penalty=0, frequency_penalty=0, stop=[], logprobs=False)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; RequestError 400 (one line) for anything else: invalid UTF-8, malformed
    or too deeply nested JSON, NaN/Infinity, lone surrogates in a string."""

    def constant(name):
        raise RequestError(400, f"the body holds {name}, which JSON does not allow", code="invalid_json")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            400, f"the body is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        ) from None
    try:
        body = json.loads(text or "{}", parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not JSON: {exc.msg} at column {exc.colno}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    todo = [body]
    while todo:  # every string must be encodable: "\ud800" parses to a lone surrogate
        item = todo.pop()
        for value in item.values() if isinstance(item, dict) else item:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise RequestError(
                        400, f"a string holds a lone surrogate ({value[exc.start]!r}); send valid Unicode"
                    ) from None
            elif isinstance(value, (dict, list)):
                todo.append(value)
        if isinstance(item, dict):
            for key in item:
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(400, "a key holds a lone surrogate; send valid Unicode") from None
    return body


class TokenGate:
    """Bounds the prompt tokens of the requests queued or in progress at once (with them the memory their scores
    take). A request past the bound waits for room up to ``wait_s``, then is refused (503: the client retries)."""

    def __init__(self, limit: int, wait_s: float = QUEUE_WAIT_S):
        self.limit, self.wait_s = int(limit), float(wait_s)
        self.used = 0
        self.refused = 0  # requests turned away (503) after waiting wait_s
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, tokens: int):
        with self._cond:
            if not self._cond.wait_for(lambda: self.used == 0 or self.used + tokens <= self.limit, self.wait_s):
                self.refused += 1
                raise RequestError(
                    503,
                    f"busy: {self.used} prompt tokens queued (at most {self.limit}); try again",
                    kind="server_error",
                    code="busy",
                )
            self.used += tokens
        try:
            yield
        finally:
            with self._cond:
                self.used -= tokens
                self._cond.notify_all()


def _wait(fut: Future):
    return fut.result()


class Service:
    """The API over an engine and its batcher (what the HTTP handler calls).

    ``token``: the bearer token every request must carry (None: none needed)."""

    def __init__(
        self,
        engine: Engine,
        batcher: Batcher,
        token: str | None = None,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
        max_queued_tokens: int = DEFAULT_MAX_QUEUED_TOKENS,
    ):
        self.engine, self.batcher = engine, batcher
        self.token = token or None
        self.max_request_tokens = int(max_request_tokens)
        self.gate = TokenGate(max_queued_tokens)
        self.parsing = threading.BoundedSemaphore(PARSERS)
        self.created = int(time.time())
        self.refused = 0  # connections turned away at once: all --max-connections busy

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the service's token (always, without one)."""
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def models(self) -> dict:
        return dict(
            object="list", data=[dict(id=self.engine.name, object="model", created=self.created, owned_by="rudder")]
        )

    def stats(self) -> dict:
        e, b = self.engine, self.batcher
        return dict(
            batches=b.batches,
            forward_passes=e.forward_passes,
            rows_scored=e.rows_scored,
            tokens_prefilled=e.tokens_prefilled,
            prefix_entries=len(e._entries),
            prefix_tokens=sum(map(len, e._entries)),
            generation_steps=b.generation_steps,
            cancelled=b.cancelled,
            queued_tokens=self.gate.used,
            refused_connections=self.refused,
            refused_busy=self.gate.refused,
            context_tokens=e.context_tokens,
        )

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, f"'model' must be a string, got {_show(model)}", code="invalid_type")
        if model is not None and model != self.engine.name:
            raise RequestError(
                404,
                f"The model '{model}' does not exist: this service serves '{self.engine.name}'",
                code="model_not_found",
            )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, each checked against the model's context; their total against the request
        limit."""
        context = self.engine.context_tokens
        rows = []
        with self.parsing:
            for i, text in enumerate(texts):
                row = self.engine.encode(text)
                if not row:
                    raise RequestError(400, f"prompt {i} is empty", code="invalid_prompt")
                if len(row) > context:
                    raise RequestError(
                        400,
                        f"prompt {i} is {len(row)} tokens: the model's context is {context} tokens",
                        code="context_length_exceeded",
                    )
                rows.append(row)
        total = sum(map(len, rows))
        if total > self.max_request_tokens:
            raise RequestError(
                400,
                f"the request's prompts are {total} tokens: at most {self.max_request_tokens} in one request",
                code="request_too_large",
            )
        return rows

    def _room(self, row: list[int], max_tokens: int, i: int) -> int:
        """``max_tokens`` capped by what the prompt leaves of the context."""
        left = self.engine.context_tokens - len(row)
        if left < 1:
            raise RequestError(
                400,
                f"prompt {i} is {len(row)} tokens: it fills the model's {self.engine.context_tokens}-token context, "
                "no room to generate",
                code="context_length_exceeded",
            )
        return min(max_tokens, left)

    def _logprobs(self, ids: list[int], lps: list, tops: list, start: int = 0) -> dict:
        tokens = [self.engine.tokenizer.decode([i]) for i in ids]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        out = dict(tokens=tokens, token_logprobs=lps, text_offset=offsets)
        out["top_logprobs"] = (
            [None if not t else {self.engine.tokenizer.decode([i]): lp for i, lp in t} for t in tops] if tops else None
        )
        return out

    def completions(self, body: dict, wait=_wait) -> dict:
        """``POST /v1/completions``; ``wait(future)`` waits for the batcher's answer (the handler's also cancels it
        when the client hangs up)."""
        self._check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", code="invalid_prompt")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(
                400, f"'prompt' holds {len(prompts)} prompts: at most {MAX_PROMPTS}", code="invalid_prompt"
            )
        context = self.engine.context_tokens
        max_tokens = _field(body, "max_tokens", int, 16, 0, None)
        echo = _field(body, "echo", bool, False)
        top_n = body.get("logprobs")
        top_n = None if top_n is None else _field(body, "logprobs", int, 0, 0, MAX_TOP_LOGPROBS)
        temperature = float(_field(body, "temperature", float, 1.0, 0, 2))
        seed = _field(body, "seed", int, None, *SEED_RANGE)
        _field(body, "user", str, "")
        _unsupported(body, UNSUPPORTED)
        if body.get("logit_bias") not in (None, {}):
            raise RequestError(400, "'logit_bias' is not supported by this service", code="unsupported")
        if max_tokens == 0 and not echo:
            raise RequestError(400, "'max_tokens' 0 returns nothing without 'echo'")
        max_tokens = min(max_tokens, context)
        rows = self._encode(prompts)
        budgets = [self._room(row, max_tokens, i) for i, row in enumerate(rows)] if max_tokens else [0] * len(rows)
        usage_prompt, usage_new = sum(map(len, rows)), 0
        with self.gate.hold(usage_prompt):
            score = self.batcher.submit("score", rows=rows, top_n=top_n or 0) if echo else None
            gens = [
                self.batcher.submit(
                    "generate", row=row, max_tokens=n, temperature=temperature, seed=seed, top_n=top_n or 0
                )
                if n
                else None
                for row, n in zip(rows, budgets)
            ]
            try:
                scored = wait(score) if echo else [None] * len(rows)
                generated = [wait(g) if g is not None else ([], [], [], "length") for g in gens]
            finally:
                for fut in [score, *gens]:
                    if fut is not None:
                        fut.cancel()  # a no-op for those done; the rest (an error above) need not be computed
        choices = []
        for index, (text, s, (ids, lps, tops, reason)) in enumerate(zip(prompts, scored, generated)):
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

    def chat(self, body: dict, wait=_wait) -> dict:
        """``POST /v1/chat/completions`` (text answers only)."""
        self._check_model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or len(messages) > MAX_PROMPTS
            or not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError(
                400,
                f"'messages' must be a list of 1 to {MAX_PROMPTS} objects with a 'role' (system, user or assistant) "
                "and a string 'content'",
            )
        max_tokens = _field(body, "max_tokens", int, 256, 1, None)
        temperature = float(_field(body, "temperature", float, 1.0, 0, 2))
        seed = _field(body, "seed", int, None, *SEED_RANGE)
        _field(body, "user", str, "")
        _unsupported(body, UNSUPPORTED_CHAT)
        try:
            text = self.engine.tokenizer.apply_chat_template(
                [dict(role=m["role"], content=m["content"]) for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # noqa: BLE001 - a template's own refusal (e.g. roles out of order)
            raise RequestError(400, f"the model's chat template refused the messages: {exc}") from None
        row = self._encode([text])[0]
        max_tokens = self._room(row, max_tokens, 0)
        with self.gate.hold(len(row)):
            fut = self.batcher.submit(
                "generate", row=row, max_tokens=max_tokens, temperature=temperature, seed=seed, top_n=0
            )
            try:
                ids, _, _, reason = wait(fut)
            finally:
                fut.cancel()
        answer = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        return dict(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            object="chat.completion",
            created=int(time.time()),
            model=self.engine.name,
            choices=[dict(index=0, message=dict(role="assistant", content=answer), finish_reason=reason)],
            usage=dict(prompt_tokens=len(row), completion_tokens=len(ids), total_tokens=len(row) + len(ids)),
        )


@dataclass
class Limits:
    """What one connection may send and how long it may take (see the module's docstring)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def _error_body(status: int, message: str, kind: str | None = None, code: str | None = None) -> bytes:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return json.dumps(dict(error=dict(message=message, type=kind, param=None, code=code))).encode()


def make_handler(service: Service, limits: Limits | None = None):
    limits = limits or Limits()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rudder-llm/1"
        timeout = limits.idle_timeout_s  # the socket's: a connection silent this long is closed

        def log_message(self, *args):  # quiet: one line per request would drown a training job's log
            pass

        def _send(self, status: int, obj: dict | None = None, data: bytes | None = None, headers=()) -> None:
            data = json.dumps(obj).encode() if data is None else data
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()

        def _error(self, exc: RequestError, headers=()) -> None:
            self._send(exc.status, data=_error_body(exc.status, str(exc), exc.kind, exc.code), headers=headers)

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (a malformed request line or header, an unknown method, a timeout): JSON,
            as every other answer."""
            self.close_connection = True
            try:
                self._send(code, data=_error_body(code, message or self.responses.get(code, ("error",))[0]))
            except OSError:
                pass

        def _refuse(self, exc: RequestError, headers=()) -> None:
            """Answer ``exc`` without reading the body, then close: the body's bytes are drained (for at most
            :data:`LINGER_S`, never kept) so that the client reads the answer instead of a reset connection."""
            self.close_connection = True
            self._error(exc, headers)
            sock = self.connection
            try:
                sock.shutdown(socket.SHUT_WR)
                deadline, drained = time.monotonic() + LINGER_S, 0
                while drained < LINGER_BYTES and time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass

        def _client_gone(self) -> bool:
            """Whether the client closed its side (its request is then abandoned)."""
            try:
                ready, _, _ = select.select([self.connection], [], [], 0)
                return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _wait(self, fut: Future):
            """The batcher's answer; the job cancelled (and ClientGone) as soon as the client hangs up."""
            while True:
                try:
                    return fut.result(timeout=0.2)
                except TimeoutError:
                    if self._client_gone():
                        fut.cancel()
                        raise ClientGone from None

        def _authorize(self) -> bool:
            if service.authorized(self.headers.get("Authorization")):
                return True
            self._refuse(
                RequestError(
                    401,
                    "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the job's token "
                    f"(${TOKEN_VAR})",
                    code="invalid_api_key",
                ),
                headers=[("WWW-Authenticate", "Bearer")],
            )
            return False

        def do_GET(self):  # noqa: N802 - http.server's naming
            route = self.path.rstrip("/")
            if route in ("/v1/completions", "/completions", "/v1/chat/completions", "/chat/completions"):
                return self._not_allowed()
            if not self._authorize():
                return
            if route in ("/v1/models", "/models"):
                self._send(200, service.models())
            elif route in ("/health", ""):
                self._send(200, dict(status="ok", model=service.engine.name))
            elif route == "/stats":  # not OpenAI's: what batching, prefix reuse and the limits did
                self._send(200, service.stats())
            else:
                self._error(RequestError(404, f"no route GET {self.path}", code="not_found"))

        def _not_allowed(self):
            self._refuse(
                RequestError(405, f"method {self.command} is not allowed on {self.path}: use GET or POST"),
                headers=[("Allow", "GET, POST")],
            )

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_HEAD = _not_allowed  # noqa: N815

        def _content_length(self) -> int:
            """The body's declared length; RequestError for a missing, malformed or oversized one."""
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(411, "send the body with a Content-Length (chunked transfer is not supported)")
            values = self.headers.get_all("Content-Length") or ["0"]
            if len(set(values)) > 1 or not values[0].strip().isdigit() or not values[0].strip().isascii():
                raise RequestError(400, f"Content-Length must be a non-negative integer, got {values[0]!r}")
            length = int(values[0])
            if length > limits.max_body_bytes:
                raise RequestError(
                    413,
                    f"the body is {length} bytes: at most {limits.max_body_bytes} (--max-body-bytes)",
                    code="request_too_large",
                )
            return length

        def _read_body(self, length: int) -> bytes:
            deadline, parts, got = time.monotonic() + limits.read_timeout_s, [], 0
            while got < length:
                if time.monotonic() > deadline:
                    raise RequestError(408, f"the body did not arrive within {limits.read_timeout_s:g} s")
                try:
                    part = self.rfile.read1(min(65536, length - got))
                except TimeoutError:
                    raise RequestError(408, f"the body stopped arriving ({got} of {length} bytes)") from None
                if not part:
                    raise ClientGone
                parts.append(part)
                got += len(part)
            return b"".join(parts)

        def handle_expect_100(self):
            try:
                self._content_length()
            except RequestError as exc:
                self._refuse(exc)
                return False
            return super().handle_expect_100()

        def do_POST(self):  # noqa: N802
            route = self.path.rstrip("/")
            handlers = {
                "/v1/completions": service.completions,
                "/completions": service.completions,
                "/v1/chat/completions": service.chat,
                "/chat/completions": service.chat,
            }
            try:
                if route not in handlers:
                    if route in ("/v1/models", "/models", "/health", "/stats"):
                        return self._not_allowed()
                    return self._refuse(RequestError(404, f"no route POST {self.path}", code="not_found"))
                if not self._authorize():
                    return
                try:
                    length = self._content_length()
                except RequestError as exc:
                    return self._refuse(exc)
                raw = self._read_body(length)
                with service.parsing:
                    body = parse_body(raw)
                del raw
                self._send(200, handlers[route](body, wait=self._wait))
            except RequestError as exc:
                if exc.status == 408:
                    self.close_connection = True
                self._error(exc, headers=[("Retry-After", "1")] if exc.status == 503 else ())
            except (ClientGone, ConnectionError, TimeoutError):
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001 - a fault of the service's: the client gets one line, it goes on
                print(f"rudder-llm: error: {route}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self._error(RequestError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    return Handler


class Server(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, at most ``max_connections`` of them (the next connection gets a
    503 at once and is closed: the client retries), a deep listen backlog, and no tracebacks for clients that hang
    up."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, service: Service, max_connections: int):
        self.service = service
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.service.refused += 1
            body = _error_body(503, "busy: all connections in use; try again", code="busy")
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            try:
                request.settimeout(0.5)
                request.sendall(head.encode() + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ClientGone)):
            return  # the client hung up or went silent: nothing the job's log needs
        print(f"rudder-llm: error: connection from {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


def read_token(path: str | None = None) -> str | None:
    """The service's bearer token: the first line of ``path``, else ``$RUDDER_LLM_TOKEN``; None if neither."""
    if path:
        with open(path) as f:
            return f.readline().strip() or None
    return os.environ.get(TOKEN_VAR) or None


def build_service(
    model_spec=None,
    prefix_entries: int = 8,
    window_s: float = 0.005,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    token: str | None = None,
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    max_queued_tokens: int = DEFAULT_MAX_QUEUED_TOKENS,
) -> Service:
    """Load the model (:func:`rudder.agents.llm.models.load_model`) and put an engine and a batcher over it."""

    model, tokenizer, info = load_model(model_spec)
    engine = Engine(
        model,
        tokenizer,
        info["name"],
        prefix_entries=prefix_entries,
        token_budget=token_budget,
        prefix_tokens=prefix_tokens,
    )
    return Service(engine, Batcher(engine, window_s, prefill_chunk), token, max_request_tokens, max_queued_tokens)


def serve(service: Service, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None) -> Server:
    """An HTTP server (not yet serving) for ``service`` on ``host:port`` (0: a free port; see ``server_address``)."""
    limits = limits or Limits()
    return Server((host, port), make_handler(service, limits), service, limits.max_connections)


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
    p.add_argument("--prefix-tokens", type=int, default=DEFAULT_PREFIX_TOKENS, help="tokens of all kept prefixes")
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
    p.add_argument(
        "--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens a generation prefills per step"
    )
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument(
        "--max-request-tokens", type=int, default=DEFAULT_MAX_REQUEST_TOKENS, help="prompt tokens in one request"
    )
    p.add_argument(
        "--max-queued-tokens",
        type=int,
        default=DEFAULT_MAX_QUEUED_TOKENS,
        help="prompt tokens of all requests queued or in progress at once",
    )
    p.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help="connections served at once (threads)"
    )
    p.add_argument(
        "--idle-timeout-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S, help="close a connection silent this long"
    )
    p.add_argument(
        "--read-timeout-s", type=float, default=DEFAULT_READ_TIMEOUT_S, help="a request's body must arrive within"
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help=f"a file whose first line is the bearer token requests must carry (default: ${TOKEN_VAR}, if set)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    for name in ("max_body_bytes", "max_request_tokens", "max_queued_tokens", "max_connections", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        token = read_token(args.api_key_file)
        service = build_service(
            args.model,
            args.prefix_entries,
            args.batch_window_ms / 1000,
            args.token_budget,
            token=token,
            prefix_tokens=args.prefix_tokens,
            prefill_chunk=args.prefill_chunk,
            max_request_tokens=args.max_request_tokens,
            max_queued_tokens=args.max_queued_tokens,
        )
        limits = Limits(args.max_body_bytes, args.idle_timeout_s, args.read_timeout_s, args.max_connections)
        server = serve(service, args.host, args.port, limits)
    except (ModelLoadError, OSError) as exc:
        print(f"rudder-llm: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    access = "bearer token required" if token else f"no token (${TOKEN_VAR} unset): anyone who reaches the port"
    print(
        f"rudder-llm: serving {service.engine.name} on http://{host}:{port}/v1 (pid {os.getpid()}); access: {access}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
