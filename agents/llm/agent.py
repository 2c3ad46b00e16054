"""The LLM agent: Rudder's in-context agent that asks a small local language model, every decision window, whether
to refresh the prefetch buffer ("replace") or leave it ("keep").

    from rudder.agents.llm.agent import LLMAgent
    agent = LLMAgent()                         # SmolLM2-135M-Instruct, scoring mode, shipped few-shot examples
    action = agent.act(observation, info)      # MultiBinary(K): the top j candidates, or none

Two ways to get a decision from the model (``mode``):

- ``"score"`` (default): the prompt ends with the opened assistant turn and the answer prefix ``{"decision": "``; one
  forward pass over the part of the prompt that changed gives the log-probability of each option's answer tokens
  (summed over the option and the closing ``"}``, so multi-token options and options that are prefixes of others are
  scored correctly; the later tokens of all options go through one small batched pass). The best option wins: the
  answer is always valid. The fixed prefix (system message + examples) is prefilled once (or ahead of time with
  :meth:`LLMAgent.warm_up`); its KV cache is copied for every decision.
- ``"generate"``: greedy (or sampled, ``temperature > 0``) generation of up to ``max_new_tokens``; the text goes
  through the strict validator :func:`rudder.agents.llm.prompt.parse_answer`. An invalid answer falls back to the option
  that admits nothing ("keep") and is counted in ``invalid_answers``.

Every decision can be appended as one JSON line to ``log_path`` (prompt hash and suffix, option scores, answer,
decision, validity, latency). Models are loaded once per process and shared between agents (:func:`shared_model`).

With ``endpoint=URL`` the agent loads only the tokenizer (to render prompts with the model's chat template) and asks
an OpenAI-compatible completions endpoint instead (:mod:`rudder.agents.llm.client`): rudder's own service
(``python -m rudder.agents.llm.server``, one model for every trainer of a host), vLLM, or any server answering ``echo``
with
``logprobs``. Scoring sends one prompt per option (the prompt followed by that option's answer) in one request and
sums the log-probabilities of the answer's tokens: the same sum as the local model's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from rudder.agents.base import Agent
from rudder.agents.llm.prompt import (
    ANSWER_PREFIX,
    DecisionHistory,
    HistoryEntry,
    Metrics,
    admitted,
    answer_text,
    check_options,
    example_messages,
    examples_trained_on,
    load_examples,
    parse_answer,
    render,
    system_prompt,
    user_message,
)
from rudder.env.contract import top_j

MODES = ("score", "generate")
_MODELS: dict[str, tuple] = {}  # spec -> (model, tokenizer, info), shared by every agent of the process


def shared_model(spec=None):
    """``load_model(spec)``, loaded once per process."""
    from rudder.agents.llm.models import load_model

    key = "smollm2" if spec is None else os.fspath(spec)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec)
    return _MODELS[key]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LLMAgent(Agent):
    """Decides keep/replace (or any option set) each window by asking a local LLM.

    Args:
        model: a model spec for :func:`rudder.agents.llm.models.load_model` (None: SmolLM2-135M-Instruct; a Hugging Face
            folder; a ``.gguf`` file; chunk packages ``"name-part1..22"``), or an already loaded
            ``(model, tokenizer)`` pair.
        mode: ``"score"`` (rank the options by log-probability; always valid) or ``"generate"`` (free generation,
            strictly parsed).
        options: option name -> fraction of ``j = min(n_candidates, n_evictable)`` top candidates admitted
            (default ``{"keep": 0.0, "replace": 1.0}``, Rudder's two choices).
        examples: few-shot examples: ``"default"`` (``agents/llm/examples.json``), a JSON path, a list, or None.
        history: past decisions (with their measured effect) shown in each prompt.
        log_path: JSONL file to append one line per decision to (None: no log).
        max_new_tokens, temperature: generation settings (``"generate"`` mode); temperature 0 is greedy.
        prefix_cache: reuse the KV cache of the fixed prompt prefix across decisions.
        seed: seeds sampling when ``temperature > 0``.
        endpoint: URL of an OpenAI-compatible completions endpoint to ask instead of a local model (``model`` then
            names the tokenizer and chat template to render prompts with); None: the local model.
        endpoint_model: the model id to ask the endpoint for (None: the first it lists).

    Attributes: ``trained_on`` (content fingerprints of what the few-shot examples were mined from, see
    :func:`rudder.agents.llm.prompt.examples_trained_on`), ``model_name``, ``decisions`` (act calls), ``queries`` (model
    calls; decisions with no candidate to admit need none), ``invalid_answers`` (the last two also in
    :meth:`stats`). Decisions are slow enough to run in the background (``asynchronous``).
    """

    name = "llm"
    asynchronous = True

    def __init__(
        self,
        model=None,
        mode: str = "score",
        options: dict[str, float] | None = None,
        examples="default",
        history: int = 4,
        log_path: str | os.PathLike | None = None,
        max_new_tokens: int = 60,
        temperature: float = 0.0,
        prefix_cache: bool = True,
        seed: int = 0,
        endpoint: str | None = None,
        endpoint_model: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown LLM mode {mode!r}: expected one of {', '.join(MODES)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.mode = mode
        self.options = check_options(options)
        self.examples = load_examples(examples, self.options)
        self.trained_on = examples_trained_on(examples)  # what the examples were mined from, by content
        self.history = DecisionHistory(history)
        self.log_path = Path(log_path) if log_path else None
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.prefix_cache = bool(prefix_cache)
        self.seed = int(seed)
        self.client = None
        if endpoint:
            from rudder.agents.llm.client import EndpointClient
            from rudder.agents.llm.models import load_tokenizer

            self.client = EndpointClient(endpoint, endpoint_model)
            if isinstance(model, tuple):
                self.tokenizer, spec = model[1], "object"
            else:
                self.tokenizer, spec = load_tokenizer(model)
            self.model = None
            self.model_info = dict(name=self.client.model, spec=spec, endpoint=self.client.url)
        elif isinstance(model, tuple):
            self.model, self.tokenizer = model[:2]
            self.model_info = dict(name=type(self.model).__name__, spec="object")
        else:
            self.model, self.tokenizer, self.model_info = shared_model(model)
        self.model_name = self.model_info["name"]
        self.fallback = min(self.options, key=self.options.get)  # the option that admits least: the safe answer
        self.decisions = 0
        self.queries = 0
        self.invalid_answers = 0
        self._option_ids = self._tokenize_options()
        self._prefix: tuple[str, Any, Any] | None = None  # (prefix text, prefix ids tensor, KV cache)
        self._last_prefix: str | None = None  # prefix of the last prompt, and the last one written to the log
        self._logged_prefix: str | None = None

    # ------------------------------------------------------------------ protocol
    def reset(self) -> None:
        """New episode: forget the decision history (the counters and the prefix cache stay)."""
        self.history.reset()

    def stats(self) -> dict[str, Any]:
        return dict(queries=self.queries, invalid_answers=self.invalid_answers)

    def warm_up(self, info: dict[str, Any]) -> float:
        """Prefill the fixed prompt prefix (system message with ``info["facts"]`` + examples) now, so that the first
        decision does not pay for it. Call it after
        ``env.reset()``, as part of start-up. Returns the seconds spent (0 when already warm or not caching)."""
        if not self.prefix_cache:
            return 0.0
        t0 = time.perf_counter()
        text = render(self.tokenizer, self._prefix_messages(info), "")
        if self.client is not None:  # the service keeps the KV cache of a prefix its later prompts share
            if text.prefix and text.prefix != self._last_prefix:
                self.client.echo_logprobs([text.prefix])
                self._last_prefix = text.prefix
                return time.perf_counter() - t0
            return 0.0
        import torch

        if text.prefix and (self._prefix is None or self._prefix[0] != text.prefix):
            with torch.inference_mode():
                self._prefix_state(text.prefix)
            return time.perf_counter() - t0
        return 0.0

    def act(self, observation: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        t0 = time.perf_counter()
        metrics = Metrics.from_step(observation, info)
        self.history.observe(metrics)
        k = observation["candidates"].shape[0]
        n_candidates, n_evictable = int(info.get("n_candidates", 0)), int(info.get("n_evictable", 0))
        record: dict[str, Any] = dict(
            event="decision",
            decision_index=int(info.get("decision", self.decisions)),
            minibatch=int(info.get("minibatch", 0)),
            n_candidates=n_candidates,
            n_evictable=n_evictable,
        )
        if min(n_candidates, n_evictable) <= 0:  # every option admits nothing: no question to ask
            choice = self.fallback
            record.update(forced=True, decision=choice, valid=True)
        else:
            choice, details = self.decide(observation, info, metrics)
            record.update(forced=False, **details)
            rows = admitted(self.options[choice], n_candidates, n_evictable)
            self.history.record(choice, rows, metrics)
        rows = min(admitted(self.options[choice], n_candidates, n_evictable), k)
        action = top_j(k, rows)
        self.decisions += 1
        record.update(admitted=rows, latency_s=round(time.perf_counter() - t0, 4))
        self._log(record)
        return action

    # ------------------------------------------------------------------ deciding
    def prompt(
        self, observation: dict, info: dict, metrics: Metrics | None = None, history: list[HistoryEntry] | None = None
    ):
        """The rendered prompt (:class:`~rudder.agents.llm.prompt.PromptText`) for this decision point; ``history``
        replaces the agent's own recent decisions (e.g. to ask about a mined decision point)."""
        metrics = metrics or Metrics.from_step(observation, info)
        recent = self.history.recent(now=metrics) if history is None else history
        user = user_message(metrics, recent, self.options)
        return render(self.tokenizer, self._prefix_messages(info), user, ANSWER_PREFIX if self.mode == "score" else "")

    def _prefix_messages(self, info: dict) -> list[dict]:
        """The fixed part of the chat: the system message (facts, rules, format) and the few-shot turns."""
        system = {"role": "system", "content": system_prompt(info.get("facts") or {}, self.options)}
        return [system] + example_messages(self.examples, self.options)

    def decide(
        self, observation: dict, info: dict, metrics: Metrics | None = None, history: list[HistoryEntry] | None = None
    ) -> tuple[str, dict]:
        """Ask the model; returns the chosen option and what to log about it (``history``: see :meth:`prompt`)."""
        import torch

        text = self.prompt(observation, info, metrics, history)
        self._last_prefix = text.prefix
        self.queries += 1
        t0 = time.perf_counter()
        details: dict[str, Any] = dict(
            mode=self.mode, prompt_sha256=_sha(text.text), prefix_sha256=_sha(text.prefix), suffix=text.suffix
        )
        with torch.inference_mode():
            if self.mode == "score":
                scores, prefill = self.option_scores(text.prefix, text.suffix, use_cache=self.prefix_cache)
                choice = max(scores, key=scores.get)
                details.update(
                    option_scores={o: round(s, 4) for o, s in scores.items()},
                    answer=choice,
                    decision=choice,
                    valid=True,
                    prefill_tokens=prefill,
                )
            else:
                answer, prefill, generated = self._generate(text.prefix, text.suffix)
                parsed, error = parse_answer(answer, self.options)
                valid = parsed is not None
                if not valid:
                    self.invalid_answers += 1
                choice = parsed if valid else self.fallback
                details.update(
                    answer=answer,
                    decision=choice,
                    valid=valid,
                    error=error or None,
                    prefill_tokens=prefill,
                    generated_tokens=generated,
                    generation=self.generation_settings,
                )
        details["model_s"] = round(time.perf_counter() - t0, 4)
        return choice, details

    @property
    def generation_settings(self) -> dict:
        """The exact settings passed to ``generate`` (also written to the log)."""
        # the knobs that act set explicitly, so that no default from the model's generation_config.json (e.g. a
        # repetition penalty or top-k) slips in; temperature/top-p/top-k are not applied at all when greedy
        s = dict(
            max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0, num_beams=1, repetition_penalty=1.0
        )
        if self.temperature > 0:
            s.update(temperature=self.temperature, top_p=1.0, top_k=0, seed=self.seed)
        return s

    # ------------------------------------------------------------------ model plumbing
    def _ids(self, text: str):
        import torch

        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def _tokenize_options(self) -> dict[str, list[int]]:
        """Token ids that follow the answer prefix in each option's whole answer (``{"decision": "keep"}``), tokenised
        as the examples' answers are: the option, its closing quote and brace (often one token, ``"}``)."""
        tok = self.tokenizer
        base = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        out = {}
        for option in self.options:
            answer = answer_text(option)
            full = tok(answer, add_special_tokens=False)["input_ids"]
            if full[: len(base)] == base:
                out[option] = full[len(base) :]
            else:  # the tokenizer merges across the boundary: score the rest of the answer tokenised on its own
                out[option] = tok(answer[len(ANSWER_PREFIX) :], add_special_tokens=False)["input_ids"]
        if len({tuple(v) for v in out.values()}) != len(out):
            raise ValueError(f"options {list(out)} are not distinguishable by this tokenizer")
        return out

    def _prefix_state(self, prefix: str):
        """(prefix ids, KV cache of the prefix), computed once per distinct prefix."""
        from transformers import DynamicCache

        if self._prefix is None or self._prefix[0] != prefix:
            ids = self._ids(prefix)
            cache = DynamicCache(config=self.model.config)
            if ids.shape[1]:
                self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            self._prefix = (prefix, ids, cache)
        return self._prefix[1], self._prefix[2]

    def option_scores(self, prefix: str, suffix: str, use_cache: bool = True) -> tuple[dict[str, float], int]:
        """Log-probability of every option's answer tokens (summed) after ``prefix + suffix``.

        With ``use_cache`` the prefix's KV cache is reused (copied) and only the suffix is prefilled; without, the
        whole prompt is. Returns the scores and the number of prompt tokens prefilled.
        """
        if self.client is not None:
            return self._endpoint_scores(prefix + suffix)
        import torch

        with torch.inference_mode():
            return self._option_scores(prefix, suffix, use_cache)

    def _endpoint_scores(self, prompt: str) -> tuple[dict[str, float], int]:
        """Each option's answer appended to ``prompt``, all in one request; the log-probabilities the endpoint echoes
        for the answer's tokens, summed. Returns the scores and the prompt tokens sent."""
        from rudder.agents.llm.client import EndpointError

        names = list(self._option_ids)
        rests = {o: answer_text(o)[len(ANSWER_PREFIX) :] for o in names}
        echoed = self.client.echo_logprobs([prompt + rests[o] for o in names])
        scores, sent = {}, 0
        for o, lp in zip(names, echoed):
            n = len(self._option_ids[o])
            values, offsets = lp["token_logprobs"], lp.get("text_offset")
            if len(values) <= n or any(v is None for v in values[-n:]):
                raise EndpointError(
                    f"LLM endpoint {self.client.url}: {len(values)} token log-probabilities echoed "
                    f"for a prompt of more than {n} tokens"
                )
            if offsets and offsets[-n] != len(prompt):
                raise EndpointError(
                    f"LLM endpoint {self.client.url}: its tokenizer splits the answer {rests[o]!r} "
                    "differently from the agent's (is it serving the same model as --llm-model?)"
                )
            scores[o] = float(sum(values[-n:]))
            sent += len(values)
        return scores, sent

    def _option_scores(self, prefix: str, suffix: str, use_cache: bool) -> tuple[dict[str, float], int]:
        import torch

        suffix_ids = self._ids(suffix)
        if use_cache and prefix:
            prefix_ids, prefix_kv = self._prefix_state(prefix)
            cache = copy.deepcopy(prefix_kv)
            out = self.model(input_ids=suffix_ids, cache=cache, use_cache=True, logits_to_keep=1)
            prefilled = suffix_ids.shape[1]
        else:
            ids = torch.cat([self._ids(prefix), suffix_ids], dim=1) if prefix else suffix_ids
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefilled = ids.shape[1]
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = {o: float(first[ids[0]]) for o, ids in self._option_ids.items()}
        longest = max(len(ids) for ids in self._option_ids.values())
        if longest > 1:  # the options' later tokens, all options in one batch on copies of the prompt's cache
            names = list(self._option_ids)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            rows = torch.full((len(names), longest - 1), pad, dtype=torch.long)
            for i, o in enumerate(names):
                rest = self._option_ids[o][:-1]
                rows[i, : len(rest)] = torch.tensor(rest, dtype=torch.long)
            cache = out.cache
            cache.batch_repeat_interleave(len(names))
            logits = self.model(input_ids=rows, cache=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, o in enumerate(names):  # padding sits after each row's tokens, so it cannot affect them
                for t, token in enumerate(self._option_ids[o][1:]):
                    scores[o] += float(logp[i, t, token])
        return scores, int(prefilled)

    def _generate(self, prefix: str, suffix: str) -> tuple[str, int, int]:
        """Generated answer text, prompt tokens prefilled, tokens generated."""
        if self.client is not None:
            got = self.client.complete(
                prefix + suffix,
                self.max_new_tokens,
                self.temperature,
                self.seed + self.queries if self.temperature > 0 else None,
            )
            return got["text"], got["prompt_tokens"], got["completion_tokens"]
        import torch

        with torch.inference_mode():
            return self._generate_inner(prefix, suffix)

    def _generate_inner(self, prefix: str, suffix: str) -> tuple[str, int, int]:
        import torch

        suffix_ids = self._ids(suffix)
        kwargs = dict(self.generation_settings)
        kwargs.pop("seed", None)
        if self.temperature > 0:
            torch.manual_seed(self.seed + self.queries)
        if self.prefix_cache and prefix:
            prefix_ids, prefix_kv = self._prefix_state(prefix)
            ids = torch.cat([prefix_ids, suffix_ids], dim=1)
            kwargs["cache"] = copy.deepcopy(prefix_kv)
            prefilled = suffix_ids.shape[1]
        else:
            ids = torch.cat([self._ids(prefix), suffix_ids], dim=1) if prefix else suffix_ids
            prefilled = ids.shape[1]
        eos = [i for i in {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id} if i is not None]
        eos = sorted({j for i in eos for j in (i if isinstance(i, list) else [i])})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos or None, pad_token_id=pad, **kwargs
        )
        new = out[0, ids.shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True), int(prefilled), int(new.shape[0])

    # ------------------------------------------------------------------ log
    def _log(self, record: dict) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        prefix = self._last_prefix
        if prefix is not None and prefix != self._logged_prefix:  # the fixed prefix once, before its first use
            self._append(
                dict(
                    event="prefix",
                    model=self.model_name,
                    model_info=self.model_info,
                    mode=self.mode,
                    options=self.options,
                    examples=len(self.examples),
                    history=self.history.length,
                    prefix_cache=self.prefix_cache,
                    generation=self.generation_settings,
                    prefix_sha256=_sha(prefix),
                    prefix=prefix,
                )
            )
            self._logged_prefix = prefix
        self._append(record)

    def _append(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
