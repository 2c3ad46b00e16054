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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rudder.agents.base import Agent
from rudder.agents.llm.client import EndpointClient, EndpointError
from rudder.agents.llm.models import load_model, load_tokenizer
from rudder.agents.llm.prompt import (
    ANSWER_PREFIX,
    DecisionHistory,
    HistoryEntry,
    Metrics,
    admitted,
    answer_text,
    check_options,
    examples_trained_on,
    load_examples,
    parse_answer,
    render,
    system_prompt,
    user_message,
)
from rudder.env.contract import top_j

MODES = ("score", "generate")
OPTION_IDS = ("names", "letters")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONTENT_FREE = "N/A"  # the content-free user turn contextual calibration scores the options on
_MODELS: dict[str, tuple] = {}  # spec -> (model, tokenizer, info), shared by every agent of the process


def shared_model(spec=None):
    """``load_model(spec)``, loaded once per process."""

    key = "smollm2" if spec is None else os.fspath(spec)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec)
    return _MODELS[key]


@dataclass(frozen=True)
class View:
    """One presentation of the options to the model: the order the prompt lists them in (``order``), the id the
    model answers with for each (``ids``: the option's own name, or a neutral letter bound to its position), and how
    many places the few-shot examples are rotated (``shift``). Scoring over several views and averaging is
    permutation debiasing (PriDe-style): a preference for a position, an id or the last example cancels out."""

    order: tuple[str, ...]
    ids: tuple[tuple[str, str], ...]  # (option, id) pairs, in ``order``
    shift: int = 0

    @property
    def id_of(self) -> dict[str, str]:
        return dict(self.ids)

    def shown(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (keyed by option) re-keyed by id, in the view's order."""
        return {i: values[o] for o, i in self.ids}

    def rotate(self, items: list) -> list:
        if not items:
            return list(items)
        k = self.shift % len(items)
        return list(items[k:]) + list(items[:k])


def make_views(options: list[str], n_examples: int, permutations: int = 1, option_ids: str = "names") -> list[View]:
    """``permutations`` views of ``options`` (at most one per option): cyclic shifts spread evenly over the option
    order, the examples rotated by the same share of their number; ids are the names or letters A, B, ... by
    position (so with letters each option gets a different letter in each view)."""
    n = len(options)
    p = max(1, min(int(permutations), n))
    views = []
    for v in range(p):
        step = (v * n) // p
        order = tuple(options[step:] + options[:step])
        ids = tuple((o, LETTERS[i] if option_ids == "letters" else o) for i, o in enumerate(order))
        views.append(View(order, ids, (v * n_examples) // p if n_examples else 0))
    return views


def _log_softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    z = top + float(np.log(sum(np.exp(v - top) for v in scores.values())))
    return {o: v - z for o, v in scores.items()}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LLMAgent(Agent):
    """Decides keep/replace (or any option set) each window by asking a local LLM.

    Args:
        model: a model spec for :func:`rudder.agents.llm.models.load_model` (None: SmolLM2-135M-Instruct; a Hugging Face
            folder; a ``.gguf`` file), or an already loaded
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
        calibrate: contextual calibration (Zhao et al. 2021): each option's log-probability on a content-free user
            turn (``"N/A"``) after the same prefix is the model's prior; it is subtracted (scoring mode).
        permutations: score over this many presentations of the options (cyclic shifts of their order, examples
            rotated alike) and average the normalised log-probabilities (permutation debiasing; scoring mode).
        option_ids: ``"names"`` (the model answers with the option's name) or ``"letters"`` (neutral ids A, B, ...
            bound to the listed position, so they move with the permutations).
        length_norm: divide each option's summed log-probability by its number of answer tokens.

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
        calibrate: bool = False,
        permutations: int = 1,
        option_ids: str = "names",
        length_norm: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown LLM mode {mode!r}: expected one of {', '.join(MODES)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if option_ids not in OPTION_IDS:
            raise ValueError(f"unknown option_ids {option_ids!r}: expected one of {', '.join(OPTION_IDS)}")
        if int(permutations) < 1:
            raise ValueError(f"permutations must be >= 1, got {permutations}")
        self.calibrate = bool(calibrate)
        self.permutations = int(permutations)
        self.option_ids = option_ids
        self.length_norm = bool(length_norm)
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
        self._answer_ids: dict[str, list[int]] = {}  # answer id -> its tokens after the answer prefix
        self._option_ids = self._tokenize_options()
        self._prefix: tuple[str, Any, Any] | None = None  # (prefix text, prefix ids tensor, KV cache), the last used
        self._prefixes: dict[str, tuple[Any, Any]] = {}  # every view's prefix: (ids, KV cache)
        self._content_free: dict[tuple, dict[str, float]] = {}  # (prefix, ids) -> calibrated prior
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
        return self._render_view(self.views()[0], info, metrics or Metrics.from_step(observation, info), history)

    def _render_view(
        self,
        view: View,
        info: dict,
        metrics: Metrics,
        history: list[HistoryEntry] | None = None,
        user: str | None = None,
    ):
        """The prompt for ``metrics`` as ``view`` presents the options; ``user`` replaces the user turn (the
        content-free input of calibration)."""
        if user is None:
            recent = self.history.recent(now=metrics) if history is None else history
            user = user_message(metrics, recent, view.shown(self.options), view.id_of)
        return render(
            self.tokenizer, self._prefix_messages(info, view), user, ANSWER_PREFIX if self.mode == "score" else ""
        )

    def _prefix_messages(self, info: dict, view: View | None = None) -> list[dict]:
        """The fixed part of the chat: the system message (facts, rules, format) and the few-shot turns, as ``view``
        (default: the first) presents the options."""
        view = view or self.views()[0]
        shown, ids = view.shown(self.options), view.id_of
        system = {"role": "system", "content": system_prompt(info.get("facts") or {}, shown)}
        turns = []
        for ex in view.rotate(self.examples):
            turns += [
                {"role": "user", "content": user_message(ex.metrics, ex.history, shown, ids)},
                {"role": "assistant", "content": answer_text(ids[ex.decision])},
            ]
        return [system] + turns

    # ------------------------------------------------------------------ debiased choice
    @property
    def debias(self) -> dict[str, Any]:
        """The scoring settings (also in the log and in gate reports)."""
        return dict(
            calibrate=self.calibrate,
            permutations=self.permutations,
            option_ids=self.option_ids,
            length_norm=self.length_norm,
        )

    def n_examples(self) -> int:
        return len(self.examples)

    def views(self) -> list[View]:
        return make_views(list(self.options), self.n_examples(), self.permutations, self.option_ids)

    def choose(self, render_view) -> tuple[str, dict]:
        """Score the options under every view (``render_view(view, user=None)`` renders the prompt) and combine:
        per view, each option's log-probability (length-normalised if asked), normalised over the options, minus
        the content-free prior if calibrating; averaged over the views. Returns the best option and what to log."""
        per_view, prefill, raw_first = [], 0, None
        for view in self.views():
            text = render_view(view)
            self._last_prefix = text.prefix
            raw, n = self._view_scores(text, view)
            prefill += n
            raw_first = raw_first or raw
            s = _log_softmax(raw)
            if self.calibrate:
                prior = self._prior(render_view, view, text.prefix)
                s = {o: s[o] - prior[o] for o in s}
            per_view.append(s)
        combined = {o: float(np.mean([s[o] for s in per_view])) for o in self.options}
        choice = max(combined, key=combined.get)
        return choice, dict(
            option_scores={o: round(v, 4) for o, v in raw_first.items()},
            debiased_scores={o: round(v, 4) for o, v in combined.items()},
            prefill_tokens=prefill,
        )

    def _view_scores(self, text, view: View) -> tuple[dict[str, float], int]:
        """Each option's (summed or length-normalised) log-probability under ``view``'s ids."""
        ids = view.id_of
        tokens = {o: self._answer_tokens(ids[o]) for o in self.options}
        scores, n = self.option_scores(text.prefix, text.suffix, use_cache=self.prefix_cache, option_ids=tokens)
        if self.length_norm:
            scores = {o: v / len(tokens[o]) for o, v in scores.items()}
        return scores, n

    def _prior(self, render_view, view: View, prefix: str) -> dict[str, float]:
        """The normalised scores of the options on the content-free input, once per prefix and view."""
        key = (prefix, view.ids)
        if key not in self._content_free:
            raw, _ = self._view_scores(render_view(view, CONTENT_FREE), view)
            self._content_free[key] = _log_softmax(raw)
        return self._content_free[key]

    def decide(
        self, observation: dict, info: dict, metrics: Metrics | None = None, history: list[HistoryEntry] | None = None
    ) -> tuple[str, dict]:
        """Ask the model; returns the chosen option and what to log about it (``history``: see :meth:`prompt`)."""
        import torch

        text = self.prompt(observation, info, metrics, history)
        self._last_prefix = text.prefix  # (scoring sets it to the prefix of each view it renders)
        self.queries += 1
        t0 = time.perf_counter()
        details: dict[str, Any] = dict(
            mode=self.mode, prompt_sha256=_sha(text.text), prefix_sha256=_sha(text.prefix), suffix=text.suffix
        )
        with torch.inference_mode():
            if self.mode == "score":
                metrics = metrics or Metrics.from_step(observation, info)
                choice, scored = self.choose(
                    lambda view, user=None: self._render_view(view, info, metrics, history, user)
                )
                details.update(answer=choice, decision=choice, valid=True, **scored)
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

    # ------------------------------------------------------------------ gates (rudder.agents.llm.gates)
    def in_context_points(self) -> list[dict]:
        """The few-shot examples as labelled points (what the copy gate asks back)."""
        return [
            dict(metrics=asdict(ex.metrics), history=[asdict(h) for h in ex.history], decision=ex.decision)
            for ex in self.examples
        ]

    def answer_point(self, point: dict, facts: dict | None = None) -> str:
        """The option chosen at a labelled point (``point["metrics"]``, ``point["history"]``: dicts as
        :func:`rudder.agents.llm.prompt.examples_from_trace` writes them), without touching the history."""
        import torch

        metrics = Metrics.from_dict(point["metrics"])
        history = [HistoryEntry.from_dict(h) for h in point.get("history") or []]
        info = {"facts": dict(facts or {})}
        if self.mode == "score":
            with torch.inference_mode():
                return self.choose(lambda view, user=None: self._render_view(view, info, metrics, history, user))[0]
        text = self._render_view(self.views()[0], info, metrics, history)
        answer, _, _ = self._generate(text.prefix, text.suffix)
        parsed, _ = parse_answer(answer, self.options)
        return parsed if parsed is not None else self.fallback

    # ------------------------------------------------------------------ model plumbing
    def _ids(self, text: str):
        import torch

        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)

    def _tokenize_options(self) -> dict[str, list[int]]:
        """Token ids that follow the answer prefix in each option's whole answer (``{"decision": "keep"}``), tokenised
        as the examples' answers are: the option, its closing quote and brace (often one token, ``"}``)."""
        out = {option: self._answer_tokens(option) for option in self.options}
        if len({tuple(v) for v in out.values()}) != len(out):
            raise ValueError(f"options {list(out)} are not distinguishable by this tokenizer")
        if self.option_ids == "letters":
            letters = [self._answer_tokens(c) for c in LETTERS[: len(self.options)]]
            if len({tuple(v) for v in letters}) != len(letters):
                raise ValueError("option letters are not distinguishable by this tokenizer")
        return out

    def _answer_tokens(self, answer_id: str) -> list[int]:
        """Tokens of ``answer_id``'s whole answer after the answer prefix (cached)."""
        if answer_id not in self._answer_ids:
            tok = self.tokenizer
            base = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
            answer = answer_text(answer_id)
            full = tok(answer, add_special_tokens=False)["input_ids"]
            if full[: len(base)] == base:
                self._answer_ids[answer_id] = full[len(base) :]
            else:  # the tokenizer merges across the boundary: score the rest of the answer tokenised on its own
                self._answer_ids[answer_id] = tok(answer[len(ANSWER_PREFIX) :], add_special_tokens=False)["input_ids"]
        return self._answer_ids[answer_id]

    def _prefix_state(self, prefix: str):
        """(prefix ids, KV cache of the prefix), computed once per distinct prefix."""
        from transformers import DynamicCache

        if self._prefix is None or self._prefix[0] != prefix:
            if prefix not in self._prefixes:
                ids = self._ids(prefix)
                cache = DynamicCache(config=self.model.config)
                if ids.shape[1]:
                    self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                if len(self._prefixes) > self.permutations:  # the oldest: the run's facts changed
                    self._prefixes.pop(next(iter(self._prefixes)))
                self._prefixes[prefix] = (ids, cache)
            self._prefix = (prefix, *self._prefixes[prefix])
        return self._prefix[1], self._prefix[2]

    def option_scores(
        self, prefix: str, suffix: str, use_cache: bool = True, option_ids: dict[str, list[int]] | None = None
    ) -> tuple[dict[str, float], int]:
        """Log-probability of every option's answer tokens (summed) after ``prefix + suffix``.

        With ``use_cache`` the prefix's KV cache is reused (copied) and only the suffix is prefilled; without, the
        whole prompt is. ``option_ids``: option -> the answer tokens to score for it (default: its name's).
        Returns the scores and the number of prompt tokens prefilled.
        """
        option_ids = option_ids or self._option_ids
        if self.client is not None:
            return self._endpoint_scores(prefix + suffix, option_ids)
        import torch

        with torch.inference_mode():
            return self._option_scores(prefix, suffix, use_cache, option_ids)

    def _endpoint_scores(self, prompt: str, option_ids: dict[str, list[int]]) -> tuple[dict[str, float], int]:
        """Each option's answer appended to ``prompt``, all in one request; the log-probabilities the endpoint echoes
        for the answer's tokens, summed. Returns the scores and the prompt tokens sent."""

        names = list(option_ids)
        by_tokens = {tuple(v): k for k, v in self._answer_ids.items()}
        rests = {o: answer_text(by_tokens.get(tuple(option_ids[o]), o))[len(ANSWER_PREFIX) :] for o in names}
        echoed = self.client.echo_logprobs([prompt + rests[o] for o in names])
        scores, sent = {}, 0
        for o, lp in zip(names, echoed):
            n = len(option_ids[o])
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

    def _option_scores(
        self, prefix: str, suffix: str, use_cache: bool, option_ids: dict[str, list[int]]
    ) -> tuple[dict[str, float], int]:
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
        scores = {o: float(first[ids[0]]) for o, ids in option_ids.items()}
        longest = max(len(ids) for ids in option_ids.values())
        if longest > 1:  # the options' later tokens, all options in one batch on copies of the prompt's cache
            names = list(option_ids)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            rows = torch.full((len(names), longest - 1), pad, dtype=torch.long)
            for i, o in enumerate(names):
                rest = option_ids[o][:-1]
                rows[i, : len(rest)] = torch.tensor(rest, dtype=torch.long)
            cache = out.cache
            cache.batch_repeat_interleave(len(names))
            logits = self.model(input_ids=rows, cache=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, o in enumerate(names):  # padding sits after each row's tokens, so it cannot affect them
                for t, token in enumerate(option_ids[o][1:]):
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
                    debias=self.debias,
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
