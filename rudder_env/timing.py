"""Time model for replay: feature-fetch seconds fitted to the rows a minibatch pulled, from a trace's measurements.

Live, each minibatch's fetch time was measured together with how many local rows and how many remote rows (misses
plus prefetched) it pulled. A policy replayed offline pulls a different number of remote rows, so its fetch time is
modelled as ``fetch_s = c0 + c_local * local_rows + c_remote * remote_rows`` (least squares, non-negative
coefficients: the link law, fitted here alone, :func:`nonnegative_lstsq` and :class:`LinkFit`), while sampling and
compute times are the recorded ones: they do not depend on the buffer.
The fit's quality is reported (R², per-minibatch mean absolute percentage error, error on the total) so nobody
trusts a bad model blindly. The trace's initial fill (remote rows only, timed) is one sample: it pins the
per-remote-row cost even when every minibatch pulls about as many rows as the next.

Those are in-sample figures. :func:`out_of_sample` checks the model where it is used: on another run of the same
configuration with another agent (a :class:`rudder.traces.timecheck.TimeCheck`), it predicts that run's fetch time from
its own row counts and compares with what was measured. A fit that cannot tell what a remote row costs
(``c_remote`` 0, or R² below :data:`MIN_R2`) makes modelled time ignore what an agent fetches;
:meth:`FetchTimeModel.separates_remote_rows` says so, and evaluation then prints no modelled time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_R2 = 0.3  # below this the fit explains too little of the fetch time to say what a remote row costs


@dataclass(frozen=True)
class FetchTimeModel:
    c0: float
    c_local: float
    c_remote: float
    r2: float
    mape: float  # mean |predicted - measured| / measured, per minibatch
    total_error: float  # (sum predicted - sum measured) / sum measured: the error on a run's fetch time
    samples: int
    remote_floor: float = 0.0  # the least seconds a remote row can cost (the link's payload rate), 0: not known
    floored: bool = False  # the fit gave a remote row less than that, so it was refitted with c_remote at the floor

    def predict(self, local_rows, remote_rows):
        return (
            self.c0
            + self.c_local * np.asarray(local_rows, dtype=np.float64)
            + self.c_remote * np.asarray(remote_rows, dtype=np.float64)
        )

    @classmethod
    def fit(cls, local_rows, remote_rows, fetch_s, remote_floor: float = 0.0) -> FetchTimeModel:
        """Fit to per-minibatch measurements (arrays of equal length).

        ``remote_floor``: seconds per remote row below which no fit is believed (a row's bytes over the link's
        rate, where the trace knows both). Where local and remote rows move together (a run without a buffer pulls
        every remote row, as many as the minibatch's size says) least squares cannot tell their costs apart and may
        give remote rows too little, down to nothing; such a fit is refitted with ``c_remote`` at the floor."""
        local_rows = np.asarray(local_rows, dtype=np.float64)
        remote_rows = np.asarray(remote_rows, dtype=np.float64)
        y = np.asarray(fetch_s, dtype=np.float64)
        if y.size == 0:
            return cls(0.0, 0.0, 0.0, float("nan"), float("nan"), float("nan"), 0, remote_floor)
        x = np.column_stack([np.ones_like(y), local_rows, remote_rows])
        coef = nonnegative_lstsq(x, y)
        floored = bool(coef[2] < remote_floor)
        if floored:  # the link carries no row faster than its rate: the rest of the time is per pull and local
            coef = np.append(nonnegative_lstsq(x[:, :2], y - remote_floor * remote_rows), remote_floor)
        pred = x @ coef
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
        mape = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
        total = float((pred.sum() - y.sum()) / max(y.sum(), 1e-12))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), r2, mape, total, int(y.size), remote_floor, floored)

    @property
    def separates_remote_rows(self) -> bool:
        """Whether the fit gives remote rows a cost (``c_remote > 0``) and explains enough of the measured time
        (R² >= :data:`MIN_R2`) for modelled time to depend on what an agent fetches."""
        return self.c_remote > 0 and np.isfinite(self.r2) and self.r2 >= MIN_R2

    def as_dict(self) -> dict:
        return dict(
            c0_s=self.c0,
            s_per_local_row=self.c_local,
            s_per_remote_row=self.c_remote,
            r2=self.r2,
            mape=self.mape,
            total_error=self.total_error,
            samples=self.samples,
            separates_remote_rows=self.separates_remote_rows,
            s_per_remote_row_floor=self.remote_floor,
            floored=self.floored,
        )


@dataclass(frozen=True)
class CopyTimeModel:
    """Host-to-device copy seconds of a minibatch recorded on a GPU, fitted to the rows it copied:
    ``h2d_s = c0 + c_row * rows`` (non-negative least squares). Replay adds it to the modelled fetch time (the copy is
    part of a minibatch's fetch, after the pull); a trace recorded on a CPU copies nothing and has no copy model, so
    its replay times are the same as without one."""

    c0: float
    c_row: float
    samples: int

    @classmethod
    def fit(cls, rows, h2d_s) -> CopyTimeModel:
        y = np.asarray(h2d_s, dtype=np.float64)
        x = np.column_stack([np.ones_like(y), np.asarray(rows, dtype=np.float64)])
        coef = nonnegative_lstsq(x, y) if y.size else np.zeros(2)
        return cls(float(coef[0]), float(coef[1]), int(y.size))

    def predict(self, rows):
        return self.c0 + self.c_row * np.asarray(rows, dtype=np.float64)


def out_of_sample(
    model: FetchTimeModel, local_rows, remote_rows, fetch_s, other_s=None, modelled_other_s: float | None = None
) -> dict:
    """How well ``model`` predicts a run it was not fitted to, from that run's per-minibatch measurements.

    Args:
        local_rows, remote_rows, fetch_s: the other run's per-minibatch rows pulled and measured fetch seconds.
        other_s: the other run's per-minibatch sampling + compute seconds (measured), with
        modelled_other_s: the sampling + compute seconds replay would use (the fitted trace's own recorded ones),
            to also give the error on run time as replay models it.

    Returns:
        ``fetch_error``: (predicted - measured) / measured total fetch seconds; ``fetch_mape``: per-minibatch mean
        absolute percentage error; ``time_error``: (modelled - measured) / measured run seconds (NaN without
        ``other_s``/``modelled_other_s``); ``minibatches``.
    """
    y = np.asarray(fetch_s, dtype=np.float64)
    if y.size == 0:
        return dict(fetch_error=float("nan"), fetch_mape=float("nan"), time_error=float("nan"), minibatches=0)
    pred = model.predict(local_rows, remote_rows)
    fetch_error = float((pred.sum() - y.sum()) / max(y.sum(), 1e-12))
    mape = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
    time_error = float("nan")
    if other_s is not None and modelled_other_s is not None:
        measured = float(np.sum(other_s) + y.sum())
        time_error = (modelled_other_s + float(pred.sum()) - measured) / max(measured, 1e-12)
    return dict(fetch_error=fetch_error, fetch_mape=mape, time_error=time_error, minibatches=int(y.size))


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray, normal: bool = False) -> np.ndarray:
    """Least squares with coefficients >= 0 by an active set over the few columns of the link law: solve, drop the
    most negative coefficient, refit, until none is negative.

    ``x``, ``y``: the design matrix (one row per pull) and the seconds; with ``normal=True`` instead the normal
    equations ``x = XᵀWX``, ``y = XᵀWy`` (what :class:`LinkFit` keeps), where dropping a coefficient drops its row
    as well as its column."""
    n = x.shape[1]
    active = np.ones(n, dtype=bool)
    coef = np.zeros(n)
    while active.any():
        a = np.flatnonzero(active)
        sub = x[np.ix_(a, a)] if normal else x[:, a]
        sol = np.linalg.lstsq(sub, y[a] if normal else y, rcond=None)[0]
        if (sol >= 0).all():
            coef[a] = sol
            return coef
        active[a[np.argmin(sol)]] = False
    return coef


class LinkFit:
    """The link law ``seconds = c0 + c_local * local_rows + c_remote * remote_rows`` fitted online, pull by pull,
    with coefficients >= 0 (:func:`nonnegative_lstsq` over running sums of the normal equations).

    The one fitter of the link law: :class:`FetchTimeModel` fits it to a whole recorded run at once (on the design
    matrix, :func:`nonnegative_lstsq`), and :class:`rudder.env.episode.LinkEstimate` through this class as an
    episode runs, live or in replay.

    Args:
        half_life: ``None`` (default): every pull weighs the same, the fit of the whole run so far. A number ``h``:
            exponential forgetting, a pull's weight halves with every ``h`` pulls added after it (weight
            ``0.5 ** (age / h)``), so the fit follows a link whose cost drifts. Per window of ``period``
            minibatches (one pull each), a half-life of ``w`` windows is ``half_life=w * period``.

    ``add(local_rows, remote_rows, seconds)`` adds a pull (negative seconds count as 0); :attr:`coefficients` gives
    ``(c0, c_local, c_remote)`` in seconds per pull and per row, zeros before two pulls were added.
    """

    def __init__(self, half_life: float | None = None):
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life must be > 0 pulls (or None: no forgetting), got {half_life!r}")
        self.half_life = half_life
        self._decay = None if half_life is None else 0.5 ** (1.0 / half_life)
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self.samples = 0  # pulls added
        self._coef: np.ndarray | None = None

    def add(self, local_rows: float, remote_rows: float, seconds: float) -> None:
        x = np.array([1.0, local_rows / 1e3, remote_rows / 1e3])  # rows in thousands keep the sums well scaled
        if self._decay is not None:
            self._xtx *= self._decay
            self._xty *= self._decay
        self._xtx += np.outer(x, x)
        self._xty += x * max(seconds, 0.0)
        self.samples += 1
        self._coef = None

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(c0, c_local, c_remote)``: seconds per pull, per local row, per remote row (zeros before two pulls)."""
        if self._coef is None:
            self._coef = nonnegative_lstsq(self._xtx, self._xty, normal=True) if self.samples >= 2 else np.zeros(3)
        c0, c_local, c_remote = self._coef
        return float(c0), float(c_local) / 1e3, float(c_remote) / 1e3


def prefetch_net_s(
    link_s: float, chunk_s: float, remote_s: float, need_gain: float, hide_s: float, minibatches: float, horizon: int
) -> float:
    """Predicted net seconds a background prefetch adds over the next ``horizon`` windows (spent less saved; negative:
    it saves time), the model :class:`rudder.baselines.mpc.MPC` decides by: a demand pull meets a chunk in progress
    (``chunk_s``) in the busy share ``min(1, link_s / hide_s)`` of the ``minibatches`` per window and waits half of
    it; the rows save ``remote_s * need_gain`` of demand pulls, shrunk by as much as the traffic (``link_s``)
    overruns the time it can hide in (``hide_s``, sampling and compute over the ``horizon`` windows)."""
    busy = link_s / hide_s
    stall = min(busy, 1.0) * minibatches * horizon * chunk_s / 2
    saved = remote_s * need_gain / max(busy, 1.0)
    return stall - saved


class BackgroundLink:
    """When background prefetch chunks arrive, modelled: one link shared by a minibatch's demand pull and the
    chunks, one transfer at a time, demand first but never pre-empting a chunk in progress.

    Per minibatch (times from its start): the demand pull starts at once, after the chunk in progress if any (that
    wait is the *stall*), and takes the demand's modelled seconds; compute and sampling follow, during which chunks
    run back to back. A chunk of ``n`` rows takes ``c0 + c_remote * n`` seconds (the fetch model's per-pull and
    per-remote-row costs). A chunk that ends before the next minibatch starts is delivered to it.
    """

    def __init__(self, model: FetchTimeModel, conditions=None):
        self.model = model
        # requested, not delivered, in order: [ids, seconds left, started]; under time-varying conditions
        # (:class:`~rudder.env.scenario.Conditions`) [ids, per-pull seconds left, link work left, started]
        self.conditions = conditions
        self.queue: list[list] = []

    def request(self, ids: np.ndarray) -> None:
        if self.conditions is not None:
            self.queue.append([ids, self.model.c0, self.model.c_remote * ids.size, False])
            return
        self.queue.append([ids, self.model.c0 + self.model.c_remote * ids.size, False])

    def cancel(self) -> list[np.ndarray]:
        """Drop the chunks requested but not started (the one in progress goes on); returns their ids."""
        keep = [c for c in self.queue if c[-1]]
        dropped = [c[0] for c in self.queue if not c[-1]]
        self.queue = keep
        return dropped

    def minibatch_at(self, start_s: float, demand_s, busy_s: float) -> tuple[float, float, list[np.ndarray]]:
        """:meth:`minibatch` on the replay clock, under the link's ``conditions``: the minibatch starts at
        ``start_s``; ``demand_s(t)`` is its demand pull's seconds when it starts at ``t``. Returns the stall, the
        demand pull's seconds and the chunks delivered before the next minibatch."""
        cond, done, t = self.conditions, [], start_s
        if self.queue and self.queue[0][3]:  # a chunk in progress: the demand pull waits for it
            t = cond.finish(t + self.queue[0][1], self.queue[0][2])
            done.append(self.queue.pop(0)[0])
        stall = t - start_s
        demand = demand_s(t)
        t += demand
        end = t + busy_s
        while self.queue:
            head = self.queue[0]
            head[3] = True
            fixed = min(head[1], end - t)
            head[1] -= fixed
            t += fixed
            if head[1] > 0:
                break
            finish = cond.finish(t, head[2])
            if finish <= end:
                t = finish
                done.append(self.queue.pop(0)[0])
            else:
                head[2] -= cond.work_by(end) - cond.work_by(t)
                break
        return stall, demand, done

    def minibatch(self, busy_s: float) -> tuple[float, list[np.ndarray]]:
        """Run one minibatch whose compute and sampling (after its demand pull) take ``busy_s``; returns the demand
        pull's stall and the chunks that end within the minibatch (delivered before the next)."""
        done, stall = [], 0.0
        if self.queue and self.queue[0][2]:  # a chunk in progress: the demand pull waits for it
            stall = self.queue[0][1]
            done.append(self.queue.pop(0)[0])
        free = busy_s
        while self.queue:
            head = self.queue[0]
            head[2] = True
            if head[1] <= free:
                free -= head[1]
                done.append(self.queue.pop(0)[0])
            else:
                head[1] -= free
                break
        return stall, done
