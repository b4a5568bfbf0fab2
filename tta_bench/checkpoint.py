"""Per-sample rows written incrementally and atomically, so that an interrupted run resumes where
it stopped instead of starting over (a reader sees the previous file or the next, never half)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TTAError

META = b"tta_bench"
FILE = "checkpoint.parquet"  # its name in a run's or a sweep job's folder


@dataclass
class Progress:
    rows: pd.DataFrame  # every row recorded so far
    n_seen: int  # samples of the stream already processed (resume after them)
    n_uncertain: int
    wall: float  # seconds spent so far, over all attempts
    skipped: list[dict] = field(default_factory=list)  # unreadable samples passed over so far
    attempts: list[dict] = field(default_factory=list)  # each attempt's samples and environment


def save(path: Path, progress: Progress, fingerprint: str) -> None:
    table = pa.Table.from_pandas(progress.rows, preserve_index=False)
    meta = {"fingerprint": fingerprint, "n_seen": progress.n_seen, "n_uncertain": progress.n_uncertain,
            "wall": progress.wall, "skipped": progress.skipped, "attempts": progress.attempts}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META: json.dumps(meta).encode()})
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)  # a run's --out is made when it has rows to keep
    write(tmp)
    os.replace(tmp, path)


def load(path: Path, fingerprint: str) -> Progress | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[META])
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        raise TTAError(f"checkpoint {path} is unreadable ({err}); delete it to start this run over") from None
    if meta["fingerprint"] != fingerprint:
        raise TTAError(f"checkpoint {path} was written by a run of another configuration (task, method, "
                       f"hyperparameters, protocol, limits, seed or the data differ); resume with the stopped run's "
                       f"settings, or delete it to start over")
    return Progress(table.to_pandas(), meta["n_seen"], meta["n_uncertain"], meta["wall"], meta.get("skipped", []),
                    meta.get("attempts", []))
