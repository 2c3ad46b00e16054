"""P5: the LLM agent's decisions on this machine: model loading, prompt prefill, decision latency (scored with and
without the prefix KV cache, generated), valid answers when generating (with and without the few-shot examples),
agreement with the option a replay measures as best, and traffic against periodic on the sample traces.

Decision points are those of a replay of the first sample trace (rank 0) under the periodic policy; labelled points
are mined from every rank of the sample traces, which the shipped examples were not mined from
(:func:`rudder.agents.llm.prompt.examples_from_trace`: each option played from a copy of the same state, the one with
the
fewest rows fetched over two windows is the label).
"""

from __future__ import annotations

import glob
import os
import statistics
import time

import numpy as np
import pandas as pd
from rudder.agents.llm import gates
from rudder.traces import Trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = sorted(glob.glob(os.path.join(ROOT, "traces", "samples", "*")))


def decision_points(trace: str, n: int, rank: int = 0) -> tuple[list, dict]:
    """The first ``n`` decision points (observation, info) with something to admit, replaying periodic on ``rank``
    (fewer where the trace ends first); and the first info."""
    from rudder.env.replay_env import ReplayEnv

    env = ReplayEnv(trace, rank=rank)
    obs, info = env.reset(seed=0)
    first, points, done = info, [], False
    while not done and len(points) < n:
        j = min(info["n_candidates"], info["n_evictable"])
        if j > 0:
            points.append((obs, info))
        action = np.zeros(env.k, dtype=np.int8)
        action[:j] = 1
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return points, first


def measure(quick: bool) -> pd.DataFrame:
    """One row per measured quantity: ``key``, ``what``, ``value``, ``unit``, ``n`` (decisions or points it is
    over)."""
    from rudder.agents.llm.agent import LLMAgent, shared_model
    from rudder.agents.llm.prompt import HistoryEntry, Metrics, examples_from_trace

    from rudder.evaluation.registry import make_agent
    from rudder.evaluation.scoring import evaluate_trace

    n = 6 if quick else 24
    rows = []

    def add(key, what, value, unit, count=1):
        rows.append(dict(key=key, what=what, value=value, unit=unit, n=count))

    t0 = time.perf_counter()
    model, tokenizer, info = shared_model(None)
    add("convert_s", "model: convert GGUF to fp32 (0 when cached)", info["prepare_s"], "s")
    add("load_s", "model: load", info["load_s"], "s")
    add("parameters", "model: parameters", info["parameters"], "")
    points, first = decision_points(SAMPLES[0], n)

    scored = LLMAgent(model=(model, tokenizer))
    add("prefill_s", "prefix prefill (system + 6 examples), once at start-up", scored.warm_up(first), "s")
    latency, uncached = [], []
    for obs, inf in points:
        t = time.perf_counter()
        scored.decide(obs, inf)
        latency.append(time.perf_counter() - t)
    add("scored_s", "scored decision, prefix cached (median)", statistics.median(latency), "s", len(latency))
    for obs, inf in points[:4]:
        text = scored.prompt(obs, inf)
        t = time.perf_counter()
        scored.option_scores(text.prefix, text.suffix, use_cache=False)
        uncached.append(time.perf_counter() - t)
    add(
        "scored_uncached_s",
        "scored decision, no prefix cache (median)",
        statistics.median(uncached),
        "s",
        len(uncached),
    )

    for label, examples in (("with the examples", "default"), ("without examples", None)):
        agent = LLMAgent(model=(model, tokenizer), mode="generate", examples=examples)
        agent.warm_up(first)
        latency = []
        for obs, inf in points:
            t = time.perf_counter()
            agent.decide(obs, inf)
            latency.append(time.perf_counter() - t)
        add(
            f"generated_s_{bool(examples)}",
            f"generated decision {label} (median)",
            statistics.median(latency),
            "s",
            len(latency),
        )
        add(
            f"valid_{bool(examples)}",
            f"generated answers that are valid JSON, {label}",
            agent.queries - agent.invalid_answers,
            "answers",
            agent.queries,
        )

    labelled = []
    for trace in SAMPLES[:1] if quick else SAMPLES:
        for rank in Trace(trace).ranks[:1] if quick else Trace(trace).ranks:
            facts = decision_points(trace, 0)[1]
            for p in examples_from_trace(trace, rank=rank, n=10**6):
                labelled.append((p, facts))
    agree = keep = 0
    for p, facts in labelled:
        choice, _ = scored.decide(
            {}, facts, Metrics.from_dict(p["metrics"]), [HistoryEntry.from_dict(h) for h in p["history"]]
        )
        agree += choice == p["decision"]
        keep += p["decision"] == "keep"
    add(
        "agreement",
        "agrees with the replay-measured best option (held-out points)",
        agree / len(labelled),
        "fraction",
        len(labelled),
    )
    add("always_keep", "always 'keep' would agree", keep / len(labelled), "fraction", len(labelled))

    traffic = {"llm": 0, "periodic": 0}
    for trace in SAMPLES[:1] if quick else SAMPLES:
        agents = {"llm": lambda t, r: make_agent("llm"), "periodic": lambda t, r: make_agent("periodic")}
        for row in evaluate_trace(trace, agents, oracles=()):
            traffic[row["agent"]] += row["remote_fetched"]
    add(
        "traffic_vs_periodic",
        "LLM remote rows fetched / periodic's, sample traces (scored, examples)",
        traffic["llm"] / traffic["periodic"],
        "ratio",
        1 if quick else len(SAMPLES),
    )
    add("wall_s", "wall time of this section", time.perf_counter() - t0, "s")
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    v, n = df.set_index("key")["value"], df.set_index("key")["n"]
    text = (
        f"SmolLM2-135M-Instruct (fp32, 2 cores): load {v['load_s']:.1f} s; prefix prefill {v['prefill_s']:.1f} s "
        f"once; a scored decision {v['scored_s']:.2f} s ({v['scored_uncached_s']:.1f} s without the prefix "
        f"cache); a generated one {v['generated_s_True']:.2f} s, valid JSON {v['valid_True']:.0f}/"
        f"{n['valid_True']} with the examples, {v['valid_False']:.0f}/{n['valid_False']} without. It agrees "
        f"with the replay-measured best option on {v['agreement']:.0%} of {n['agreement']} held-out points "
        f"(always 'keep': {v['always_keep']:.0%}); on the sample traces it fetches "
        f"{v['traffic_vs_periodic']:.3f}x periodic's remote rows."
    )
    return text, df.drop(columns="key")


# ---------------------------------------------------------------------------------------------- gates per method
# Scoring methods compared on the gates (rudder.agents.llm.gates): constructor options of the LLM agents.
METHODS = {
    "plain": dict(retrieve=0),
    "calibrated": dict(retrieve=0, calibrate=True),
    "length-norm": dict(retrieve=0, length_norm=True),
    "letters": dict(retrieve=0, option_ids="letters"),
    "letters+calibrated": dict(retrieve=0, option_ids="letters", calibrate=True),
    "permuted5+letters": dict(retrieve=0, option_ids="letters", permutations=5),
    "permuted5+letters+calibrated": dict(retrieve=0, option_ids="letters", permutations=5, calibrate=True),
    "permuted5+names+calibrated": dict(retrieve=0, permutations=5, calibrate=True),
    "retrieved3": dict(retrieve=3),
    "retrieved3+letters": dict(retrieve=3, option_ids="letters"),
    "retrieved3+letters+calibrated": dict(retrieve=3, option_ids="letters", calibrate=True),
    "retrieved3+permuted5+letters": dict(retrieve=3, option_ids="letters", permutations=5),
    "retrieved3+length-norm": dict(retrieve=3, length_norm=True),
    "permuted5": dict(retrieve=0, permutations=5),
    "retrieved3+permuted5": dict(retrieve=3, permutations=5),
    "consequence": dict(retrieve=0, consequence=True),
    "retrieved3+consequence": dict(retrieve=3, consequence=True),
}  # "retrieve" is the link agent's (the keep/replace agent has fixed examples only)
HELDOUT = sorted(glob.glob(os.path.join(ROOT, "traces", "heldout", "emu*")))
REFERENCES = gates.REFERENCES  # link-level agents asked at the same held-out points (seconds regret vs each)


def reference_agents() -> dict:
    """The shipped PPO link policy and MPC, by their registry names (:data:`REFERENCES`)."""
    from rudder.evaluation.registry import make_agent

    return {name: make_agent(name) for name in REFERENCES}


class NearestLabel:
    """No LLM: the label of the nearest pool point (``k=1``) or the majority of the ``k`` nearest (ties: the
    nearer), over the link agent's retrieval pool: what the retrieval agent would answer if it only copied."""

    def __init__(self, k: int = 1):
        import json

        from rudder.agents.llm.link import DEFAULT_LINK_POOL, LINK_OPTIONS, ExamplePool, LLMLinkAgent

        self.k, self.link_options, self.options = k, dict(LINK_OPTIONS), dict(LINK_OPTIONS)
        self.retrieve, self.pool = 3, ExamplePool(json.loads(DEFAULT_LINK_POOL.read_text())["examples"])
        self.in_context_points = lambda: LLMLinkAgent.in_context_points(self)
        self.debias = {}

    def answer_point(self, point: dict) -> str:
        from collections import Counter

        near = self.pool.nearest(point["metrics"], self.k)
        votes = Counter(p["decision"] for p in near)
        return next(p["decision"] for p in reversed(near) if votes[p["decision"]] == max(votes.values()))


class LeastPredicted(NearestLabel):
    """No LLM: the option with the least predicted net time (:func:`rudder.agents.llm.link.predicted_ms`, the
    number ``consequence=True`` shows; ties: the lower level): what an agent that read that number would answer."""

    def answer_point(self, point: dict) -> str:
        from rudder.agents.llm.link import CONSEQUENCE_WINDOWS, LinkMetrics, predicted_ms

        m = LinkMetrics.from_dict(point["metrics"])
        names = sorted(self.link_options, key=self.link_options.get)
        got = [predicted_ms(m, c, CONSEQUENCE_WINDOWS) for c in m.choices]
        return names[min(range(len(got)), key=lambda i: (got[i], i))]


def gate_method(
    method: str,
    kind: str = "link",
    parts=("copy", "sensitivity", "heldout"),
    limit: int = 16,
    pairs: int = 3,
    agent_kwargs: dict | None = None,
) -> dict:
    """One method's gate figures for the link-budget (``kind="link"``) or keep/replace agent of the default model,
    on the held-out emulated-cluster traces (at most ``limit`` points; ``pairs`` base points per pair kind). For the
    link agent the held-out part also has PPO's and MPC's answers at the same points (:data:`REFERENCES`) and the
    seconds regret against each (``accuracy["vs"]``)."""
    from collections import Counter

    from rudder.agents.llm.agent import LLMAgent, shared_model
    from rudder.agents.llm.link import LLMLinkAgent

    if method.startswith("nearest"):  # nearest1, nearest3: no model
        options, agent = {}, NearestLabel(int(method[len("nearest") :]))
    elif method == "least-predicted":  # no model
        options, agent = {}, LeastPredicted()
    else:
        options = dict(METHODS[method], **(agent_kwargs or {}))
        if kind != "link":
            options.pop("retrieve", None)
        model, tokenizer, _ = shared_model(None)
        agent = (LLMLinkAgent if kind == "link" else LLMAgent)(model=(model, tokenizer), **options)
    points = gates.heldout_points(kind, HELDOUT, limit=limit, ask=reference_agents() if kind == "link" else None)
    level = dict(agent.link_options) if kind == "link" else dict(agent.options)
    out: dict = dict(method=method, kind=kind, settings=options)
    t0 = time.perf_counter()
    if "copy" in parts:
        shown = agent.in_context_points()
        answers = [agent.answer_point(p) for p in shown]
        out["copy"] = [sum(a == p["decision"] for a, p in zip(answers, shown)), len(answers)]
        out["copy_answers"] = answers
    if "sensitivity" in parts:
        made = (gates.link_pairs if kind == "link" else gates.keep_pairs)(points, pairs)
        out["sensitivity"] = list(gates.sensitivity_gate(agent.answer_point, made, level))
    if "heldout" in parts:
        answers = [agent.answer_point(p) for p in points]
        out["entropy_bits"] = gates.entropy_bits(answers)
        seconds = [p["seconds"] for p in points] if kind == "link" else None
        references = {n: [p["asked"][n] for p in points] for n in REFERENCES} if kind == "link" else None
        out["accuracy"] = gates.accuracy_vs_constant(
            answers, [p["decision"] for p in points], list(level), seconds=seconds, references=references
        )
        if references:
            out["reference_answers"] = references
        out["answers"] = dict(Counter(answers))
        out["heldout_answers"] = answers
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":  # python -m rudder.bench.llm_decisions BUDGET_S KIND PARTS METHOD...: JSON lines
    import json
    import sys

    budget, kind, parts, *methods = sys.argv[1:]
    start = time.perf_counter()
    for method in methods:
        row = gate_method(method, kind, tuple(parts.split(",")))
        print(json.dumps(row), flush=True)
        if time.perf_counter() - start + row["seconds"] > float(budget):
            break  # the next would not fit the budget
