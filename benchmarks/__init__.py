"""Benchmark and report scripts (see README.md here): run each from the repository root as
`python -m benchmarks.NAME`; one script imports another as `from benchmarks.NAME import ...`."""
