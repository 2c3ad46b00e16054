"""Prefetching agents behind one protocol."""
