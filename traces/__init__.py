"""Trace format, writer and reader: record what each trainer rank of a live run needed, replay it offline.

The format (schema ``rudder-trace``, version 1) is documented in ``traces/FORMAT.md`` and defined in
:mod:`traces.schema`; :class:`TraceWriter` records one rank, :class:`Trace` / :class:`RankTrace` read it back.
"""

from .reader import RankTrace, Trace
from .schema import SCHEMA, VERSION, TraceError, TraceIncompleteWarning
from .writer import TraceWriter

__all__ = ["SCHEMA", "VERSION", "RankTrace", "Trace", "TraceError", "TraceIncompleteWarning", "TraceWriter"]
