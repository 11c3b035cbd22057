"""Benchmarks of fcnjax (run as modules, e.g. ``python -m benchmarks.buckets``)."""
