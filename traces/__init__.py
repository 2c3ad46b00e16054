"""Trace format, writer and reader: record what each trainer rank of a live run needed, replay it offline.

The format (schema ``rudder-trace``, version 1) is documented in ``traces/FORMAT.md`` and defined in
:mod:`rudder.traces.schema`; :class:`TraceWriter` records one rank, :class:`Trace` / :class:`RankTrace` read it back.
"""

import os

from .reader import RankTrace, Trace
from .schema import SCHEMA, VERSION, TraceError, TraceIncompleteWarning
from .writer import TraceDiskFullError, TraceWriter

# the traces shipped with rudder (folders beside this file): samples, training and held-out sets
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
TRAIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train")
HELDOUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heldout")

__all__ = [
    "SAMPLES_DIR",
    "TRAIN_DIR",
    "HELDOUT_DIR",
    "SCHEMA",
    "VERSION",
    "RankTrace",
    "Trace",
    "TraceError",
    "TraceIncompleteWarning",
    "TraceDiskFullError",
    "TraceWriter",
]
