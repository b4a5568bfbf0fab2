"""Method and task registries: built-ins are discovered from the modules of `tta_bench.methods`
and `tta_bench.tasks`; third-party plugins register through the entry-point groups of the
same names (benchopt-style: one module per family, no central list to edit)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import Any, TypeVar

from tta_bench.core.errors import TTAError
from tta_bench.core.method import Method
from tta_bench.core.task import Task

T = TypeVar("T", Method, Task)
_extra: dict[type, dict[str, type]] = {Method: {}, Task: {}}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class at run time (usable as a decorator)."""
    return _register(Method, cls)


def register_task(cls: type[Task]) -> type[Task]:
    """Register a task class at run time (usable as a decorator)."""
    return _register(Task, cls)


def _register(base: type, cls: type) -> type:
    _extra[base][_checked(base, cls).name] = cls
    return cls


def _checked(base: type, cls: Any) -> type:
    if not (inspect.isclass(cls) and issubclass(cls, base) and isinstance(cls.__dict__.get("name"), str)):
        raise TTAError(f"{cls!r} is not a {base.__name__} subclass with a `name`")
    return cls


@cache
def _discover(base: type, package: str, group: str) -> dict[str, type]:
    found: dict[str, type] = {}
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == module.__name__
                    and isinstance(obj.__dict__.get("name"), str)):
                found[obj.name] = obj
    for ep in entry_points(group=group):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must not break the built-ins
            raise TTAError(f"plugin {ep.name!r} ({ep.value}) in {group} failed to load: {err}") from err
        found[_checked(base, cls).name] = cls
    return found


def _registry(base: type) -> dict[str, type]:
    kind = "methods" if base is Method else "tasks"
    return {**_discover(base, f"tta_bench.{kind}", f"tta_bench.{kind}"), **_extra[base]}


def method_class(name: str) -> type[Method]:
    return _lookup(Method, name)


def task_class(name: str) -> type[Task]:
    return _lookup(Task, name)


def _lookup(base: type, name: str) -> Any:
    registry = _registry(base)
    if name not in registry:
        kind = "method" if base is Method else "task"
        raise TTAError(f"unknown {kind} {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]


def get_method(name: str, **hparams: Any) -> Method:
    """A configured method; unknown names and bad hyperparameters raise a clear TTAError."""
    return method_class(name)(**hparams)


def get_task(name: str, **options: Any) -> Task:
    """A configured task; unknown names and bad options raise a clear TTAError."""
    return task_class(name)(**options)


def list_methods() -> list[str]:
    return sorted(_registry(Method))


def list_tasks() -> list[str]:
    return sorted(_registry(Task))
