"""Media sources that publish into a theatre (synthetic cameras and tones for tests/benchmarks)."""
