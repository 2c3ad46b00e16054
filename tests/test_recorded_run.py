"""The recorded run behind rudder/Replay-v0 (rudder.env.recorded_run) and the one table of run defaults
(rudder.env.defaults) every door reads."""

import dataclasses
import inspect
import json
import shutil

import numpy as np
import pytest
from rudder.env.contract import BufferSettings
from rudder.env.defaults import DEFAULTS, RECORDED_BEFORE_OPTION, RunDefaults
from rudder.env.live_env import LiveEnv
from rudder.env.recorded_run import RecordedRun
from rudder.env.replay_env import ReplayEnv
from rudder.env.settings import SettingError
from rudder.traces import TraceError

from rudder.runtime.config import TrainConfig

METIS2 = "traces/samples/small-metis2-f10x25"  # recorded before --prefetch and --sample-ahead existed


def test_a_recorded_option_wins_and_a_missing_one_is_what_such_a_run_had():
    run = RecordedRun(METIS2, rank=1)
    assert "prefetch" not in run.config and "sample_ahead" not in run.config
    assert run.option("period") == run.config["period"] == 4  # recorded: not the default 8
    assert run.option("prefetch") == "inline" != DEFAULTS.prefetch  # background prefetch came later
    assert run.option("sample_ahead") == DEFAULTS.sample_ahead
    env = ReplayEnv(run, rank=1)
    assert env.run is run and env.period == 4 and env.prefetch == "inline" and str(env.sample_ahead) == "4"
    assert env.k == run.config["candidates"] and env.capacity == run.recorded_capacity
    assert env.settings == run.settings() and run.settings().buffer_init == "recorded"
    other = run.settings(buffer_fraction=0.5, period=2)  # another size: filled as the recorded agent did
    assert other.buffer_init == run.played_buffer_init == "degree" and other.period == 2
    assert other.capacity == round(0.5 * run.halo_ids.size)
    with pytest.raises(SettingError, match=r"period \(--period\) must be an integer >= 1, got 0"):
        run.settings(period=0)


def test_the_recorded_run_derives_what_the_replay_steps_through():
    run = RecordedRun(METIS2, rank=0)
    n = run.num_minibatches
    assert n == len(run.remote_ids) == run.local_rows.size == run.sample_s.size == run.epoch_of.size
    sizes = run.local_rows + np.array([ids.size for ids in run.remote_ids])
    assert run.cum_bytes[0] == 0 and np.array_equal(np.diff(run.cum_bytes), 8 * sizes)  # 8 bytes an input row
    assert run.per_epoch == np.count_nonzero(run.epoch_of == run.epoch_of[0]) < n  # two epochs
    touched = run.touched_ids()
    assert np.all(np.diff(touched) > 0) and np.isin(np.concatenate(run.remote_ids), touched).all()
    assert np.isin(run.halo_ids, touched).all()
    assert run.time_model.samples == n + (run.initial_fill is not None)
    # an env on another rank of the same run reads that rank, not the one given
    assert ReplayEnv(run, rank=0).run is run and ReplayEnv(run, rank=1).run.rank == 1


def test_a_rank_without_minibatches_is_refused_in_one_line(tmp_path):
    broken = tmp_path / "t"
    shutil.copytree(METIS2, broken)
    rank_json = broken / "rank1" / "rank.json"
    meta = json.loads(rank_json.read_text())
    meta.update(minibatches=0, chunks=0, remote_ids=0, decisions=0, complete=False)
    rank_json.write_text(json.dumps(meta))
    (broken / "rank1" / "chunk-000000.npz").unlink()
    with pytest.warns(Warning, match="incomplete"), pytest.raises(TraceError, match="rank 1 of trace .* holds no"):
        RecordedRun(str(broken), rank=1)


def test_every_door_reads_the_one_table_of_defaults():
    config = TrainConfig()
    shared = [f.name for f in dataclasses.fields(RunDefaults) if hasattr(config, f.name)]
    # every run default is a train.py gnn option but the ranking, which an agent's BufferSettings chooses
    assert sorted({f.name for f in dataclasses.fields(RunDefaults)} - set(shared)) == ["ranking"]
    # but the sample-ahead, which is the agent's own unless given, else the table's
    assert all(getattr(config, name) == getattr(DEFAULTS, name) for name in shared if name != "sample_ahead")
    assert config.sample_ahead is None
    config.resolve_sample_ahead(BufferSettings())
    assert config.sample_ahead == DEFAULTS.sample_ahead
    live = inspect.signature(LiveEnv).parameters
    replay = inspect.signature(ReplayEnv).parameters
    assert live["candidates"].default == DEFAULTS.candidates
    assert live["reward"].default == replay["reward"].default == DEFAULTS.reward
    assert live["ranking"].default == replay["ranking"].default == DEFAULTS.ranking
    assert dict(RECORDED_BEFORE_OPTION, prefetch=DEFAULTS.prefetch) == dataclasses.asdict(DEFAULTS)
