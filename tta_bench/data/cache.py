"""The per-user cache of weights and data: its root, folders verified against a manifest of their
files' sha256 and sizes and replaced atomically, the offline switch, and `file_sha256`, the one
file-hashing helper of the package."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from tta_bench.core.errors import TTAError

MANIFEST = "tta-bench-cache.json"


def cache_root() -> Path:
    """Per-user cache: $TTA_BENCH_CACHE, else $XDG_CACHE_HOME/tta-bench, else ~/.cache/tta-bench."""
    if os.environ.get("TTA_BENCH_CACHE"):
        return Path(os.environ["TTA_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tta-bench"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (model weights, data releases, shipped snapshots)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file in `folder` but the manifest, in order."""
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]


def folder_files(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file in `folder` but the manifest."""
    return {str(f.relative_to(folder)): {"sha256": file_sha256(f), "size": f.stat().st_size} for f in _files(folder)}


def files_intact(folder: Path, recorded: dict[str, dict]) -> bool:
    """Each recorded file has its recorded size (checked first: cheap) and sha256; raises OSError
    if one is missing."""
    return (all((folder / name).stat().st_size == f["size"] for name, f in recorded.items())
            and all(file_sha256(folder / name) == f["sha256"] for name, f in recorded.items()))


def cache_is_valid(folder: Path, source_sha: str) -> bool:
    """The manifest is this source's and every file is as it was written: none edited, truncated,
    deleted or added (a changed tokenizer, config or template would change every prediction)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        recorded = manifest["files"]
        present = [str(f.relative_to(folder)) for f in _files(folder)]
        return (manifest["source_sha256"] == source_sha and present == sorted(recorded)
                and files_intact(folder, recorded))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def weights_cache(name: str, source: Path, fill: Callable[[Path], None]) -> Path:
    """A cached folder of weights made once from a packaged `source` file by `fill(folder)`, which
    writes model.safetensors (and config, tokenizer): keyed by the source's sha256, every file
    verified on every use, and (re)built in a temporary folder that replaces a missing, damaged
    or edited one."""
    source_sha = file_sha256(source)
    folder = cache_root() / "models" / f"{name}-{source_sha[:12]}"
    if cache_is_valid(folder, source_sha):
        return folder

    def fill_and_record(tmp: Path) -> None:
        fill(tmp)
        files = folder_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"source": str(source), "source_sha256": source_sha,
                                                "sha256": files["model.safetensors"]["sha256"],  # its version
                                                "size": files["model.safetensors"]["size"],
                                                "files": files}, indent=1))
    try:
        replace_folder(folder, fill_and_record)
    except OSError as err:
        raise TTAError(f"cannot write the model cache {folder} ({err.strerror or err}); set TTA_BENCH_CACHE to a "
                       f"writable folder with 1 GB free") from None
    return folder


def replace_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """`fill` writes a fresh temporary folder beside `folder`, which then replaces it: a crash
    leaves the old folder or none, never a half-written one. Processes filling the same absent
    folder at once (a sweep's workers on one corpus) race safely: the first rename wins, and a
    loser, whose copy is the same, discards its own rather than pull the winner's from under a
    reader."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    existed = folder.exists()
    fill(tmp)
    if existed:  # a stale or corrupt copy: set it aside (one atomic rename), then put ours in place
        stale = folder.with_name(folder.name + f".stale{os.getpid()}")
        try:
            folder.rename(stale)
        except FileNotFoundError:  # another process already set it aside
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(folder)  # atomic; fails if another process's copy is already there
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def offline() -> bool:
    """HF_HUB_OFFLINE or TTA_BENCH_OFFLINE set: never try the network."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TTA_BENCH_OFFLINE"))


def hf_datasets() -> Any:
    """The `datasets` module; offline (see `offline`) it is told so before it is first imported,
    so that a dataset missing from the cache fails at once instead of after minutes of retries."""
    if offline():
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    import datasets
    return datasets
