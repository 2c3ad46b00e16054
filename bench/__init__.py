"""rudder's benchmarks: run with ``python -m bench`` (``--quick`` for a few-minute version)."""
