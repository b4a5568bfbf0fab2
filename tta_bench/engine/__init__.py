"""One sample's adaptation under the single-sample-reset protocol (`adapt`), and many samples'
at once where that is exact (`blocks`)."""
import warnings
from importlib import import_module

# Names of the 0.1 module `tta_bench.engine`, still importable from here with a warning.
_MOVED = {"Protocol": "core.protocol", "LR_GRIDS": "core.protocol", "PAPER_LR_GRID": "core.protocol",
          "OPTIMIZERS": "core.protocol", "Updater": "engine.adapt", "Adapter": "engine.adapt",
          "Adaptation": "engine.adapt", "AdaptResult": "engine.adapt", "adapt": "engine.adapt"}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"tta_bench.engine.{name} is now tta_bench.{_MOVED[name]}.{name}; the old path goes in "
                      "tta-bench 0.3", DeprecationWarning, 2)
        return getattr(import_module(f"tta_bench.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'tta_bench.engine' has no attribute {name!r}")
