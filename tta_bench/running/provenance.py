"""Reproducibility metadata recorded with every run (lm-evaluation-harness style)."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable

import torch

PACKAGES = ("tta-bench", "torch", "torchvision", "numpy", "scipy", "transformers", "datasets")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the tta-bench checkout this code runs from (None outside a checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def source_sha256(folders: Iterable[Path] | None = None) -> str:
    """sha256 of the code that runs: every .py file of tta_bench (its subpackages too), its methods
    and its tasks (package and path, then content). Identifies the code where there is no git commit (an installed
    wheel, a copy on a cluster node); the same for a checkout and the wheel built from it."""
    if folders is None:
        return _installed_source_sha256()
    digest = hashlib.sha256()
    folders = [Path(f) for f in folders]
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if any(other != folder and other.is_relative_to(folder) and path.is_relative_to(other)
                   for other in folders):  # a wheel's tta_bench/methods: hashed as methods, not twice
                continue
            digest.update(f"{folder.name}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@cache
def _installed_source_sha256() -> str:
    import tta_bench.methods
    import tta_bench.tasks
    return source_sha256([Path(__file__).parent, *map(Path, tta_bench.methods.__path__),
                          *map(Path, tta_bench.tasks.__path__)])


def environment(device: torch.device) -> dict:
    env = {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "source_sha256": source_sha256(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "allocator": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "default",
        "numerics": {  # batched vs single-sample kernels can round differently with these on
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
        "command": sys.argv,
    }
    return env
