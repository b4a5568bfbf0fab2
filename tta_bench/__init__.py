"""tta-bench: test-time adaptation methods under one single-sample-reset protocol."""
from importlib.metadata import PackageNotFoundError, version

from .engine import PAPER_LR_GRID, AdaptResult, Protocol, adapt
from .errors import TTAError
from .hparams import HParam
from .method import Method, Source, Step
from .registry import (get_method, get_task, list_methods, list_tasks, register_method,
                       register_task)
from .runner import RunOptions, RunResult, run
from .task import Sample, Task

try:
    __version__ = version("tta-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "PAPER_LR_GRID", "AdaptResult", "HParam", "Method", "Protocol", "RunOptions", "RunResult",
    "Sample", "Source", "Step", "TTAError", "Task", "adapt", "get_method", "get_task",
    "list_methods", "list_tasks", "register_method", "register_task", "run",
]
