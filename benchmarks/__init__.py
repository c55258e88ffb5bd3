"""Benchmarks: `python -m benchmarks` prints the report; `benchmark_<op>.py` are the pytest-benchmark views
of the same cases (`python -m pytest benchmarks --benchmark-enable`)."""
