"""Trace format, writer and reader."""
