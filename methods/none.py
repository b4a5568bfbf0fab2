"""The method `none`: the source model, no adaptation; the reference every Δacc is measured against."""
from tta_bench.core.method import Method


class NoAdaptation(Method):
    name = "none"
    description = "source model, no adaptation (the reference)"
    adapts = False
