"""Benchmark scripts (``python -m benchmarks.NAME`` from the repository root). Not shipped."""
