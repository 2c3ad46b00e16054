"""Score a kept fidelity study again with today's replay: every kept trace replayed with every agent, against the
live means the study measured (``bench/results/p2r_replay_fidelity.csv``), without and with the link floor.

``RUDDER_BENCH_KEEP_TRACES=DIR python -m rudder.bench --only p2r`` keeps the study's traces (folders named
``HOSTS-RATE-AGENT-ROUND``); ``python -m rudder.bench.fidelity_replay DIR`` then writes
``bench/results/p2r_replay_floor.csv``. Traces recorded before ``meta.network`` existed get it from the folder's
name and the graph's feature width (float32 rows), in a copy; the live runs are the study's, unchanged. The lookahead
is replayed as the study ran it live (the trainer's sample-ahead and fill, not its own defaults)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd

from rudder.testbed.cluster import parse_rate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _with_network(src: str, dst: str, hosts: int, rate: str) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "trace.json")
    with open(path) as f:
        doc = json.load(f)
    feat_dim = int(doc["meta"]["graph"]["feat_dim"])
    doc["meta"]["network"] = dict(hosts=hosts, link_rate=rate, link_bits_per_s=parse_rate(rate), row_bytes=4 * feat_dim)
    with open(path, "w") as f:
        json.dump(doc, f)
    return dst


def replay_kept(folder: str, study_csv: str) -> pd.DataFrame:
    from rudder.bench.cluster import replay_slowest
    from rudder.traces import Trace

    study = pd.read_csv(study_csv)
    live = study.groupby(["hosts", "link_rate", "replayed_agent"])["live_mean_s"].first()
    agents = sorted(study["replayed_agent"].unique())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(glob.glob(os.path.join(folder, "*-*-*-*"))):
            hosts, rate, source, rnd = os.path.basename(src).split("-")
            if (int(hosts), rate, source) not in live.index:
                continue
            net = Trace(src).meta.get("network")
            floored = src if net else _with_network(src, os.path.join(tmp, os.path.basename(src)), int(hosts), rate)
            for version, path in (("no floor", None), ("floor", floored)):
                t = Trace(path) if path else Trace(src)
                if path is None and net:  # recorded with the floor's facts: "no floor" drops them
                    t.meta = {k: v for k, v in t.meta.items() if k != "network"}
                for name in agents:
                    kwargs = dict(sample_ahead=None, buffer_init=None) if name == "lookahead" else {}
                    slowest = replay_slowest(t, name, **kwargs)["time_s"]
                    mean = float(live[(int(hosts), rate, name)])
                    rows.append(
                        dict(
                            hosts=int(hosts),
                            link_rate=rate,
                            trace_of=source,
                            trace_round=int(rnd),
                            replayed_agent=name,
                            version=version,
                            in_sample=name == source,
                            replay_s=slowest,
                            live_mean_s=mean,
                            time_error=slowest / mean - 1,
                        )
                    )
            print(f"  {os.path.basename(src)}", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m rudder.bench.fidelity_replay KEPT_TRACES_DIR", file=sys.stderr)
        return 2
    df = replay_kept(argv[0], os.path.join(RESULTS, "p2r_replay_fidelity.csv"))
    df.to_csv(os.path.join(RESULTS, "p2r_replay_floor.csv"), index=False)
    oos = df[~df["in_sample"]]
    print(
        oos.groupby(["hosts", "link_rate", "version"], sort=False)["time_error"]
        .agg(median_abs=lambda e: float(np.median(np.abs(e))), worst_abs=lambda e: float(np.abs(e).max()))
        .to_string()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
