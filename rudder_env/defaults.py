"""The run defaults, in one table: what a run uses when nobody says otherwise.

``train.py gnn`` (:class:`rudder.runtime.config.TrainConfig`), ``rudder/Live-v0``, ``rudder/Replay-v0`` (for a trace
recorded before an option existed: :data:`RECORDED_BEFORE_OPTION`), the buffer and the vectorised replay envs
(:mod:`rudder.env.vector`) all read their defaults here, so changing one changes it everywhere.

The three kinds of action levels each have their own name: :data:`LINK_LEVELS` (multiples of the link budget, the
level agents' ``Discrete`` action), :data:`FRACTION_LEVELS` (fractions of the admissible candidates,
:class:`rudder.env.wrappers.FractionBudget`) and :data:`COUNT_LEVELS` (candidate counts,
:class:`rudder.env.wrappers.Budget`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RunDefaults:
    """One training run's defaults (the options of ``train.py gnn`` that the environments share)."""

    candidates: int = 256  # K: ranked candidates offered per decision (the action size)
    alpha: float = 0.05  # score decay per minibatch
    period: int = 8  # minibatches per decision window
    fanout: str = "10,25"  # neighbours sampled per layer, input layer last
    batch_size: int = 1000  # seed nodes per minibatch
    buffer_fraction: float = 0.25  # buffer capacity as a fraction of the halo nodes
    buffer_init: str = "degree"  # the initial fill: the most-connected halo nodes
    admit_on_miss: bool = False  # fetched misses stay out of the buffer
    sample_ahead: int = 4  # minibatches sampled beyond the next one
    prefetch: str = "background"  # prefetch sets are pulled in chunks while training goes on
    reward: str = "traffic"  # minus remote rows fetched over remote rows sampled
    ranking: str = "misses"  # candidates by decayed miss count


#: The defaults every door reads.
DEFAULTS = RunDefaults()

#: What a trace that lacks an option (recorded before the option existed) ran with: today's default, except background
#: prefetch, which came later (such a run pulled its prefetch sets inline). Sampling ahead changes no batch, so a trace
#: without ``sample_ahead`` is replayed as today's trainer would run it.
RECORDED_BEFORE_OPTION: dict = dict(asdict(DEFAULTS), prefetch="inline")

#: How far the lookahead agent samples ahead unless told (live and replay): a budget of sampled blocks, reaching
#: far enough that its ranking approaches Belady MIN (BENCHMARKS.md, P1), at the memory of the blocks held.
LOOKAHEAD_SAMPLE_AHEAD = "16MB"

#: Link-budget levels of the level agents: nothing, an eighth, a quarter, half, or all of what the link can carry
#: while the next window samples and computes.
LINK_LEVELS = (0.0, 0.125, 0.25, 0.5, 1.0)

#: Fraction levels of :class:`rudder.env.wrappers.FractionBudget` (PPO's action): of the admissible candidates.
FRACTION_LEVELS = (0.0, 0.25, 0.5, 1.0)

#: Count levels of :class:`rudder.env.wrappers.Budget`: candidates admitted.
COUNT_LEVELS = (0, 16, 64, 256)
