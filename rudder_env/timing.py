"""Time model for replay: feature-fetch seconds fitted to the rows a minibatch pulled, from a trace's measurements.

Live, each minibatch's fetch time was measured together with how many local rows and how many remote rows (misses
plus prefetched) it pulled. A policy replayed offline pulls a different number of remote rows, so its fetch time is
modelled as ``fetch_s = c0 + c_local * local_rows + c_remote * remote_rows`` (least squares, non-negative
coefficients), while sampling and compute times are the recorded ones: they do not depend on the buffer.
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

    def predict(self, local_rows, remote_rows):
        return (
            self.c0
            + self.c_local * np.asarray(local_rows, dtype=np.float64)
            + self.c_remote * np.asarray(remote_rows, dtype=np.float64)
        )

    @classmethod
    def fit(cls, local_rows, remote_rows, fetch_s) -> FetchTimeModel:
        """Fit to per-minibatch measurements (arrays of equal length)."""
        local_rows = np.asarray(local_rows, dtype=np.float64)
        remote_rows = np.asarray(remote_rows, dtype=np.float64)
        y = np.asarray(fetch_s, dtype=np.float64)
        if y.size == 0:
            return cls(0.0, 0.0, 0.0, float("nan"), float("nan"), float("nan"), 0)
        x = np.column_stack([np.ones_like(y), local_rows, remote_rows])
        coef = _nonnegative_lstsq(x, y)
        pred = x @ coef
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
        mape = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
        total = float((pred.sum() - y.sum()) / max(y.sum(), 1e-12))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), r2, mape, total, int(y.size))

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
        coef = _nonnegative_lstsq(x, y) if y.size else np.zeros(2)
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


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (active set over 3 columns: drop negatives and refit)."""
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    while active.any():
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        idx = np.flatnonzero(active)
        active[idx[np.argmin(sol)]] = False
    return coef


class BackgroundLink:
    """When background prefetch chunks arrive, modelled: one link shared by a minibatch's demand pull and the
    chunks, one transfer at a time, demand first but never pre-empting a chunk in progress.

    Per minibatch (times from its start): the demand pull starts at once, after the chunk in progress if any (that
    wait is the *stall*), and takes the demand's modelled seconds; compute and sampling follow, during which chunks
    run back to back. A chunk of ``n`` rows takes ``c0 + c_remote * n`` seconds (the fetch model's per-pull and
    per-remote-row costs). A chunk that ends before the next minibatch starts is delivered to it.
    """

    def __init__(self, model: FetchTimeModel):
        self.model = model
        self.queue: list[list] = []  # requested, not delivered, in order: [ids, seconds left, started]

    def request(self, ids: np.ndarray) -> None:
        self.queue.append([ids, self.model.c0 + self.model.c_remote * ids.size, False])

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
