"""The run summary of a distributed training job: a JSON document and the table printed at the end."""

from __future__ import annotations

import json
import os
import platform
import sys

from rudder.runtime.progress import combine

#: JSON facts of the emulated cluster a job runs on (set by the launcher for its ranks): summary and trace record them
CLUSTER_VAR = "RUDDER_EMULATED_CLUSTER"


def build_summary(cfg, job, results: list[dict], wall_s: float) -> dict:
    """Assemble the summary from every trainer's :meth:`~rudder.runtime.trainer.DistTrainer.result`."""
    results = sorted(results, key=lambda r: r["trainer_rank"])
    stopped = next((r["stopped"] for r in results if r.get("stopped")), None)
    total = {k: sum(r[k] for r in results) for k in ("remote_sampled", "hits", "remote_fetched", "prefetched")}
    return dict(
        config=cfg.as_dict(),
        graph=dict(
            name=job.meta["graph"],
            num_nodes=job.meta["num_nodes"],
            num_edges=job.meta["num_edges"],
            feat_dim=job.meta["feat_dim"],
            num_classes=job.meta["num_classes"],
            partitions=job.part_config,
        ),
        one_host=job.one_host,
        job=job.tag,  # the job's tag: the prefix of its shared-memory names on one host
        emulated_cluster=json.loads(os.environ[CLUSTER_VAR]) if CLUSTER_VAR in os.environ else None,
        val_acc=results[0]["val_acc"] if results else None,
        test_acc=results[0]["test_acc"] if results else None,
        wall_s=round(wall_s, 3),
        totals=dict(total, hit_rate=total["hits"] / total["remote_sampled"] if total["remote_sampled"] else 0.0),
        epochs=combine([r.get("epochs", []) for r in results]),  # per epoch, summed over trainers
        ranks=[{k: v for k, v in r.items() if k not in ("val_acc", "test_acc", "pid")} for r in results],
        host=platform.node(),
        python=sys.version.split()[0],
        # a run stopped by a signal (rudder.runtime.stop): what was done before it, no accuracies
        partial=stopped is not None,
        **({"stopped": stopped} if stopped is not None else {}),
    )


def write_summary(summary: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)


def format_table(summary: dict) -> str:
    cols = [
        ("rank", "trainer_rank", "{}"),
        ("part", "partition", "{}"),
        ("halo", "halo_nodes", "{}"),
        ("buffer", "buffer_capacity", "{}"),
        ("mb", "minibatches", "{}"),
        ("remote_sampled", "remote_sampled", "{}"),
        ("hits", "hits", "{}"),
        ("hit%", "hit_rate", "{:.1%}"),
        ("remote_fetched", "remote_fetched", "{}"),
        ("prefetched", "prefetched", "{}"),
        ("epoch_s", "epoch_time_s", None),
        ("sample_s", "sample_s", "{:.2f}"),
        ("fetch_s", "fetch_s", "{:.2f}"),
        ("compute_s", "compute_s", "{:.2f}"),
    ]
    rows = []
    for r in summary["ranks"]:
        row = []
        for _, key, fmt in cols:
            v = r[key]
            row.append("/".join(f"{t:.2f}" for t in v) if fmt is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    cfg, t = summary["config"], summary["totals"]
    head = (
        f"rudder: {cfg['graph']} on {cfg['parts']} partitions x {cfg['trainers_per_part']} trainers, "
        f"agent={cfg['agent']}, model={cfg['model']}, {cfg['epochs']} epoch(s), wall {summary['wall_s']:.1f} s"
    )
    cluster = summary.get("emulated_cluster")
    if cluster:
        head += f"\n  on {len(cluster['hosts'])} emulated hosts, links {cluster['link_rate'] or 'unshaped'}"
    elif not summary.get("one_host", True):
        head += "\n  on several hosts"
    acc = (
        "(stopped early: not evaluated)"
        if summary["val_acc"] is None
        else f"val_acc={summary['val_acc']:.4f}  test_acc={summary['test_acc']:.4f}"
    )
    foot = (
        f"{acc}  "
        f"hit rate {t['hit_rate']:.1%}, remote rows fetched {t['remote_fetched']} of {t['remote_sampled']} sampled"
        f" ({t['prefetched']} prefetched)"
    )
    return "\n".join([head, *lines, foot])
