"""The LLM agent on link-budget levels: each window it chooses how much the link should prefetch in the background.

Where :class:`rudder.agents.llm.agent.LLMAgent` answers Rudder's keep/replace over the misses ranking,
:class:`LLMLinkAgent` picks
one of the env's link-budget levels (``levels=``, :class:`rudder.env.episode.PrefetchEpisode`) over the sampler
lookahead's candidates, with the goal of the least *time*, and is told what a systems person would look at: link
utilisation, stall and compute seconds per minibatch (the time a background prefetch can hide in), what each option
would bring and evict (``info["choices"]``: rows, link seconds, predicted need in vs out), late and unused prefetches.
The model, prompt rendering, prefix cache and log-probability scoring are :class:`~rudder.agents.llm.agent.LLMAgent`'s.

Few-shot examples are mined from a replay (:func:`examples_from_trace`): at each decision point every option is
played from the same state (:meth:`rudder.env.replay_env.ReplayEnv.snapshot`) for a few windows and the one with the
fewest modelled seconds is the label. Build the shipped set from the training traces, which ``evaluate.py`` does
not score::

    python -m rudder.agents.llm.link examples traces/train/emu2-metis2-f10x25-250mbit-s1 --rank 0 -n 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from rudder.agents.llm.agent import CONTENT_FREE, LLMAgent, View
from rudder.agents.llm.prompt import ANSWER_PREFIX, EXAMPLES_FORMAT, _pct, render
from rudder.env.buffer import PREFETCH_CHUNK
from rudder.env.contract import BufferSettings
from rudder.env.timing import prefetch_net_s

LINK_OPTIONS = {"none": 0.0, "eighth": 0.125, "quarter": 0.25, "half": 0.5, "all": 1.0}
DEFAULT_LINK_EXAMPLES = Path(__file__).with_name("link_examples.json")
DEFAULT_LINK_POOL = Path(__file__).with_name("link_pool.json")
CONSEQUENCE_WINDOWS = 2  # windows an option's predicted net time is over (MPC's horizon)


@dataclass
class LinkMetrics:
    """What the agent tells the model about one decision point (seconds per minibatch, rows per minibatch)."""

    decision: int
    minibatch: int
    total_minibatches: int
    hit_rate: float
    misses_per_mb: float
    prefetched_per_mb: float
    fetch_ms: float  # per minibatch, stalls included
    stall_ms: float
    hide_ms: float  # sampling + compute per minibatch: what a background prefetch can hide in
    utilisation: float
    late: float  # late misses / rows requested
    unused: float  # prefetched rows evicted unused / rows arrived
    budget_rows: int
    choices: list  # per option: rows, link_s, evicts, evicts_hot, need_in, need_out

    @classmethod
    def from_step(cls, observation: dict, info: dict) -> LinkMetrics:
        w, link = info.get("window") or {}, info.get("link") or {}
        mb = max(int(w.get("minibatches", 0)), 1)
        facts = info.get("facts") or {}
        o = observation["link"]
        return cls(
            decision=int(info.get("decision", 0)),
            minibatch=int(info.get("minibatch", 0)),
            total_minibatches=int(facts.get("total_minibatches", 0)),
            hit_rate=w.get("hits", 0) / max(w.get("remote_sampled", 0), 1),
            misses_per_mb=w.get("misses", 0) / mb,
            prefetched_per_mb=w.get("prefetched", 0) / mb,
            fetch_ms=1000 * w.get("fetch_s", 0.0) / mb,
            stall_ms=1000 * w.get("stall_s", 0.0) / mb,
            hide_ms=1000 * (w.get("sample_s", 0.0) + w.get("compute_s", 0.0)) / mb,
            utilisation=float(link.get("utilisation", 0.0)),
            late=float(o[5]),
            unused=float(o[6]),
            budget_rows=int(link.get("budget_rows", 0)),
            choices=[
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}
                for c in info.get("choices") or []
            ],
        )

    @classmethod
    def from_dict(cls, d: dict) -> LinkMetrics:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def rank_facts(facts: dict) -> str:
    """The facts that differ between the ranks of a run (graph, partitions, rank, halo, buffer, period)."""
    f = dict(facts)
    return (
        f"Graph {f.get('graph', '?')}, {f.get('parts', '?')} partitions by {f.get('partitioning', '?')}; "
        f"trainer rank {f.get('rank', '?')}; {f.get('halo_nodes', '?')} remote nodes, a buffer of "
        f"{f.get('capacity', '?')} rows; you decide once every {int(f.get('period', 8))} minibatches."
    )


def link_system_prompt(facts: dict | None, options: dict[str, float], consequence: bool = False) -> str:
    """The rules and the answer format; with ``facts`` None the rank's facts are left out (they then follow the
    examples, so that every rank of a run shares this prefix); ``consequence``: the options' rows carry a predicted
    net time (:func:`predicted_ms`), which a rule explains."""
    return "\n".join(
        [
            "You steer background prefetching for one trainer in distributed GNN training (DistDGL) on a cluster.",
            "",
            "Facts:",
            *([f"- {rank_facts(facts)}"] if facts is not None else []),
            "- Each minibatch pulls the remote rows it misses over the network before it can compute: that wait is on "
            "the critical path. Rows prefetched in the background arrive while the trainer samples and computes.",
            "- Candidates are ranked by predicted need from the sampler's lookahead; a prefetched row replaces the "
            "resident predicted to be needed least.",
            "",
            "Rules:",
            "- The goal is the least training time. Too little prefetch leaves misses on the critical path; too much "
            "evicts rows still needed and makes misses wait behind prefetch traffic (stall).",
            "- The link budget is what the link can carry while the next window samples and computes. Each decision, "
            "choose how much of it to use:",
            *[f'  "{name}": {level:g} x the link budget' for name, level in options.items()],
            *(
                [
                    f"- Each option's predicted net ms is the time it adds over the next {CONSEQUENCE_WINDOWS} "
                    "windows: waits behind its prefetch traffic minus the demand pulls it saves. Negative saves "
                    "time; the lowest is predicted best."
                ]
                if consequence
                else []
            ),
            "",
            "Answer with one JSON object and nothing else: "
            + " or ".join(json.dumps({"decision": name}) for name in options)
            + ".",
        ]
    )


def predicted_ms(m: LinkMetrics, choice: dict, windows: int = 2) -> float:
    """An option's predicted net milliseconds over the next ``windows`` windows, from the point's own numbers (the
    env's link estimate gave each option's link seconds), as :class:`rudder.baselines.mpc.MPC` predicts them:
    demand pulls wait behind its prefetch traffic (half a chunk, in the share of minibatches the link is busy)
    less the demand pulls it saves (its rows' link time x their predicted need over the residents they replace,
    shrunk by as much as the traffic overruns the time it can hide in). Negative: it saves time."""
    n = int(choice["rows"])
    if n <= 0:
        return 0.0
    per_window = m.minibatch / m.decision if m.decision > 0 else 1.0  # minibatches per window
    link_s = float(choice["link_s"])
    hide_s = max(m.hide_ms * per_window * windows / 1000, 1e-9)
    chunk_s = link_s * min(n, PREFETCH_CHUNK) / n
    gain = choice["need_in"] - choice["need_out"]
    return 1000 * prefetch_net_s(link_s, chunk_s, link_s, gain, hide_s, per_window, windows)


def link_user_message(
    m: LinkMetrics, options: dict[str, float], choices: list | None = None, consequence: bool = False
) -> str:
    """The current window and what each option would do (``options`` keyed by the ids the prompt shows, in the order
    it lists them; ``choices`` the matching entries of ``m.choices``, default: ``m.choices`` in level order;
    ``consequence``: each with its :func:`predicted_ms`)."""
    choices = m.choices if choices is None else choices
    total = m.total_minibatches
    lines = [
        f"Decision {m.decision} at minibatch {m.minibatch} of {total or '?'}.",
        f"Last window per minibatch: hit rate {_pct(m.hit_rate)}, {m.misses_per_mb:.0f} rows missed, "
        f"{m.prefetched_per_mb:.0f} prefetched; fetch {m.fetch_ms:.1f} ms of which stall {m.stall_ms:.1f} ms; "
        f"sampling + compute {m.hide_ms:.1f} ms.",
        f"Link utilisation {_pct(m.utilisation)}; late prefetches {_pct(m.late)}, unused {_pct(m.unused)}; "
        f"link budget {m.budget_rows} rows.",
        "What each option would do:",
    ]
    for (name, _), c in zip(options.items(), choices):
        lines.append(
            f'- "{name}": {c["rows"]} rows ({1000 * c["link_s"]:.0f} ms of link), evicts {c["evicts"]} '
            f"({c['evicts_hot']} still needed); need in {c['need_in']:.3g} vs out {c['need_out']:.3g}"
            + (f"; predicted net {predicted_ms(m, c, CONSEQUENCE_WINDOWS):+.0f} ms" if consequence else "")
        )
    if not any(c["rows"] for c in m.choices):
        lines.append("No candidate can be admitted now: every option does nothing.")
    return "\n".join(lines)


def link_features(metrics: dict) -> np.ndarray:
    """A decision point's state as numbers to compare points by (retrieval): the window's rates and times (log
    scaled) and, per option, its link milliseconds, the share of its evictions still needed and need in - out."""
    m = metrics
    x = [
        m["hit_rate"],
        np.log1p(m["misses_per_mb"]),
        np.log1p(m["prefetched_per_mb"]),
        np.log1p(m["fetch_ms"]),
        np.log1p(m["stall_ms"]),
        np.log1p(m["hide_ms"]),
        m["utilisation"],
        m["late"],
        m["unused"],
        np.log1p(m["budget_rows"]),
    ]
    for c in m["choices"]:
        x += [np.log1p(1000 * c["link_s"]), c["evicts_hot"] / max(c["evicts"], 1), c["need_in"] - c["need_out"]]
    return np.asarray(x, dtype=float)


class ExamplePool:
    """Labelled points to retrieve few-shot examples from, by distance of :func:`link_features` (standardised over
    the pool)."""

    def __init__(self, points: list[dict]):
        if not points:
            raise ValueError("an example pool needs at least one labelled point")
        self.points = points
        feats = np.stack([link_features(p["metrics"]) for p in points])
        self.mean, self.scale = feats.mean(axis=0), feats.std(axis=0) + 1e-9
        self.features = (feats - self.mean) / self.scale

    def nearest(self, metrics: dict, k: int) -> list[dict]:
        """The ``k`` nearest points, the nearest last (next to the question); ties keep pool order."""
        x = (link_features(metrics) - self.mean) / self.scale
        d = np.sqrt(((self.features - x) ** 2).sum(axis=1))
        order = np.argsort(d, kind="stable")[:k]
        return [self.points[i] for i in order[::-1]]


class LLMLinkAgent(LLMAgent):
    """:class:`~rudder.agents.llm.agent.LLMAgent` choosing a link-budget level each window (see the module docstring).

    Args:
        options: option name -> link-budget level (default :data:`LINK_OPTIONS`, the env's default levels).
        examples: ``"default"`` (``agents/llm/link_examples.json`` when present, else none), a path, or None.
        retrieve: k (default 3): each decision shows the k labelled points of ``pool`` nearest to its state as
            examples, the nearest last, after the shared system prompt (so every rank shares that prefix) and
            before the rank's facts and the question; 0: the fixed ``examples`` instead. The default because it is
            the only method measured that passes the copy gate and answers differently at different states
            (BENCHMARKS.md, "LLM gates"); it still fails the sensitivity gate.
        pool: the labelled points to retrieve from: ``"default"`` (``agents/llm/link_pool.json``) or a path.
        consequence: each option's row also carries its predicted net milliseconds over the next windows
            (:func:`predicted_ms`, MPC's model on the point's numbers), and a rule says what it is.
        Other arguments as :class:`~rudder.agents.llm.agent.LLMAgent`.
    """

    name = "llm-link"

    def __init__(
        self,
        model=None,
        options: dict[str, float] | None = None,
        examples="default",
        retrieve: int = 3,
        pool="default",
        consequence: bool = False,
        **kwargs,
    ):
        options = dict(LINK_OPTIONS if options is None else options)
        levels = tuple(sorted(options.values()))
        self.settings = BufferSettings(ranking="lookahead", admit_on_miss=True, levels=levels)
        if examples == "default":
            examples = str(DEFAULT_LINK_EXAMPLES) if DEFAULT_LINK_EXAMPLES.is_file() else None
        self._link_examples = _load(examples, options)
        if int(retrieve) < 0:
            raise ValueError(f"retrieve must be >= 0, got {retrieve}")
        self.retrieve = int(retrieve)
        self.consequence = bool(consequence)
        self.pool = None
        pool_file = str(DEFAULT_LINK_POOL) if pool == "default" else pool
        if self.retrieve:
            self.pool = ExamplePool(_load(pool_file, options))
        super().__init__(
            model=model,
            options={n: min(v, 1.0) for n, v in options.items()},
            examples=None,
            **{k: v for k, v in kwargs.items() if k != "mode"},
        )
        self.link_options = options
        self.levels = levels
        shown = pool_file if self.retrieve else examples  # what the prompts' examples were mined from
        if shown is not None:
            self.trained_on = json.loads(Path(shown).read_text()).get("trained_on", [])

    def act(self, observation: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        import time

        t0 = time.perf_counter()
        self._facts = dict(info.get("facts") or {})
        m = LinkMetrics.from_step(observation, info)
        record: dict[str, Any] = dict(
            event="decision",
            decision_index=int(info.get("decision", self.decisions)),
            minibatch=int(info.get("minibatch", 0)),
        )
        rows = [c["rows"] for c in m.choices]
        if len(set(rows)) <= 1:  # every option does the same: nothing to ask
            choice = min(self.link_options, key=self.link_options.get)
            record.update(forced=True, decision=choice)
        else:
            choice, details = self._ask(m)
            record.update(forced=False, **details)
        self.decisions += 1
        record.update(latency_s=round(time.perf_counter() - t0, 4))
        self._log(record)
        return self.levels.index(self.link_options[choice])

    def _ask(self, m: LinkMetrics) -> tuple[str, dict]:
        import torch

        self.queries += 1
        with torch.inference_mode():
            choice, details = self.choose(lambda view, user=None: self._render_link(view, m, user))
        return choice, dict(decision=choice, **details)

    def _render_link(self, view: View, m: LinkMetrics, user: str | None = None):

        if user is None:
            user = link_user_message(m, view.shown(self.link_options), self._shown_choices(view, m), self.consequence)
        if not self.retrieve:
            return render(self.tokenizer, self._prefix_messages_link(view), user, ANSWER_PREFIX)
        shown, ids = view.shown(self.link_options), view.id_of
        middle = []
        if user != CONTENT_FREE:
            for ex in self.pool.nearest(asdict(m), self.retrieve):
                em = LinkMetrics.from_dict(ex["metrics"])
                middle += [
                    {
                        "role": "user",
                        "content": link_user_message(em, shown, self._shown_choices(view, em), self.consequence),
                    },
                    {"role": "assistant", "content": json.dumps({"decision": ids[ex["decision"]]})},
                ]
            user = f"{rank_facts(self._facts)}\n{user}"
        return render(self.tokenizer, self._prefix_messages_link(view), user, ANSWER_PREFIX, middle=middle)

    def _shown_choices(self, view: View, m: LinkMetrics) -> list:
        """``m.choices`` (in level order) in the order ``view`` lists the options."""
        by_option = dict(zip(sorted(self.link_options, key=self.link_options.get), m.choices))
        return [by_option[o] for o in view.order if o in by_option]

    def _prefix_messages_link(self, view: View | None = None) -> list[dict]:
        """The cached part of the chat: the system message and the fixed examples; with retrieval only the system
        message, without the rank's facts (every rank shares it)."""
        view = view or self.views()[0]
        shown, ids = view.shown(self.link_options), view.id_of
        if self.retrieve:
            return [{"role": "system", "content": link_system_prompt(None, shown, self.consequence)}]
        msgs = [{"role": "system", "content": link_system_prompt(self._facts, shown, self.consequence)}]
        for ex in view.rotate(self._link_examples):
            m = LinkMetrics.from_dict(ex["metrics"])
            msgs += [
                {
                    "role": "user",
                    "content": link_user_message(m, shown, self._shown_choices(view, m), self.consequence),
                },
                {"role": "assistant", "content": json.dumps({"decision": ids[ex["decision"]]})},
            ]
        return msgs

    _facts: dict = {}

    @property
    def debias(self) -> dict[str, Any]:
        """The scoring settings and what the prompt shows (retrieved examples, predicted consequences)."""
        return dict(super().debias, retrieve=self.retrieve, consequence=self.consequence)

    def n_examples(self) -> int:
        return 0 if self.retrieve else len(self._link_examples)  # retrieved examples keep their order

    def _prefix_messages(self, info: dict, view: View | None = None) -> list[dict]:
        self._facts = dict(info.get("facts") or {})
        return self._prefix_messages_link(view)

    # ------------------------------------------------------------------ gates (rudder.agents.llm.gates)
    def in_context_points(self, n: int = 6) -> list[dict]:
        """Labelled points that the prompt shows with their labels (what the copy gate asks back): the fixed
        examples, or with retrieval ``n`` pool points (each is its own nearest, so it is shown last): the
        largest-margin point of each label in turn."""
        if not self.retrieve:
            return [dict(metrics=ex["metrics"], decision=ex["decision"]) for ex in self._link_examples]
        queues = {o: [] for o in self.link_options}
        for p in sorted(self.pool.points, key=lambda p: -p["margin"]):
            queues[p["decision"]].append(p)
        out: list[dict] = []
        while len(out) < n and any(queues.values()):
            for option, q in queues.items():
                if q and len(out) < n:
                    out.append(dict(metrics=q.pop(0)["metrics"], decision=option))
        return out

    def answer_point(self, point: dict, facts: dict | None = None) -> str:
        """The option chosen at a labelled point (``point["metrics"]``: a :class:`LinkMetrics` dict)."""
        self._facts = dict(facts or {})
        return self._ask(LinkMetrics.from_dict(point["metrics"]))[0]


def _load(source, options: dict[str, float]) -> list[dict]:
    if source is None:
        return []
    data = json.loads(Path(source).read_text())
    if data.get("format") != EXAMPLES_FORMAT or data.get("action") != "link":
        raise ValueError(
            f"examples file {source}: not a link-level examples file (format {EXAMPLES_FORMAT}, action 'link')"
        )
    for ex in data["examples"]:
        if ex["decision"] not in options:
            raise ValueError(f"examples file {source}: answer {ex['decision']!r} is not one of {list(options)}")
    return data["examples"]


def examples_from_trace(
    trace_dir,
    rank: int = 0,
    n: int | None = 6,
    horizon: int = 3,
    options: dict[str, float] | None = None,
    ask: dict[str, Any] | None = None,
) -> list[dict]:
    """Label decision points of a replay by trying every option from the same state for ``horizon`` windows (the
    fewest modelled seconds wins; ties: the lower level). The trace is replayed under the middle option so the
    points see ordinary states; the ``n`` points with the largest margin are kept, balanced between labels
    (``n=None``: every point, in order).

    ``ask``: name -> agent choosing link-budget levels (``act(observation, info)`` -> level index, e.g. ``ppo-link``
    or ``mpc``). Each is reset, then asked at every window of the replay, so one that learns from the windows it has
    seen (MPC's link estimate) has seen the same history as the point; its action is not played (the replay stays
    under the middle option). Each point gets ``asked``: name -> the option that agent chose there."""
    from rudder.env.replay_env import ReplayEnv

    options = dict(LINK_OPTIONS if options is None else options)
    levels = tuple(sorted(options.values()))
    names = sorted(options, key=options.get)
    env = ReplayEnv(trace_dir, rank=rank, levels=levels, ranking="lookahead", admit_on_miss=True)
    obs, info = env.reset(seed=0)
    ask = dict(ask or {})
    option_of = {name: _option_of_index(agent, levels, names, name) for name, agent in ask.items()}
    for agent in ask.values():
        if hasattr(agent, "reset"):
            agent.reset()
    points, done = [], False
    middle = len(levels) // 2
    while not done:
        m = LinkMetrics.from_step(obs, info)
        asked = {name: option_of[name](agent.act(obs, info)) for name, agent in ask.items()}
        if len({c["rows"] for c in m.choices}) > 1:
            seconds = env.level_seconds(horizon)
            best = int(np.argmin(seconds))
            points.append(
                dict(
                    metrics=asdict(m),
                    decision=names[best],
                    seconds=[round(x, 5) for x in seconds],
                    margin=(max(seconds) - seconds[best]) / max(max(seconds), 1e-9),
                    **(dict(asked=asked) if ask else {}),
                )
            )
        obs, _, terminated, truncated, info = env.step(middle)
        done = terminated or truncated
    if n is None:
        return points
    by_label: dict[str, list[dict]] = {}
    for p in sorted(points, key=lambda p: -p["margin"]):
        by_label.setdefault(p["decision"], []).append(p)
    queues = sorted(by_label.values(), key=len, reverse=True)
    chosen: list[dict] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


def _option_of_index(agent, levels: tuple, names: list[str], label: str):
    """How to read ``agent``'s action as an option name: a level index into its own ``levels`` (or its settings'),
    which must be among the env's ``levels``; an agent that declares none indexes the env's."""
    own = getattr(agent, "levels", None) or getattr(getattr(agent, "settings", None), "levels", None) or levels
    own = tuple(float(x) for x in own)
    missing = [x for x in own if x not in levels]
    if missing:
        raise ValueError(f"agent {label!r}: levels {list(own)} are not all among the options' {list(levels)}")
    return lambda action: names[levels.index(own[int(action)])]


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rudder.agents.llm.link", description="Mine link-level few-shot examples."
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("examples", help="mine labelled examples from traces into a JSON file")
    e.add_argument("traces", nargs="+", help="trace folders (training traces: evaluate.py does not score them)")
    e.add_argument("--rank", type=int, default=0, help="trainer rank")
    e.add_argument("-n", type=int, default=6, help="examples to keep in all")
    e.add_argument("--horizon", type=int, default=3, help="windows each option is played for")
    e.add_argument("--out", default=str(DEFAULT_LINK_EXAMPLES), help="output JSON")
    q = sub.add_parser("pool", help="every labelled point of traces, to retrieve examples from (retrieve=k)")
    q.add_argument("traces", nargs="+", help="trace folders (training traces: evaluate.py does not score them)")
    q.add_argument("--ranks", default="0", help="trainer ranks, comma-separated")
    q.add_argument("--horizon", type=int, default=3, help="windows each option is played for")
    q.add_argument("--min-margin", type=float, default=0.005, help="least share of time the options differ by")
    q.add_argument("--out", default=str(DEFAULT_LINK_POOL), help="output JSON")
    args = p.parse_args(argv)
    from rudder.traces.fingerprint import rank_fingerprint

    if args.command == "pool":
        ranks = [int(r) for r in args.ranks.split(",")]
        points = [
            dict(p, trace=os.path.basename(os.path.normpath(t)), rank=r)
            for t in args.traces
            for r in ranks
            for p in examples_from_trace(t, r, None, args.horizon)
            if p["margin"] >= args.min_margin
        ]
        for p in points:
            p["margin"] = round(p["margin"], 6)
        doc = dict(
            format=EXAMPLES_FORMAT,
            action="link",
            options=LINK_OPTIONS,
            horizon=args.horizon,
            about="Labelled points for LLMLinkAgent(retrieve=k): each option played from the same replay state for "
            "`horizon` windows; the label has the fewest modelled seconds; points whose options differ by less "
            "than `min_margin` of the time are left out.",
            command="python -m rudder.agents.llm.link pool "
            + " ".join(os.path.relpath(t) for t in args.traces)
            + f" --ranks {args.ranks} --horizon {args.horizon} --min-margin {args.min_margin}",
            min_margin=args.min_margin,
            trained_on=[rank_fingerprint(t, r) for t in args.traces for r in ranks],
            examples=points,
        )
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        labels = [p["decision"] for p in points]
        print(f"wrote {len(points)} points to {args.out}: " + ", ".join(f"{o} {labels.count(o)}" for o in LINK_OPTIONS))
        return 0

    per = max(1, -(-args.n // len(args.traces)))
    examples = [ex for t in args.traces for ex in examples_from_trace(t, args.rank, per, args.horizon)][: args.n]
    doc = dict(
        format=EXAMPLES_FORMAT,
        action="link",
        options=LINK_OPTIONS,
        horizon=args.horizon,
        about="Few-shot examples for rudder.agents.llm.link.LLMLinkAgent: each option played from the same replay "
        "state for `horizon` windows; the label has the fewest modelled seconds.",
        command="python -m rudder.agents.llm.link examples "
        + " ".join(os.path.relpath(t) for t in args.traces)
        + f" --rank {args.rank} -n {args.n} --horizon {args.horizon}",
        trained_on=[rank_fingerprint(t, args.rank) for t in args.traces],
        examples=examples,
    )
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    labels = [ex["decision"] for ex in examples]
    print(f"wrote {len(examples)} examples to {args.out}: " + ", ".join(f"{o} {labels.count(o)}" for o in set(labels)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
