"""P7: the LLM size curve on link-budget decisions: decision quality, latency and memory per model.

Labelled decision points come from the held-out emulated-cluster traces
(:func:`rudder.agents.llm.link.examples_from_trace`
with every point kept: each option played from the same replay state for 3 windows, the label has the fewest
modelled seconds). Each model, loaded in a process of its own (so its peak memory is its own), answers every point
through :class:`rudder.agents.llm.link.LLMLinkAgent` (scored by log-probability, the shipped few-shot examples, the KV
cache
of the fixed prefix reused). Quality: agreement with the label and *seconds regret*, the modelled seconds of the
chosen option over the best option's, summed over the points (0 is the oracle; "always <option>" rows give the
reference).

Only the default model is loaded here (its weights pinned by SHA-256, ``rudder.agents.llm.models``). Larger models
are measured through an OpenAI-compatible endpoint whose weights come from their publisher, e.g. on a GPU node::

    vllm serve Qwen/Qwen2.5-1.5B-Instruct --port 8000        # or: llama-server -m qwen2.5-1.5b-instruct.gguf
    RUDDER_P7_ENDPOINTS="Qwen2.5-1.5B-Instruct|http://gpu-node:8000/v1|/path/to/Qwen2.5-1.5B-Instruct" \
        python -m rudder.bench --only p7

Each entry is ``label|URL|tokenizer folder`` (the folder of the same model, for its chat template: the agent renders
prompts and the endpoint echoes log-probabilities, :mod:`rudder.agents.llm.client`); entries are comma-separated.
Latency and memory are then the server's, not this machine's.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = sorted(glob.glob(os.path.join(ROOT, "traces", "heldout", "emu*")))
MODELS = (("SmolLM2-135M-Instruct", None),)  # loaded here; others through RUDDER_P7_ENDPOINTS (module docstring)


def endpoint_models() -> list[tuple[str, dict]]:
    """``RUDDER_P7_ENDPOINTS`` as (label, spec) pairs, spec = ``{"endpoint": URL, "model": tokenizer folder}``."""
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get("RUDDER_P7_ENDPOINTS", "").split(","))):
        parts = entry.split("|")
        if len(parts) != 3:
            raise ValueError(f"RUDDER_P7_ENDPOINTS entry {entry!r}: expected label|URL|tokenizer folder")
        out.append((parts[0], dict(endpoint=parts[1], model=parts[2])))
    return out


MIN_MARGIN = 0.005  # points where the options differ by less than this share of the time are left out


def points(quick: bool) -> list[dict]:
    from rudder.agents.llm.link import examples_from_trace

    out = []
    for trace in HELDOUT[:1] if quick else HELDOUT:
        for p in examples_from_trace(trace, rank=0, n=None):
            if p["margin"] >= MIN_MARGIN:
                out.append(dict(p, trace=os.path.basename(trace)))
    return out[:8] if quick else out


def _answer(spec: str | None, pts: list[dict]) -> dict:
    """In this process: load the model, answer every point; choices, latencies, load seconds, peak RSS."""
    import resource
    import time

    from rudder.agents.llm.link import LinkMetrics, LLMLinkAgent

    t0 = time.perf_counter()
    agent = LLMLinkAgent(**spec) if isinstance(spec, dict) else LLMLinkAgent(model=spec)
    load_s = time.perf_counter() - t0
    choices, latency = [], []
    for p in pts:
        m = LinkMetrics.from_dict(p["metrics"])
        agent._facts = {}
        t = time.perf_counter()
        choice, _ = agent._ask(m)
        latency.append(time.perf_counter() - t)
        choices.append(choice)
    return dict(
        choices=choices,
        latency=latency,
        load_s=load_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        parameters=agent.model_info.get("parameters"),
    )


def measure(quick: bool) -> pd.DataFrame:
    from rudder.agents.llm.link import LINK_OPTIONS

    pts = points(quick)
    names = list(LINK_OPTIONS)
    rows = []

    def score(label: str, choices: list[str], **extra):
        best = [min(p["seconds"]) for p in pts]
        got = [p["seconds"][names.index(c)] for p, c in zip(pts, choices)]
        agree = np.mean([c == p["decision"] for p, c in zip(pts, choices)]) if pts else float("nan")
        rows.append(
            dict(
                model=label,
                points=len(pts),
                agreement=float(agree),
                seconds_regret=float(sum(got) / max(sum(best), 1e-12) - 1),
                **extra,
            )
        )

    for name in names:
        score(f"always {name}", [name] * len(pts))
    only = os.environ.get("RUDDER_P7_MODELS")  # comma-separated labels: measure just those
    for label, spec in (MODELS[:1] if quick else MODELS) + tuple(endpoint_models()):
        if only and label not in only.split(","):
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "rudder.bench.llm_size", "answer", json.dumps(spec)],
            input=json.dumps(pts),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        if proc.returncode != 0:
            rows.append(dict(model=label, points=len(pts), error=proc.stderr.strip().splitlines()[-1][:200]))
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        score(
            label,
            res["choices"],
            latency_p50_s=float(np.median(res["latency"])),
            load_s=res["load_s"],
            peak_rss_mb=res["peak_rss_mb"],
            parameters=res["parameters"],
            chose=",".join(f"{n}:{res['choices'].count(n)}" for n in names if res["choices"].count(n)),
        )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    ref = df[df["model"].str.startswith("always")]
    best_fixed = ref.loc[ref["seconds_regret"].idxmin()]
    lines = [
        f"{int(df['points'].iloc[0])} labelled decision points of the held-out traces (options differing by "
        f">= {MIN_MARGIN:.1%} of the time); the best single option ({best_fixed['model']}) has "
        f"{best_fixed['seconds_regret']:+.2%} seconds regret."
    ]
    for _, r in df[~df["model"].str.startswith("always")].iterrows():
        if isinstance(r.get("error"), str):
            lines.append(f"- {r['model']}: not measured ({r['error']})")
            continue
        lines.append(
            f"- {r['model']}: agreement {r['agreement']:.0%}, seconds regret {r['seconds_regret']:+.2%}, "
            f"{r['latency_p50_s']:.2f} s per decision (median, prefix cached), loaded in {r['load_s']:.0f} s, "
            f"peak RSS {r['peak_rss_mb'] / 1024:.1f} GB; chose {r['chose']}."
        )
    lines.append(
        "Only the default model is loaded here (weights pinned by SHA-256); larger models are measured through an "
        "OpenAI-compatible endpoint serving the publisher's weights (vLLM, llama.cpp server) on a GPU node: "
        "RUDDER_P7_ENDPOINTS='label|URL|tokenizer folder' (bench/llm_size.py)."
    )
    return "\n".join(lines), df


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "answer":
    print(json.dumps(_answer(json.loads(sys.argv[2]), json.loads(sys.stdin.read()))))
