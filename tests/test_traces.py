"""The trace format end to end: exact round trips, compactness, killed writers, and each reader check's message."""

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
from rudder.traces import SCHEMA, VERSION, RankTrace, Trace, TraceError, TraceIncompleteWarning, TraceWriter

COLUMNS = [
    "minibatch",
    "epoch",
    "local_rows",
    "remote_count",
    "sample_s",
    "fetch_s",
    "compute_s",
    "fetch_rows",
    "hits",
    "remote_fetched",
    "prefetched",
]
RUN_META = {"graph": "toy", "fanout": [10, 5], "batch_size": 4, "seed": np.int64(7)}


def _random_ids(rng, i):
    """Ids for minibatch i: chunk 0 small (uint16 deltas), chunk 1 up to 2**20, chunk 2 up to 2**40, then mixed."""
    high = [2**15, 2**20, 2**40, 2**40][min(i // 3, 3)]
    if i == 9:
        return np.zeros(0, dtype=np.int64)  # a minibatch without remote ids
    ids = rng.choice(high, size=int(rng.integers(1, 40)), replace=False)
    return rng.permutation(ids).astype([np.int64, np.int32, np.uint64][i % 3] if high < 2**31 else np.int64)


def _record(directory, rng, num_minibatches=11, chunk_minibatches=3, rank=0, num_ranks=1, close=True, decisions=()):
    """Write one rank with random rows; returns (rows, ids) as recorded (ids sorted, int64)."""
    writer = TraceWriter(
        directory,
        rank,
        num_ranks,
        RUN_META if rank == 0 else None,
        {"partition": rank},
        {"halo_ids": np.arange(5, dtype=np.int64) * 3, "halo_degree": np.ones(5, np.float32)},
        chunk_minibatches=chunk_minibatches,
    )
    rows, ids = [], []
    pending = sorted(decisions, key=lambda d: d[0])
    for i in range(num_minibatches):
        while pending and pending[0][0] <= i:
            k, d_ids, latency_s = pending.pop(0)
            writer.add_decision(minibatch=k, ids=d_ids, latency_s=latency_s)
        mb_ids = _random_ids(rng, i)
        row = {
            "minibatch": i,
            "epoch": i // 4,
            "local_rows": int(rng.integers(0, 100)),
            "sample_s": float(rng.random()),
            "fetch_s": float(rng.random()),
            "compute_s": float(rng.random()),
            "fetch_rows": int(rng.integers(0, 50)),
            "hits": int(rng.integers(0, 50)),
            "remote_fetched": int(rng.integers(0, 50)),
            "prefetched": int(rng.integers(0, 9)),
        }
        writer.add_minibatch(remote_ids=mb_ids, **row)
        rows.append({**row, "remote_count": mb_ids.size})
        ids.append(np.sort(mb_ids.astype(np.int64)))
    for k, d_ids, latency_s in pending:
        writer.add_decision(minibatch=k, ids=d_ids, latency_s=latency_s)
    if close:
        writer.close({"final_hits": 3})
    return rows, ids, writer


def _expected_table(rows):
    table = pd.DataFrame(rows)[COLUMNS]
    return table.astype(
        {
            "minibatch": np.int64,
            "epoch": np.int32,
            "local_rows": np.int32,
            "remote_count": np.int32,
            "sample_s": np.float32,
            "fetch_s": np.float32,
            "compute_s": np.float32,
            "fetch_rows": np.int32,
            "hits": np.int32,
            "remote_fetched": np.int32,
            "prefetched": np.int32,
        }
    )


def test_round_trip_is_exact_over_chunks_and_id_widths(tmp_path):
    rows, ids, _ = _record(tmp_path, np.random.default_rng(0))
    trace = Trace(tmp_path)
    assert trace.complete and trace.ranks == [0] and trace.num_ranks == 1
    assert trace.meta == {"graph": "toy", "fanout": [10, 5], "batch_size": 4, "seed": 7}
    rank = trace.rank(0)
    assert rank.complete and rank.num_minibatches == 11 and rank.num_chunks == 4
    assert rank.meta == {"partition": 0, "final_hits": 3}
    np.testing.assert_array_equal(rank.static["halo_ids"], np.arange(5) * 3)
    assert rank.static["halo_degree"].dtype == np.float32

    got = rank.minibatch_ids()
    assert len(got) == len(ids)
    for g, e in zip(got, ids):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, e)
    assert rank.minibatch_ids() is got  # cached
    pd.testing.assert_frame_equal(rank.table(), _expected_table(rows))

    streamed = list(rank.iter_minibatches())
    assert [row for row, _ in streamed] == rank.table().to_dict("records")
    for (_, g), e in zip(streamed, ids):
        np.testing.assert_array_equal(g, e)

    widths = [np.load(tmp_path / "rank0" / f"chunk-{c:06d}.npz")["remote_ids"].dtype for c in range(4)]
    assert widths == [np.uint16, np.uint32, np.uint64, np.uint64]
    header = json.loads((tmp_path / "rank0" / "rank.json").read_text())
    assert (header["schema"], header["version"], header["complete"]) == (SCHEMA, VERSION, True)
    assert header["remote_ids"] == sum(e.size for e in ids)
    assert header["bytes"] == sum(os.path.getsize(tmp_path / "rank0" / f"chunk-{c:06d}.npz") for c in range(4))
    assert not list(tmp_path.rglob("*.tmp"))


def test_decisions_round_trip_in_agent_order(tmp_path):
    decisions = [
        (0, np.array([9, 2, 5]), 0.5),
        (3, np.array([7, 1, 4]), 0.25),
        (3, np.array([], np.int64), 0.125),
        (7, np.array([2**40, 3]), 1.0),
        (11, np.array([6, 6, 0]), 2.0),
    ]  # 11: after the last minibatch
    _record(tmp_path, np.random.default_rng(1), decisions=decisions)
    table = Trace(tmp_path).rank(0).decisions()
    assert list(table.columns) == ["minibatch", "latency_s", "ids"]
    assert table["minibatch"].tolist() == [0, 3, 3, 7, 11]
    assert table["latency_s"].dtype == np.float32 and table["latency_s"].tolist() == [0.5, 0.25, 0.125, 1.0, 2.0]
    for got, (_, expected, _) in zip(table["ids"], decisions):
        assert got.dtype == np.int64
        assert got.tolist() == expected.tolist()  # not sorted


def test_halo_id_stream_takes_under_1_6_bytes_per_remote_id(tmp_path):
    rng = np.random.default_rng(2)
    writer = TraceWriter(tmp_path, 0, 1, {}, {}, {}, chunk_minibatches=16)
    for i in range(48):  # 2000 distinct ids per minibatch out of a 200k halo
        ids = rng.choice(200_000, size=2000, replace=False)
        writer.add_minibatch(
            minibatch=i,
            epoch=0,
            remote_ids=ids,
            local_rows=500,
            sample_s=0.01,
            fetch_s=0.02,
            compute_s=0.03,
            fetch_rows=2000,
            hits=0,
            remote_fetched=2000,
            prefetched=0,
        )
    writer.close()
    summary = Trace(tmp_path).summary().iloc[0]
    assert (summary["minibatches"], summary["remote_ids"], summary["complete"]) == (48, 96_000, True)
    # uint32 deltas of mean 100, deflated: well under 2 bytes per id
    assert summary["bytes_per_remote_id"] < 1.6


def _record_then_die(directory):
    rng = np.random.default_rng(3)
    _record(directory, rng, num_minibatches=8, chunk_minibatches=3, close=False)
    os._exit(1)  # killed: no close, no flush, no atexit


def test_killed_writer_leaves_a_readable_prefix_marked_incomplete(tmp_path):
    process = multiprocessing.get_context("fork").Process(target=_record_then_die, args=(tmp_path / "killed",))
    process.start()
    process.join(30)
    assert process.exitcode == 1
    _, ids, _ = _record(tmp_path / "reference", np.random.default_rng(3), num_minibatches=8)

    with pytest.warns(TraceIncompleteWarning, match="incomplete.*rank 0 never closed.*rank 0: 6"):
        trace = Trace(tmp_path / "killed")
    assert not trace.complete
    rank = trace.rank(0)
    assert not rank.complete and rank.num_minibatches == 6  # 2 full chunks; the 2 pending minibatches are lost
    for got, expected in zip(rank.minibatch_ids(), ids[:6], strict=True):
        np.testing.assert_array_equal(got, expected)
    assert trace.summary()["complete"].tolist() == [False]


def test_exception_in_with_block_flushes_but_leaves_incomplete(tmp_path):
    with pytest.raises(RuntimeError, match="trainer died"):
        with TraceWriter(tmp_path, 0, 1, {}, {}, {}, chunk_minibatches=4) as writer:
            writer.add_minibatch(
                minibatch=0,
                epoch=0,
                remote_ids=np.array([3, 1]),
                local_rows=1,
                sample_s=0.0,
                fetch_s=0.0,
                compute_s=0.0,
                fetch_rows=2,
                hits=0,
                remote_fetched=2,
                prefetched=0,
            )
            raise RuntimeError("trainer died")
    with pytest.warns(TraceIncompleteWarning):
        rank = Trace(tmp_path).rank(0)
    assert not rank.complete
    assert [i.tolist() for i in rank.minibatch_ids()] == [[1, 3]]


def _add(writer, i, ids=(1, 2), stamp=0.0):
    writer.add_minibatch(
        minibatch=i,
        epoch=0,
        remote_ids=np.asarray(ids),
        local_rows=1,
        sample_s=stamp,
        fetch_s=0.0,
        compute_s=0.0,
        fetch_rows=2,
        hits=0,
        remote_fetched=2,
        prefetched=0,
    )


def _record_by_time_then_get_killed(directory, stamps, added, flush_every_s):
    writer = TraceWriter(directory, 0, 1, {}, {}, {}, chunk_minibatches=10_000, flush_every_s=flush_every_s)
    for i in range(len(stamps)):
        stamps[i] = time.monotonic()
        _add(writer, i, stamp=stamps[i])
        added.value = i + 1
        time.sleep(0.01)
    time.sleep(60)  # killed here


def test_a_killed_writer_loses_at_most_flush_every_s_of_minibatches(tmp_path):
    """Chunks are written by time as well as by count: after SIGKILL the trace keeps every minibatch added more
    than ``flush_every_s`` before the last one, although far fewer than ``chunk_minibatches`` were pending."""
    ctx = multiprocessing.get_context("fork")
    stamps, added = ctx.Array("d", 60), ctx.Value("i", 0)
    process = ctx.Process(target=_record_by_time_then_get_killed, args=(tmp_path, stamps, added, 0.15))
    process.start()
    deadline = time.monotonic() + 30
    while added.value < 45 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    n = added.value
    assert n >= 45
    with pytest.warns(TraceIncompleteWarning, match="never closed"):
        rank = Trace(tmp_path).rank(0)
    assert rank.num_chunks >= 2
    must_keep = sum(1 for i in range(n) if stamps[i] <= stamps[n - 1] - 0.15)
    assert must_keep >= 1 and rank.num_minibatches >= must_keep
    kept = rank.table()
    assert kept["minibatch"].tolist() == list(range(rank.num_minibatches))
    np.testing.assert_allclose(kept["sample_s"], np.asarray(stamps[: rank.num_minibatches], dtype=np.float32))


def test_a_stopped_run_writes_everything_and_stays_incomplete_with_the_reason(tmp_path):
    writer = TraceWriter(tmp_path, 0, 1, {}, {"partition": 0}, {}, chunk_minibatches=4, flush_every_s=None)
    for i in range(6):
        if i == 3:
            writer.add_decision(minibatch=3, ids=np.array([9, 8]), latency_s=0.5)
        _add(writer, i, ids=(i, 100 + i))
    writer.add_decision(minibatch=6, ids=np.array([7]), latency_s=0.25)  # taken after the last minibatch
    stopped = {"signal": "SIGTERM", "after_minibatches": 6, "of_minibatches": 40}
    writer.close({"counters": {"hits": 1}}, stopped=stopped)
    writer.close()  # idempotent: stays as it is
    header = json.loads((tmp_path / "rank0" / "rank.json").read_text())
    assert header["complete"] is False and header["stopped"] == stopped and header["minibatches"] == 6
    with pytest.warns(TraceIncompleteWarning, match=r"rank 0 stopped early by SIGTERM \(minibatches kept: rank 0: 6\)"):
        trace = Trace(tmp_path)
    rank = trace.rank(0)
    assert not trace.complete and not rank.complete and rank.stopped == stopped
    assert [i.tolist() for i in rank.minibatch_ids()] == [[i, 100 + i] for i in range(6)]
    assert rank.decisions()["minibatch"].tolist() == [3, 6]
    assert rank.meta == {"partition": 0, "counters": {"hits": 1}}


@pytest.mark.parametrize("bad", [0, -1.0, "30", True])
def test_bad_flush_interval_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="flush_every_s must be a positive number of seconds or None"):
        TraceWriter(tmp_path, 0, 1, {}, {}, {}, flush_every_s=bad)


def test_truncated_chunk_names_the_chunk(tmp_path):
    _record(tmp_path, np.random.default_rng(4))
    chunk = tmp_path / "rank0" / "chunk-000001.npz"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    rank = Trace(tmp_path).rank(0)
    with pytest.raises(TraceError, match=r"chunk-000001\.npz is truncated or corrupt"):
        rank.minibatch_ids()
    with pytest.raises(TraceError, match=r"chunk-000001\.npz"):
        rank.table()


def _rewrite_chunk(path, change):
    arrays = dict(np.load(path))
    change(arrays)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("hits"), r"chunk-000001\.npz lacks required array 'hits'"),
        (
            lambda a: a.update(remote_ids=a["remote_ids"][:-1]),
            r"field 'remote_ids' in .*chunk-000001\.npz: expected \d+ "
            r"ids \(sum of remote_count\), got \d+",
        ),
        (
            lambda a: a.update(minibatch=a["minibatch"] + 1),
            r"field 'minibatch' in .*chunk-000001\.npz: expected the "
            r"chunk to start at 3 .* got 4",
        ),
        (lambda a: a.update(decision_offsets=np.array([0, 5])), r"field 'decision_offsets' in .*chunk-000001\.npz"),
        (
            lambda a: a.update(epoch=a["epoch"].astype(np.float64)),
            r"field 'epoch' .*expected 1-D int32, got 1-D float64",
        ),
    ],
)
def test_inconsistent_chunk_is_a_trace_error(tmp_path, change, message):
    _record(tmp_path, np.random.default_rng(5), decisions=[(3, np.array([1, 2]), 0.1)])
    _rewrite_chunk(tmp_path / "rank0" / "chunk-000001.npz", change)
    with pytest.raises(TraceError, match=message):
        Trace(tmp_path).rank(0).minibatch_ids()


@pytest.mark.parametrize(
    "file, field, value, message",
    [
        ("trace.json", "version", 7, r"unknown schema version 7 in .*trace\.json: this rudder reads version 1"),
        (
            "rank0/rank.json",
            "version",
            7,
            r"unknown schema version 7 in .*rank0/rank\.json: this rudder reads version 1",
        ),
        ("trace.json", "schema", "other", r"field 'schema' in .*trace\.json: expected 'rudder-trace', got 'other'"),
        ("rank0/rank.json", "minibatches", 12, r"field 'minibatches' in .*rank\.json: expected 11 .* got 12"),
    ],
)
def test_bad_header_is_a_trace_error(tmp_path, file, field, value, message):
    _record(tmp_path, np.random.default_rng(6))
    header = json.loads((tmp_path / file).read_text())
    (tmp_path / file).write_text(json.dumps({**header, field: value}))
    with pytest.raises(TraceError, match=message):
        Trace(tmp_path).rank(0).table()


def test_missing_trace_json_and_missing_rank(tmp_path):
    with pytest.raises(TraceError, match="is not a rudder trace: trace.json missing"):
        Trace(tmp_path)
    for rank in (0, 1):
        _record(tmp_path, np.random.default_rng(rank), num_minibatches=2, rank=rank, num_ranks=2)
    trace = Trace(tmp_path)
    assert trace.ranks == [0, 1] and trace.summary()["rank"].tolist() == [0, 1]
    assert isinstance(trace.rank(1), RankTrace)
    with pytest.raises(TraceError, match=f"rank 5 not in trace {tmp_path}: it has ranks 0, 1"):
        trace.rank(5)


def test_parquet_keeps_the_list_column(tmp_path):
    rows, ids, _ = _record(tmp_path / "trace", np.random.default_rng(7))
    rank = Trace(tmp_path / "trace").rank(0)
    rank.to_parquet(tmp_path / "rank0.parquet")
    table = pd.read_parquet(tmp_path / "rank0.parquet")
    assert list(table.columns) == [*COLUMNS, "remote_ids"]
    pd.testing.assert_frame_equal(table[COLUMNS], _expected_table(rows))
    assert [list(v) for v in table["remote_ids"]] == [e.tolist() for e in ids]


def test_writer_rejects_bad_calls(tmp_path):
    writer = TraceWriter(tmp_path, 0, 1, {}, {}, {}, chunk_minibatches=2)
    row = dict(
        epoch=0,
        local_rows=0,
        sample_s=0.0,
        fetch_s=0.0,
        compute_s=0.0,
        fetch_rows=0,
        hits=0,
        remote_fetched=0,
        prefetched=0,
    )
    writer.add_minibatch(minibatch=4, remote_ids=np.array([1]), **row)
    with pytest.raises(ValueError, match="consecutive: expected 5, got 6"):
        writer.add_minibatch(minibatch=6, remote_ids=np.array([1]), **row)
    with pytest.raises(ValueError, match="non-negative"):
        writer.add_minibatch(minibatch=5, remote_ids=np.array([-1]), **row)
    writer.add_minibatch(minibatch=5, remote_ids=np.array([1]), **row)  # flushes minibatches 4, 5
    with pytest.raises(ValueError, match="after its chunk was written"):
        writer.add_decision(minibatch=5, ids=np.array([1]), latency_s=0.0)
    with pytest.raises(ValueError, match="run_meta is written by rank 0 only"):
        TraceWriter(tmp_path, 1, 2, {"x": 1}, {}, {})
    with pytest.raises(TypeError, match="rank_meta: value .* is not JSON-serializable"):
        TraceWriter(tmp_path / "other", 0, 1, {}, {"f": object()}, {})
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.add_minibatch(minibatch=6, remote_ids=np.array([1]), **row)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TraceWriter(tmp_path, 0, 1, {}, {}, {})
    TraceWriter(tmp_path, 0, 1, {}, {}, {}, overwrite=True).close()
    assert Trace(tmp_path).rank(0).num_minibatches == 0
    assert not list((tmp_path / "rank0").glob("chunk-*"))
