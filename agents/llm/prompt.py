"""Prompts for the LLM agent (Rudder's in-context agent): metrics, decision history, few-shot examples, answers.

A prompt is a chat, rendered with the model's own chat template::

    system     the run's facts (graph, partitions, halo, buffer, decay, period) and the rules of the game
    user       metrics of an example decision point        \\  few-shot examples, mined from a replay
    assistant  {"decision": "replace"}                     /  (:func:`examples_from_trace`)
    ...
    user       metrics of the current window + the last decisions with their measured effect
    assistant  {"decision": "                                 <- scoring mode appends this answer prefix

The system message and the examples change only when the run's facts do, so they form a fixed *prefix* whose KV cache
the agent computes once; each decision only prefills the *suffix* (:func:`render`).

The answer is one JSON object ``{"decision": "<option>"}``; :func:`parse_answer` is the strict validator used on
generated text. Options map a name to the fraction of ``j = min(n_candidates, n_evictable)`` candidates admitted:
Rudder's are ``{"keep": 0.0, "replace": 1.0}`` ("replace" is what MassiveGNN's periodic policy does every window).

Build the shipped example set (``agents/llm/examples.json``) from the training trace, which ``evaluate.py`` does not
score (the file records the trace rank's content fingerprint, so evaluation can tell where it was mined)::

    python -m rudder.agents.llm.prompt examples traces/train/small-metis2-f10x25-s2 --rank 0 -n 6 \
        --out agents/llm/examples.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from rudder.env.contract import admitted, top_fraction

DEFAULT_OPTIONS = {"keep": 0.0, "replace": 1.0}
ANSWER_PREFIX = '{"decision": "'
DEFAULT_EXAMPLES_PATH = Path(__file__).with_name("examples.json")
EXAMPLES_FORMAT = 1
_EXTRA_KEYS = {"reason": str}  # keys an answer may carry beside "decision", with their JSON type


def check_options(options: dict[str, float] | None) -> dict[str, float]:
    """Validate an option set (name -> fraction of the admissible candidates, in [0, 1])."""
    options = dict(DEFAULT_OPTIONS if options is None else options)
    if len(options) < 2:
        raise ValueError(f"an LLM needs at least two options to choose from, got {list(options)}")
    for name, fraction in options.items():
        if not isinstance(name, str) or not name or name != name.strip() or '"' in name or "\\" in name:
            raise ValueError(f"option names must be non-empty strings without quotes or edge spaces, got {name!r}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"option {name!r}: fraction must be in [0, 1], got {fraction}")
    return {name: float(f) for name, f in options.items()}


# ---------------------------------------------------------------------------------------------- metrics, history
@dataclass
class Metrics:
    """What the agent tells the model about one decision point (rates in [0, 1], rows per minibatch)."""

    decision: int
    minibatch: int
    total_minibatches: int
    window_minibatches: int
    hit_rate: float  # last window: hits / remote rows sampled
    cum_hit_rate: float  # since the start
    sampled_per_mb: float  # remote rows sampled per minibatch
    fetched_per_mb: float  # remote rows fetched per minibatch: misses + prefetched (the traffic)
    misses_per_mb: float
    prefetched_per_mb: float
    occupancy: float  # fraction of slots holding a row
    stale_fraction: float  # fraction of slots below the eviction threshold
    n_candidates: int
    n_evictable: int

    @classmethod
    def from_step(cls, observation: dict, info: dict) -> Metrics:
        w, c = info.get("window") or {}, info.get("counters") or {}
        mb = max(int(w.get("minibatches", 0)), 1)
        facts = info.get("facts") or {}
        return cls(
            decision=int(info.get("decision", 0)),
            minibatch=int(info.get("minibatch", 0)),
            total_minibatches=int(facts.get("total_minibatches", 0)),
            window_minibatches=int(w.get("minibatches", 0)),
            hit_rate=w.get("hits", 0) / max(w.get("remote_sampled", 0), 1),
            cum_hit_rate=c.get("hits", 0) / max(c.get("remote_sampled", 0), 1),
            sampled_per_mb=w.get("remote_sampled", 0) / mb,
            fetched_per_mb=w.get("remote_fetched", 0) / mb,
            misses_per_mb=w.get("misses", 0) / mb,
            prefetched_per_mb=w.get("prefetched", 0) / mb,
            occupancy=float(observation["buffer"][0]),
            stale_fraction=float(observation["buffer"][3]),
            n_candidates=int(info.get("n_candidates", 0)),
            n_evictable=int(info.get("n_evictable", 0)),
        )

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class HistoryEntry:
    """A past decision: the metrics it was taken on (``before``) and those of the window that followed (``after``)."""

    option: str
    rows: int  # candidates it admitted
    before: Metrics
    after: Metrics | None = None

    @classmethod
    def from_dict(cls, d: dict) -> HistoryEntry:
        return cls(
            option=d["option"],
            rows=int(d["rows"]),
            before=Metrics.from_dict(d["before"]),
            after=Metrics.from_dict(d["after"]) if d.get("after") else None,
        )


class DecisionHistory:
    """The agent's own memory of its last ``length`` decisions and their measured effect."""

    def __init__(self, length: int = 4):
        if length < 0:
            raise ValueError(f"history length must be >= 0, got {length}")
        self.length = length
        self._done: deque[HistoryEntry] = deque(maxlen=length or None)
        self._pending: HistoryEntry | None = None

    def reset(self) -> None:
        self._done.clear()
        self._pending = None

    def observe(self, metrics: Metrics) -> None:
        """The window after the last decision has run: its metrics are that decision's effect."""
        if self._pending is not None:
            self._pending.after = metrics
            if self.length:
                self._done.append(self._pending)
            self._pending = None

    def record(self, option: str, rows: int, metrics: Metrics) -> None:
        """A decision was just taken on ``metrics``."""
        self._pending = HistoryEntry(option, int(rows), metrics)

    def recent(self, now: Metrics | None = None) -> list[HistoryEntry]:
        """The last ``length`` decisions with a known effect; given ``now`` (the metrics of the window after the
        last decision), that decision too, as :meth:`observe` would make it (without changing the history)."""
        done = list(self._done)
        if now is not None and self._pending is not None and self.length:
            done = done + [HistoryEntry(self._pending.option, self._pending.rows, self._pending.before, now)]
            done = done[-self.length :]
        return done


# ---------------------------------------------------------------------------------------------- messages
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _describe_option(name: str, fraction: float, k: int | str) -> str:
    if fraction == 0.0:
        return f'"{name}": change nothing; no prefetch traffic.'
    share = "every" if fraction == 1.0 else f"{100 * fraction:.0f}% of the"
    return (
        f'"{name}": refill {share} stale or empty slot(s) with the most-missed remote nodes not in the buffer '
        f"(at most {k} per decision); those rows are fetched right away (prefetch traffic)."
    )


def system_prompt(facts: dict, options: dict[str, float]) -> str:
    """Facts of the run (``info["facts"]``) and the rules of the game, with the answer format."""
    f = dict(facts)
    alpha, period = float(f.get("alpha", 0.05)), int(f.get("period", 8))
    threshold = (1 - alpha) ** period
    halo, cap = f.get("halo_nodes"), f.get("capacity")
    share = f" ({_pct(cap / halo)} of them)" if isinstance(halo, int) and isinstance(cap, int) and halo else ""
    lines = [
        "You steer the prefetch buffer of one trainer in distributed GNN training (DistDGL).",
        "",
        "Facts:",
        f"- Graph {f.get('graph', '?')} with {f.get('num_nodes', '?')} nodes, split into {f.get('parts', '?')} "
        f"partitions by {f.get('partitioning', '?')}; this is trainer rank {f.get('rank', '?')}.",
        f"- Its minibatches need features of {halo if halo is not None else '?'} remote (halo) nodes stored on other "
        f"machines; the buffer keeps {cap if cap is not None else '?'} of them locally{share}.",
        f"- Sampling fanout {f.get('fanout', '?')}, batch size {f.get('batch_size', '?')}, "
        f"{f.get('total_minibatches', '?')} minibatches in the run; you decide once every {period} minibatches.",
        f"- Every buffered row has a score that is multiplied by {1 - alpha:.2f} each minibatch and reset to 1 when "
        f"the row is used (a hit). A row whose score fell below the eviction threshold {threshold:.3f} "
        f"(= {1 - alpha:.2f}^{period}) was not used for more than {period} minibatches: it is stale.",
        "",
        "Rules:",
        "- Traffic = remote feature rows fetched over the network = rows missed by the buffer (fetched on demand) "
        "plus rows prefetched. The goal is the least total traffic over the whole run.",
        "- A hit costs no traffic. Prefetching costs traffic now and pays off only if the new rows are hit later "
        "more often than the stale rows they replace would have been.",
        "- Each decision, choose one option:",
        *[f"  {_describe_option(name, frac, f.get('candidates', 'K'))}" for name, frac in options.items()],
        "",
        "Answer with one JSON object and nothing else: "
        + " or ".join(json.dumps({"decision": name}) for name in options)
        + ".",
    ]
    return "\n".join(lines)


def user_message(
    m: Metrics, history: list[HistoryEntry], options: dict[str, float], ids: dict[str, str] | None = None
) -> str:
    """Metrics of the current decision point and the recent decisions with their measured effect (``options``
    keyed by the ids the prompt shows; ``ids`` maps a past decision's option to its shown id)."""
    ids = ids or {}
    total = m.total_minibatches
    progress = f", {_pct(m.minibatch / total)} of the run" if total else ""
    rows = ", ".join(f"{name} {admitted(frac, m.n_candidates, m.n_evictable)}" for name, frac in options.items())
    lines = [
        f"Decision {m.decision} at minibatch {m.minibatch} of {total or '?'}{progress}.",
        f"Last window ({m.window_minibatches} minibatches): hit rate {_pct(m.hit_rate)} "
        f"(since the start {_pct(m.cum_hit_rate)}).",
        f"Per minibatch: {m.sampled_per_mb:.0f} remote rows sampled, traffic {m.fetched_per_mb:.0f} rows "
        f"({m.misses_per_mb:.0f} missed + {m.prefetched_per_mb:.0f} prefetched).",
        f"Buffer: {_pct(m.occupancy)} full, {_pct(m.stale_fraction)} of slots stale; {m.n_evictable} slots stale or "
        f"empty, {m.n_candidates} candidates.",
        f"Rows each option would prefetch now: {rows}.",
    ]
    done = [e for e in history if e.after is not None]
    if done:
        lines.append("Recent decisions and their effect (window before -> window after):")
        for e in done:
            a = e.after
            lines.append(
                f"- decision {e.before.decision}: {ids.get(e.option, e.option)} ({e.rows} rows): hit rate "
                f"{_pct(e.before.hit_rate)} -> {_pct(a.hit_rate)}, traffic {e.before.fetched_per_mb:.0f} -> "
                f"{a.fetched_per_mb:.0f} rows/minibatch"
            )
    else:
        lines.append("Recent decisions: none yet.")
    return "\n".join(lines)


def answer_text(option: str) -> str:
    return json.dumps({"decision": option})


# ---------------------------------------------------------------------------------------------- rendering
@dataclass
class PromptText:
    """A rendered prompt split where the fixed part ends. ``prefix`` = system + examples (cacheable); ``suffix`` =
    the current user turn and the opened assistant turn (+ the answer prefix when scoring)."""

    prefix: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def render(
    tokenizer, prefix_messages: list[dict], user: str, answer_prefix: str = "", middle: list[dict] | None = None
) -> PromptText:
    """Render ``prefix_messages + middle + [user]`` with the tokenizer's chat template and open the assistant turn;
    ``middle`` (e.g. examples retrieved for this decision) belongs to the suffix, not the cached prefix.

    Falls back to an empty prefix (no cache reuse, same prompt) if the template does not render the prefix messages
    as a prefix of the whole chat.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: the LLM agent needs an instruct/chat model")
    full = tokenizer.apply_chat_template(
        prefix_messages + list(middle or []) + [{"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prefix = tokenizer.apply_chat_template(prefix_messages, tokenize=False) if prefix_messages else ""
    if not full.startswith(prefix):
        prefix = ""
    return PromptText(prefix, full[len(prefix) :] + answer_prefix)


# ---------------------------------------------------------------------------------------------- answers
def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys")
    return dict(pairs)


_FENCE_OPEN = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*(\n|$)")


def parse_answer(text, options) -> tuple[str | None, str]:
    """Strictly validate a generated answer. Returns ``(option, "")`` or ``(None, why it was rejected)``.

    Accepted: exactly one JSON object ``{"decision": <option>}`` whose value is one of ``options`` (exact spelling),
    optionally with a string ``"reason"``; surrounding whitespace and a leading and/or trailing markdown fence
    (```` ```json ````) are allowed. Rejected: anything else (other text, truncated JSON, other keys, wrong types,
    unknown options, duplicate keys).
    """
    if not isinstance(text, str):
        return None, f"answer is {type(text).__name__}, not text"
    s = text.strip()
    fence = _FENCE_OPEN.match(s)
    if fence:
        s = s[fence.end() :]
    if s.endswith("```"):
        s = s[:-3]
    s = s.strip()
    if not s:
        return None, "empty answer"
    if not s.startswith("{"):
        return None, "not a JSON object"
    try:
        obj = json.loads(s, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if "decision" not in obj:
        return None, 'no "decision" key'
    decision = obj["decision"]
    if not isinstance(decision, str):
        return None, f'"decision" is {type(decision).__name__}, not a string'
    if decision not in options:
        return None, f"unknown option {decision!r}"
    for key, value in obj.items():
        if key == "decision":
            continue
        if key not in _EXTRA_KEYS:
            return None, f"unexpected key {key!r}"
        if not isinstance(value, _EXTRA_KEYS[key]):
            return None, f"{key!r} is {type(value).__name__}, not {_EXTRA_KEYS[key].__name__}"
    return decision, ""


# ---------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    """A labelled decision point: its metrics and history (the user turn) and the best option (the answer)."""

    metrics: Metrics
    history: list[HistoryEntry]
    decision: str

    def messages(self, options: dict[str, float]) -> list[dict]:
        return [
            {"role": "user", "content": user_message(self.metrics, self.history, options)},
            {"role": "assistant", "content": answer_text(self.decision)},
        ]


def load_examples(source, options: dict[str, float]) -> list[Example]:
    """Examples from ``"default"`` (the shipped set), a JSON file path, a list of dicts or :class:`Example` s, or
    None (no examples). Every example's decision must be one of ``options``."""
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        path = DEFAULT_EXAMPLES_PATH if source == "default" else Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"examples file {path} not found (build it: python -m rudder.agents.llm.prompt examples "
                f"TRACE --out {path})"
            )
        data = json.loads(path.read_text())
        if data.get("format") != EXAMPLES_FORMAT:
            raise ValueError(f"examples file {path}: format {data.get('format')!r}, expected {EXAMPLES_FORMAT}")
        source = data["examples"]
    out = []
    for ex in source:
        if not isinstance(ex, Example):
            ex = Example(
                Metrics.from_dict(ex["metrics"]), [HistoryEntry.from_dict(h) for h in ex["history"]], ex["decision"]
            )
        if ex.decision not in options:
            raise ValueError(f"example answer {ex.decision!r} is not one of the options {list(options)}")
        out.append(ex)
    return out


def examples_trained_on(source) -> list:
    """What the examples ``source`` (as :func:`load_examples` takes it) were mined from, as an agent's
    ``trained_on``: the fingerprints an examples file records; ``[]`` for no examples; for a file without
    fingerprints (an older one) its trace name and rank, which can show a rank trained on but never held out; for
    examples given in memory, an entry that matches nothing (provenance ``unknown``)."""
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        path = DEFAULT_EXAMPLES_PATH if source == "default" else Path(source)
        data = json.loads(path.read_text())
        if isinstance(data.get("trained_on"), list):
            return data["trained_on"]
        return [dict(trace=data.get("trace"), rank=data.get("rank"))]
    return [dict(trace=None, note="examples given in memory: their source is not known")]


def example_messages(examples: list[Example], options: dict[str, float]) -> list[dict]:
    return [msg for ex in examples for msg in ex.messages(options)]


def _option_action(fraction: float, observation: dict, info: dict) -> np.ndarray:
    return top_fraction(fraction, info, observation["candidates"].shape[0])


def _rollout_traffic(env, action: np.ndarray, horizon: int) -> int:
    """Remote rows fetched over ``horizon`` windows: ``action`` now, then no prefetch."""
    fetched = 0
    for step in range(horizon):
        if env.episode.done:
            break
        _, _, _, _, info = env.step(action if step == 0 else np.zeros_like(action))
        fetched += int(info["window"]["remote_fetched"])
    return fetched


BEHAVIOURS = ("keep", "replace", "alternate")


def examples_from_trace(
    trace_dir,
    rank: int = 0,
    n: int = 6,
    horizon: int = 2,
    options: dict | None = None,
    history: int = 4,
    behaviours=BEHAVIOURS,
    **env_kwargs,
) -> list[dict]:
    """Mine labelled examples from a recorded trace by trying every option from the same state.

    The trace is replayed under each behaviour policy (``keep`` always, ``replace`` always, ``alternate``) so that
    decision points see different buffer states and histories. At every decision point where the options differ
    (some candidate can be admitted), the episode is deep-copied, each option is played for the next window followed
    by ``horizon - 1`` windows without prefetching, and the option with the fewest remote rows fetched over those
    windows is the label (ties: the smaller fraction). Of the distinct points, the ``n`` with the largest traffic
    margin are kept, balanced between labels and interleaved. Returns JSON-ready dicts (``load_examples`` reads them).
    """
    from rudder.env.replay_env import ReplayEnv

    options = check_options(options)
    env = ReplayEnv(trace_dir, rank=rank, **env_kwargs)
    points, seen = [], set()
    smallest = min(options, key=options.get)
    largest = max(options, key=options.get)
    for behaviour in behaviours:
        obs, info = env.reset(seed=0)
        memory = DecisionHistory(history)
        done = False
        while not done:
            metrics = Metrics.from_step(obs, info)
            memory.observe(metrics)
            j = min(info["n_candidates"], info["n_evictable"])
            if j > 0:
                snapshot = copy.deepcopy(env.episode)
                traffic = {}
                for name, fraction in options.items():
                    env.episode = copy.deepcopy(snapshot)
                    traffic[name] = _rollout_traffic(env, _option_action(fraction, obs, info), horizon)
                env.episode = snapshot
                best = min(options, key=lambda o: (traffic[o], options[o]))
                worst = max(traffic.values())
                user = user_message(metrics, memory.recent(), options)
                if user not in seen:
                    seen.add(user)
                    points.append(
                        dict(
                            metrics=asdict(metrics),
                            history=[asdict(e) for e in memory.recent()],
                            decision=best,
                            traffic=traffic,
                            margin=(worst - traffic[best]) / max(worst, 1),
                            behaviour=behaviour,
                            user=user,
                        )
                    )
            if behaviour == "alternate":
                option = largest if info["decision"] % 2 == 0 else smallest
            else:
                option = behaviour if behaviour in options else smallest
            if j > 0:
                memory.record(option, admitted(options[option], info["n_candidates"], info["n_evictable"]), metrics)
            obs, _, terminated, truncated, info = env.step(_option_action(options[option], obs, info))
            done = terminated or truncated
    by_label: dict[str, list[dict]] = {}
    for p in sorted(points, key=lambda p: -p["margin"]):
        by_label.setdefault(p["decision"], []).append(p)
    queues = sorted(by_label.values(), key=len, reverse=True)
    chosen = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    for p in chosen:
        p["margin"] = round(p["margin"], 6)
    return chosen


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rudder.agents.llm.prompt", description="Mine few-shot examples from a trace."
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("examples", help="mine labelled examples from a trace into a JSON file")
    e.add_argument("trace", help="trace folder")
    e.add_argument("--rank", type=int, default=0, help="trainer rank")
    e.add_argument("-n", type=int, default=6, help="examples to keep")
    e.add_argument("--horizon", type=int, default=2, help="windows each option is played for")
    e.add_argument("--history", type=int, default=4, help="past decisions in each example")
    e.add_argument("--out", default=str(DEFAULT_EXAMPLES_PATH), help="output JSON")
    args = p.parse_args(argv)
    examples = examples_from_trace(args.trace, rank=args.rank, n=args.n, horizon=args.horizon, history=args.history)
    from rudder.traces.fingerprint import rank_fingerprint

    doc = dict(
        format=EXAMPLES_FORMAT,
        about=(
            "Few-shot examples for rudder.agents.llm.agent.LLMAgent, mined by "
            "rudder.agents.llm.prompt.examples_from_trace: at "
            "each decision point of the trace replayed under the keep/replace/alternate behaviours, every "
            "option was played from a copy of the same state for `horizon` windows (then no prefetch); the "
            "label is the option with the fewest remote rows fetched. Kept: the n points with the largest "
            "margin, balanced between labels. 'user' is the rendered text, for reading only: the agent "
            "re-renders it from 'metrics' and 'history'."
        ),
        command=(
            "python -m rudder.agents.llm.prompt examples "
            + os.path.relpath(args.trace)
            + f" --rank {args.rank} -n {args.n} --horizon {args.horizon} --history {args.history} "
            f"--out {os.path.relpath(args.out)}"
        ),
        trace=os.path.basename(os.path.normpath(args.trace)),
        rank=args.rank,
        horizon=args.horizon,
        trained_on=[rank_fingerprint(args.trace, args.rank)],
        options=DEFAULT_OPTIONS,
        examples=examples,
    )
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    labels = [ex["decision"] for ex in examples]
    print(f"wrote {len(examples)} examples to {args.out}: " + ", ".join(f"{o} {labels.count(o)}" for o in set(labels)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
