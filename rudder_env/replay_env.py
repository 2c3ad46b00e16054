"""``rudder/Replay-v0``: the prefetch decision game replayed offline from a recorded trace, exactly."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from rudder_env.buffer import PrefetchBuffer, initial_ids
from rudder_env.episode import PrefetchEpisode, require_running
from rudder_env.spaces import action_space, observation_space
from rudder_env.timing import FetchTimeModel

DEFAULT_CANDIDATES = 256


class ReplayEnv(gym.Env):
    """Prefetching for one trainer rank of a recorded run, driven by the trace instead of DistDGL.

    The trace holds every remote node id each minibatch of that rank needed; the env pushes them through the same
    :class:`~rudder_env.buffer.PrefetchBuffer` the live trainer uses, so with the same buffer settings and the same
    decisions it sees the same hits, misses and remote rows fetched as the live run, hundreds of times faster.

    ## Action Space
    ``MultiBinary(K)``: bit ``i`` admits the ``i``-th ranked candidate (``info["candidate_ids"][i]``, the
    non-resident remote nodes missed most often, decayed). The set is fetched with the next minibatch's misses and
    replaces the lowest-score slots. Bits past ``info["n_candidates"]`` are ignored.

    ## Observation Space
    A ``Dict`` of float32 boxes in [0, 1]: buffer state, slot-score histogram, sampler and traffic statistics of
    the last window, the top-K candidate scores, the K lowest resident scores, progress
    (see :mod:`rudder_env.spaces`). Wrap with ``gymnasium.wrappers.FlattenObservation`` for a ``Box``.

    ## Rewards
    ``reward="traffic"``: minus remote rows fetched (on demand + prefetched) over remote rows sampled in the window.
    ``reward="time"``: minus the window's modelled seconds: recorded sampling and compute time plus fetch time from
    a model fitted to the trace's own measurements (``info["time_model"]`` reports its fit).

    ## Starting State
    The buffer filled as in the recorded run (its recorded initial ids) unless ``buffer_fraction``/``buffer_init``
    ask otherwise; ``reset`` runs no minibatch, so the first observation is deterministic.

    ## Episode End
    Terminates when the trace's minibatches are exhausted. Never truncates.

    ## Arguments
    ``trace`` (folder or :class:`traces.Trace`), ``rank`` (trainer rank in the trace), ``candidates`` (K),
    ``reward``, and buffer overrides ``buffer_fraction``, ``buffer_init`` (``recorded``, ``degree``, ``random``,
    ``empty``), ``alpha``, ``period``, ``admit_on_miss`` (default: the recorded run's); ``ranking``
    (``"misses"``, or ``"lookahead"`` when the trace recorded seeds and partition structure: see
    :class:`~rudder_env.episode.PrefetchEpisode`) with ``lookahead_horizon`` and ``lookahead_discount``.
    """

    metadata = {"render_modes": []}

    def __init__(self, trace, rank: int = 0, candidates: int | None = None, reward: str = "traffic",
                 buffer_fraction: float | None = None, buffer_init: str = "recorded", alpha: float | None = None,
                 period: int | None = None, admit_on_miss: bool | None = None, ranking: str = "misses",
                 lookahead_horizon: int | None = None,
                 lookahead_discount: float | None = None):
        from traces import Trace

        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        self.rank_trace = self.trace.rank(rank)
        self.rank = rank
        run = self.trace.meta.get("config", {})
        rmeta = self.rank_trace.meta
        self.k = int(candidates or run.get("candidates", DEFAULT_CANDIDATES))
        self.reward = reward
        self.alpha = float(alpha if alpha is not None else run.get("alpha", 0.05))
        self.period = int(period if period is not None else run.get("period", 8))
        self.admit_on_miss = bool(admit_on_miss if admit_on_miss is not None else run.get("admit_on_miss", False))
        recorded_fraction = run.get("buffer_fraction")
        self.buffer_fraction = float(buffer_fraction if buffer_fraction is not None else recorded_fraction)
        self.halo_ids = np.asarray(self.rank_trace.static["halo_ids"], dtype=np.int64)
        self.halo_degree = np.asarray(self.rank_trace.static["halo_degree"])
        self.capacity = int(round(self.buffer_fraction * self.halo_ids.size))
        if buffer_init == "recorded":
            same_size = self.capacity == int(rmeta.get("capacity", -1))
            buffer_init = "recorded" if same_size else run.get("buffer_init", "degree")
        if buffer_init not in ("recorded", "degree", "random", "empty"):
            raise ValueError(f"unknown buffer_init {buffer_init!r}: expected recorded, degree, random or empty")
        self.buffer_init = buffer_init
        self.num_nodes = int(rmeta["num_nodes"])
        self.fanouts = [int(x) for x in str(run.get("fanout", "10,25")).split(",")]
        self.batch_size = int(run.get("batch_size", 1000))
        self._ids = self.rank_trace.minibatch_ids()
        table = self.rank_trace.table()
        self._local_rows = table["local_rows"].to_numpy()
        self._sample_s = table["sample_s"].to_numpy(dtype=np.float64)
        self._compute_s = table["compute_s"].to_numpy(dtype=np.float64)
        self._fetch_s = table["fetch_s"].to_numpy(dtype=np.float64)
        local, remote, secs = self._local_rows, table["remote_fetched"].to_numpy(), table["fetch_s"].to_numpy()
        if rmeta.get("initial_fill_rows"):  # the initial fill: a pull of remote rows only, which pins their cost
            local, remote = np.append(local, 0), np.append(remote, rmeta["initial_fill_rows"])
            secs = np.append(secs, rmeta["initial_fill_s"])
        self.time_model = FetchTimeModel.fit(local, remote, secs)
        self.ranking = ranking
        self.lookahead_horizon, self.lookahead_discount = lookahead_horizon, lookahead_discount
        # what the recording trainer had sampled ahead; sampling ahead does not change the batches, so a trace
        # recorded before the option existed is replayed as today's trainer would run it
        from rudder_env.config import TrainConfig

        self.sample_ahead = int(run.get("sample_ahead", TrainConfig.sample_ahead))
        self._lookahead = None
        if ranking == "lookahead":
            from rudder_env.lookahead import SamplerLookahead

            self._lookahead = SamplerLookahead.from_static(self.rank_trace.static, self.num_nodes)
            self._seeds = self.rank_trace.minibatch_seeds()
            if self._lookahead is None or self._seeds is None:
                raise ValueError(f"ranking='lookahead' needs a trace recorded with seeds and partition structure; "
                                 f"{self.trace.directory} has none (re-record it with this rudder)")
            self._epochs = table["epoch"].to_numpy()
        self.observation_space = observation_space(self.k)
        self.action_space = action_space(self.k)
        self.episode: PrefetchEpisode | None = None

    def _new_buffer(self) -> PrefetchBuffer:
        buf = PrefetchBuffer(self.capacity, self.num_nodes, alpha=self.alpha, period=self.period,
                             admit_on_miss=self.admit_on_miss)
        if self.buffer_init == "recorded":
            ids = self.rank_trace.static["initial_ids"]
        else:
            seed = int(self.np_random.integers(2**31))
            ids = initial_ids(self.buffer_init, self.halo_ids, self.halo_degree, self.capacity, seed)
        buf.fill(ids)
        return buf

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        run = self.trace.meta.get("config", {})
        facts = dict(graph=run.get("graph"), parts=run.get("parts"), partitioning=run.get("partition"),
                     rank=self.rank, num_nodes=self.num_nodes, source=f"trace {self.trace.directory}")
        self.episode = PrefetchEpisode(self._new_buffer(), self.k, len(self._ids), self.halo_ids.size,
                                       self.fanouts, self.batch_size, reward=self.reward, facts=facts,
                                       ranking=self.ranking, lookahead=self._lookahead, upcoming=self._upcoming,
                                       horizon=self.lookahead_horizon, discount=self.lookahead_discount,
                                       sampled_ahead=self._sampled_ahead)
        obs, info = self.episode.observe()
        info["time_model"] = self.time_model.as_dict()
        return obs, info

    def step(self, action):
        require_running(self.episode)
        applied = self.episode.decide(action)
        result = self.run_window()
        result[4]["applied_ids"] = applied
        return result

    def run_window(self, poll=None):
        """Run the next ``period`` minibatches with no new decision, except what ``poll(minibatch)`` returns.

        ``poll`` is called before each minibatch with the number of minibatches run so far; a non-None return
        ``(ids, latency_s)`` is a prefetch set applied there (how late decisions land: :mod:`agents.runner`).
        Returns ``step``'s tuple.
        """
        ep = require_running(self.episode)
        late = []
        for _ in range(self.period):
            if ep.done:
                break
            i = ep.minibatches
            if poll is not None:
                got = poll(i)
                if got is not None:
                    late.append(ep.apply(got[0]))
            ids = self._ids[i]
            ep.before_minibatch()
            _, step = ep.buffer.lookup(ids)
            fetch_s = float(self.time_model.predict(self._local_rows[i], step.remote_fetched))
            ep.record(ids, int(self._local_rows[i]), step, float(self._sample_s[i]), fetch_s,
                      float(self._compute_s[i]))
        reward, _ = ep.end_window()
        obs, info = ep.observe()
        info["applied_ids"] = np.concatenate(late) if late else np.zeros(0, dtype=np.int64)
        return obs, reward, ep.done, False, info

    def _known(self, done: int, first: int, last: int, values: list) -> list:
        """``values[first:last]`` as far as the epochs whose seeds the live trainer had shuffled after ``done``
        minibatches: at the start only the first epoch; then every epoch up to the one of the last minibatch
        sampled (``done + sample_ahead``: the trainer samples ahead across epoch boundaries)."""
        n = len(values)
        known_epoch = self._epochs[0] if done < 1 else self._epochs[min(done + self.sample_ahead, n - 1)]
        out = []
        for j in range(first, min(last, n)):
            if self._epochs[j] > known_epoch:
                break
            out.append(values[j])
        return out

    def _upcoming(self, done: int, horizon: int) -> list[np.ndarray]:
        """Seeds of the next ``horizon`` minibatches that the live trainer knew after ``done`` minibatches (DGL
        shuffles an epoch's seeds when its first minibatch is sampled)."""
        if self._seeds is None:
            return []
        return self._known(done, done, done + horizon, self._seeds)

    def _sampled_ahead(self, done: int) -> list[np.ndarray]:
        """Remote ids of the minibatches the live trainer had sampled beyond the next one after ``done``
        minibatches: ``sample_ahead`` of them (none before the first)."""
        if done < 1 or self.sample_ahead < 1:
            return []
        return self._known(done, done + 1, done + self.sample_ahead + 1, self._ids)

    @property
    def live_seconds_per_minibatch(self) -> float:
        """Mean measured seconds per minibatch of the recorded run (to turn decision latency into minibatches)."""
        n = max(len(self._ids), 1)
        return float((self._sample_s.sum() + self._compute_s.sum() + self._fetch_s.sum()) / n)
