"""Synthetic traces shaped like a large job (ogbn-papers100M on Perlmutter), scaled from a small real run.

A papers100M trainer (111M nodes, fanout 15,10,5, batch 1024) sees ~10^5 remote ids per minibatch and ~10^8 per
run: far more than this machine can record live, but what replay, the agents and the oracles must handle
(BENCHMARKS.md, P9). :func:`generate` writes such a trace, streamed chunk by chunk through the ordinary
:class:`traces.TraceWriter` (a valid trace, read by :class:`traces.Trace`), without holding the stream in memory.

How it is shaped. From one rank of a small real trace it takes, for every remote id, the fraction of minibatches
that needed it (its reuse), and the mean remote ids per minibatch ``m``. To reach ``ids_per_minibatch`` it keeps
that reuse distribution and scales the number of distinct ids by ``ids_per_minibatch / m``: each synthetic id draws
its per-minibatch probability from the real ones (resampled), so the expected ids per minibatch is
``ids_per_minibatch`` and how often an id recurs is distributed as in the real run. Each minibatch then includes
each id independently with its probability (shuffled seeds make the real draws close to independent within an
epoch). The ids are spread at random over ``num_nodes`` (111,059,956 for papers100M). Local rows and the
sampling, compute and fetch seconds scale from the real run the same way (fetch seconds from the real run's fitted
fetch model). The trace records no seeds and no partition structure: the lookahead ranking replays it from the
sampled-ahead minibatches alone (``ReplayEnv(..., sampled_only=True)``).

    python -m rudder.traces.synthetic OUT [--minibatches 1000] [--ids-per-minibatch 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from rudder.traces import Trace, TraceWriter

PAPERS100M_NODES = 111_059_956
DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "small-metis2-f10x25")


def generate(
    out: str,
    source: str = DEFAULT_SOURCE,
    source_rank: int = 0,
    num_nodes: int = PAPERS100M_NODES,
    ids_per_minibatch: int = 100_000,
    minibatches: int = 1000,
    minibatches_per_epoch: int = 50,
    fanout: str = "5,10,15",
    batch_size: int = 1024,
    seed: int = 0,
    chunk_minibatches: int = 16,
    progress=None,
) -> dict:
    """Write a one-rank synthetic trace to ``out`` (replaced if there); returns its facts (ids, sizes, seconds).

    ``progress(n)`` is called with the minibatches written since the last call."""
    import shutil

    t0 = time.perf_counter()
    rank = Trace(source).rank(source_rank)
    real = rank.minibatch_ids()
    table = rank.table()
    uniq, counts = np.unique(np.concatenate(real), return_counts=True)
    reuse = counts / len(real)  # per-minibatch probability of each real id
    m_real = float(np.mean([x.size for x in real]))
    scale = ids_per_minibatch / m_real
    rng = np.random.default_rng(seed)
    n_ids = int(round(uniq.size * scale))
    if n_ids > num_nodes:
        raise ValueError(f"{n_ids} distinct ids do not fit an id space of {num_nodes}")
    p = rng.choice(reuse, size=n_ids).astype(np.float32)
    p *= np.float32(ids_per_minibatch / float(p.sum(dtype=np.float64)))  # expected ids per minibatch, exactly
    np.minimum(p, 1.0, out=p)
    ids = np.unique(rng.integers(0, num_nodes, size=int(n_ids * 1.05) + 16, dtype=np.int64))
    ids = rng.permutation(ids)[:n_ids]  # random, distinct, in random order (popularity not tied to id)
    while ids.size < n_ids:  # (practically never) too many collisions
        more = np.setdiff1d(rng.integers(0, num_nodes, size=n_ids, dtype=np.int64), ids)
        ids = np.concatenate([ids, more[: n_ids - ids.size]])
    local_rows = table["local_rows"].to_numpy(np.float64)
    # fetch seconds per row pulled, of the source minibatch each synthetic one copies (the trace layer keeps no
    # time model: rudder.env.timing fits one to the trace when it is replayed)
    rows = local_rows + table["remote_fetched"].to_numpy(np.float64)
    per_row_s = table["fetch_s"].to_numpy(np.float64) / np.maximum(rows, 1.0)
    sample_s, compute_s = table["sample_s"].to_numpy(), table["compute_s"].to_numpy()
    degree = (rng.poisson(p * 50.0) + 1).astype(np.int32)  # a degree loosely tied to popularity (degree fill)
    run_meta = dict(
        config=dict(
            graph="papers100M-shaped (synthetic)",
            parts=64,
            trainers_per_part=1,
            partition="synthetic",
            model="sage",
            fanout=fanout,
            batch_size=batch_size,
            epochs=-(-minibatches // minibatches_per_epoch),
            seed=seed,
            agent="none",
            buffer_fraction=0.0,
            buffer_init="degree",
            alpha=0.05,
            period=8,
            admit_on_miss=False,
            candidates=256,
            reward="traffic",
            sample_ahead=4,
            prefetch="inline",
        ),
        graph=dict(graph="papers100M-shaped", num_nodes=num_nodes),
        synthetic=dict(
            source=os.path.abspath(source),
            source_rank=source_rank,
            ids_per_minibatch=ids_per_minibatch,
            distinct_ids=n_ids,
            scale=scale,
            seed=seed,
        ),
    )
    rank_meta = dict(
        trainer_rank=0,
        partition=0,
        num_nodes=num_nodes,
        halo_nodes=n_ids,
        capacity=0,
        total_minibatches=minibatches,
        minibatches_per_epoch=minibatches_per_epoch,
    )
    order = np.argsort(ids)
    static = dict(halo_ids=ids[order], halo_degree=degree[order], initial_ids=np.zeros(0, dtype=np.int64))
    if os.path.exists(out):
        shutil.rmtree(out)
    total = 0
    with TraceWriter(
        out, 0, 1, run_meta, rank_meta, static, chunk_minibatches=chunk_minibatches, flush_every_s=None
    ) as writer:
        for i in range(minibatches):
            j = i % len(real)
            chosen = ids[rng.random(n_ids, dtype=np.float32) < p]
            local = int(local_rows[j] * scale)
            writer.add_minibatch(
                minibatch=i,
                epoch=i // minibatches_per_epoch,
                remote_ids=chosen,
                local_rows=local,
                sample_s=float(sample_s[j] * scale),
                fetch_s=float(per_row_s[j] * (local + chosen.size)),
                compute_s=float(compute_s[j] * scale),
                fetch_rows=local + chosen.size,
                hits=0,
                remote_fetched=int(chosen.size),
                prefetched=0,
            )
            total += chosen.size
            if progress:
                progress(1)
    return dict(
        trace=out,
        minibatches=minibatches,
        remote_ids=int(total),
        distinct_ids=n_ids,
        num_nodes=num_nodes,
        ids_per_minibatch=round(total / max(minibatches, 1)),
        seconds=round(time.perf_counter() - t0, 1),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="trace folder to write (replaced if there)")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="small real trace whose reuse is scaled")
    parser.add_argument("--minibatches", type=int, default=1000)
    parser.add_argument("--ids-per-minibatch", type=int, default=100_000)
    parser.add_argument("--num-nodes", type=int, default=PAPERS100M_NODES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    with tqdm(total=args.minibatches, desc="synthetic trace", unit="mb", file=sys.stderr) as bar:
        facts = generate(
            args.out,
            args.source,
            num_nodes=args.num_nodes,
            ids_per_minibatch=args.ids_per_minibatch,
            minibatches=args.minibatches,
            seed=args.seed,
            progress=bar.update,
        )
    print(facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
