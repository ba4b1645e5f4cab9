"""Benchmarks that print figures (not timed tests): ``python -m bench.live_path``."""
