"""tta-bench: test-time adaptation methods under one single-sample-reset protocol.

Layers, each importing only from the ones before it (tests/test_layers.py checks this):
  core       the contract: errors, hyperparameters, run settings, protocol, Method, Task, registry
  engine     one sample's adaptation (reset, gating, optimizer, clipping, prediction) and blocks
  storage    files and stores: checkpoints, atomic writes, signals, MLflow tracking
  data       what tasks share: the weights and data cache (file_sha256), corruptions, AugMix, data spaces
  running    a run: the scan over a task's samples, its summary and provenance
  sweeps     specs of many runs and their executors (local, Slurm)
  reporting  leaderboards: reading runs, choosing hyperparameters, statistics, tables, site
  cli        the `tta-bench` command
Built-in methods and tasks are the plugin packages `tta_bench.methods` and `tta_bench.tasks` (between
data and running).
"""
import importlib.abc
import importlib.util
import sys
import warnings
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tta-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# The public API, imported on first use (importing one layer does not load the others).
_API = {
    "TTAError": "core.errors", "HParam": "core.hparams", "Method": "core.method", "Source": "core.method",
    "Step": "core.method", "Sample": "core.task", "Task": "core.task", "PAPER_LR_GRID": "core.protocol",
    "Protocol": "core.protocol", "get_method": "core.registry", "get_task": "core.registry",
    "list_methods": "core.registry", "list_tasks": "core.registry", "register_method": "core.registry",
    "register_task": "core.registry", "AdaptResult": "engine.adapt", "adapt": "engine.adapt",
    "RunOptions": "running.scan", "RunResult": "running.scan", "run": "running.scan",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f"tta_bench.{_API[name]}"), name)
    raise AttributeError(f"module 'tta_bench' has no attribute {name!r}")


# Module paths before the layers (0.1): `import tta_bench.method` still works, with a warning.
_MOVED = {"errors": "core.errors", "hparams": "core.hparams", "params": "core.norms", "method": "core.method",
          "task": "core.task", "registry": "core.registry", "runner": "running.scan",
          "tasks.corruptions": "data.corruptions", "tasks.augment": "data.augment",
          "tasks.dataspace": "data.dataspace"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("tta_bench.")
        if fullname.startswith("tta_bench.") and old in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"tta_bench.{_MOVED[spec.name.removeprefix('tta_bench.')]}"
        warnings.warn(f"{spec.name} is now {new}; the old path goes in tta-bench 0.3", DeprecationWarning, 2)
        return import_module(new)

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModules())
