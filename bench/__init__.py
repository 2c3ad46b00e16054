"""rudder's benchmarks: run with ``python -m rudder.bench`` (``--quick`` for a few-minute version)."""
