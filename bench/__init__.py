"""Fleet's benchmarks: ``python -m bench.run`` (see docs/BENCHMARKS.md)."""
