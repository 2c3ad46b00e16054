"""The link law's one fitter (rudder.env.timing): whole-run fits agree however the pulls come, forgetting follows a
link whose cost changes."""

import numpy as np
import pytest
from rudder.env.timing import FetchTimeModel, LinkFit, nonnegative_lstsq


def _pulls(n, c0, c_local, c_remote, seed=0):
    rng = np.random.default_rng(seed)
    local = rng.integers(100, 5000, n).astype(float)
    remote = rng.integers(0, 20_000, n).astype(float)
    return local, remote, c0 + c_local * local + c_remote * remote


def test_online_and_whole_run_fits_of_the_same_pulls_agree():
    local, remote, secs = _pulls(50, 0.004, 1e-7, 3e-6)
    fit = LinkFit()
    for row in zip(local, remote, secs):
        fit.add(*row)
    model = FetchTimeModel.fit(local, remote, secs)
    assert fit.coefficients == pytest.approx((model.c0, model.c_local, model.c_remote), rel=1e-6)
    assert model.c_remote == pytest.approx(3e-6, rel=1e-9) and model.r2 == pytest.approx(1.0)


def test_a_negative_coefficient_is_dropped_and_the_rest_refitted():
    # seconds fall with local rows: unconstrained least squares would give c_local < 0
    local, remote, secs = _pulls(40, 0.01, -1e-6, 2e-6)
    coef = nonnegative_lstsq(np.column_stack([np.ones_like(local), local, remote]), secs)
    assert coef[1] == 0.0 and (coef >= 0).all()
    fit = LinkFit()
    for row in zip(local, remote, secs):
        fit.add(*row)
    assert fit.coefficients[1] == 0.0 and min(fit.coefficients) >= 0.0


def test_forgetting_follows_a_link_that_slows_down_and_the_whole_run_fit_averages():
    old = _pulls(200, 0.002, 0.0, 1e-6, seed=1)
    new = _pulls(40, 0.002, 0.0, 4e-6, seed=2)  # the link got four times slower per remote row
    whole, recent = LinkFit(), LinkFit(half_life=8)
    for part in (old, new):
        for row in zip(*part):
            whole.add(*row)
            recent.add(*row)
    assert recent.coefficients[2] == pytest.approx(4e-6, rel=0.05)  # old pulls weigh 2**-5 after 40 new ones
    assert 1e-6 < whole.coefficients[2] < 2e-6  # most of the whole run's pulls saw the old link
    assert whole.samples == recent.samples == 240


def test_no_fit_before_two_pulls_and_a_bad_half_life_is_refused():
    fit = LinkFit()
    fit.add(10, 100, 0.01)
    assert fit.coefficients == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="half_life must be > 0"):
        LinkFit(half_life=0)


def test_a_fit_that_gives_remote_rows_less_than_the_link_allows_is_refitted_at_the_floor():
    """A run without a buffer pulls every remote row, about as many as the minibatch's local rows say: least squares
    can then put the time on local rows and leave remote rows free, and replay of an agent that fetches fewer rows
    would save nothing. With the link's floor (a row's bytes over the rate) the remote cost is held at it."""
    rng = np.random.default_rng(0)
    local = rng.integers(20_000, 30_000, 60).astype(float)
    remote = 0.4 * local + rng.normal(0, 5, 60)  # moves with local rows
    secs = 2e-3 + 1e-5 * remote + rng.normal(0, 2e-3, 60)  # truly 10 us a remote row, nothing a local one
    free = FetchTimeModel.fit(local, remote, secs)
    assert free.c_remote < 8e-6 and not free.floored  # the split is lost in the noise
    floored = FetchTimeModel.fit(local, remote, secs, remote_floor=8e-6)
    assert floored.floored and floored.c_remote == 8e-6 and floored.remote_floor == 8e-6
    # the same total on the recorded run, but an agent that fetches half the remote rows now saves their link time
    assert abs(floored.predict(local, remote).sum() - secs.sum()) < 0.02 * secs.sum()
    saved = floored.predict(local, remote).sum() - floored.predict(local, remote / 2).sum()
    assert saved >= 8e-6 * remote.sum() / 2 - 1e-9
    # where the rows do not move together the fit finds the cost itself, above the floor, and is left alone
    remote = rng.integers(5_000, 15_000, 60).astype(float)
    secs = 2e-3 + 1e-5 * remote + rng.normal(0, 2e-4, 60)
    above = FetchTimeModel.fit(local, remote, secs, remote_floor=8e-6)
    assert not above.floored and above.c_remote == FetchTimeModel.fit(local, remote, secs).c_remote
    assert above.c_remote == pytest.approx(1e-5, rel=0.05)
