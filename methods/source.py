"""The source model: no adaptation; the reference every Δacc is measured against."""
from tta_bench.core.method import Method


class Source(Method):
    name = "none"
    description = "source model, no adaptation (the reference)"
    adapts = False
