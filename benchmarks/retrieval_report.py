"""Issue 13's report from the runs of sweeps/retrieval.toml (or any text runs with bpb): per corpus
and method, bits per byte relative to the base model (%, bootstrap 90 % CI over windows, as in the
SIFT paper), Δacc, selection and other seconds per window (timed on the device most of a run's
windows ran on: a run resumed on another machine mixes devices), with every window (gate none; a
gated run left its certain windows unadapted) and with the shared gate (the windows with
Δ1,2 < d: under the per-sample reset, exactly the gated run).

    python -m benchmarks.retrieval_report --experiment tta-bench-retrieval [--tracking-uri URI] [--d 0.16]

--save FILE.parquet keeps the per-window rows the report reads (small: commit them under
benchmarks/results/), and --rows FILE.parquet makes the report from them, without the store;
--folders DIR... reads run folders (`tta-bench run --out`, finished or stopped early, or a sweep
job's folder with only its checkpoint) instead,
naming each retrieval run by its N (e.g. `sift N=50`). --paired A B adds B − A per corpus: the
difference of their bpb changes on the same windows, with a paired bootstrap 90 % CI.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from tta_bench.reporting.runs import load_runs
from tta_bench.storage.checkpoint import FILE as CHECKPOINT
from tta_bench.storage.checkpoint import metadata
from tta_bench.storage.tracking import open_client, resolve_uri


def rows_of(uri: str, experiment: str) -> pd.DataFrame:
    """Every run's per-sample rows (finished or stopped early), with its corpus, method label,
    data-space info and the device each window ran on."""
    runs = load_runs(uri, experiment, interrupted=True)  # common_windows evens out runs stopped early
    client = open_client(resolve_uri(uri))
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        lrs = runs.groupby("method")["lr"].nunique()
        for _, run in runs.iterrows():
            path = Path(client.download_artifacts(run["run_id"], "samples.parquet", tmp))
            rows = pd.read_parquet(path)
            rows = rows[rows["lr"] == run["lr"]]
            label = f"{run['method']} lr={run['lr']:g}" if lrs[run["method"]] > 1 else run["method"]
            meta = _metadata(client, run["run_id"], tmp)
            frames.append(rows.assign(corpus=run["option.corpus"], method=label,
                                      data_space=json.dumps(meta["task"].get("data_space") if meta else None),
                                      device=window_devices(rows["index"], meta)))
    return pd.concat(frames, ignore_index=True)


def rows_of_folders(folders: list[Path]) -> pd.DataFrame:
    """The per-window rows of run folders (run.json and samples.parquet, one lr each), and of sweep
    jobs stopped midway (benchmarks/fair_gpu: only their checkpoint.parquet, the windows finished)."""
    frames = []
    for folder in folders:
        if (folder / "run.json").is_file() and (folder / "samples.parquet").is_file():
            record = json.loads((folder / "run.json").read_text())
            config, meta = record["config"], record["metadata"]
            rows, data_space = pd.read_parquet(folder / "samples.parquet"), meta["task"].get("data_space")
        elif (folder / CHECKPOINT).is_file():
            rows, config, meta = _checkpointed(folder / CHECKPOINT)
            data_space = None  # recorded when the run finishes
        else:
            continue
        n = config["hparams"].get("n_select")
        frames.append(rows.assign(corpus=config["task_options"]["corpus"],
                                  method=config["method"] + (f" N={n}" if n is not None else ""),
                                  data_space=json.dumps(data_space), device=window_devices(rows["index"], meta)))
    return pd.concat(frames, ignore_index=True)


def _checkpointed(path: Path) -> tuple[pd.DataFrame, dict, dict]:
    """(rows, the run's settings, its attempts as run.json's metadata names them) of a checkpoint."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = metadata(table.schema)
    attempts = meta["attempts"]
    return table.to_pandas(), meta["settings"], {"device_name": attempts[-1]["device_name"],
                                                 "earlier_attempts": attempts[:-1]}


def paired(rows: pd.DataFrame, a: str, b: str, gated: bool, d: float) -> list[list]:
    """Per corpus, B's bpb change minus A's (percentage points) on the windows both scored, with a
    paired bootstrap 90 % interval (the same resampled windows for both)."""
    out = []
    for corpus, g in rows.groupby("corpus", sort=True):
        g = g[g["delta"] < d] if gated else g
        ga, gb = (g[g["method"] == m].set_index("index") for m in (a, b))
        shared = ga.index.intersection(gb.index)
        ga, gb = ga.loc[shared], gb.loc[shared]
        ok = np.isfinite(ga["bpb"]) & np.isfinite(gb["bpb"]) & np.isfinite(ga["bpb_source"])
        before, after_a, after_b = (x[ok].to_numpy() for x in (ga["bpb_source"], ga["bpb"], gb["bpb"]))
        if len(before) < 2:
            continue
        diff = 100 * (after_b.mean() - after_a.mean()) / before.mean()
        idx = resamples(len(before))
        boot = 100 * (after_b[idx].mean(1) - after_a[idx].mean(1)) / before[idx].mean(1)
        lo, hi = np.percentile(boot, [5, 95])
        wins = int((after_b < after_a).sum())
        out.append([corpus, f"{b} − {a}", len(before), f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                    f"{wins} / {int((after_b > after_a).sum())}"])
    return out


def _metadata(client, run_id: str, tmp: str) -> dict | None:
    """The run's run.json metadata (on the run or on its sweep-of-lrs parent)."""
    for rid in (run_id, client.get_run(run_id).data.tags.get("mlflow.parentRunId")):
        try:
            return json.loads(Path(client.download_artifacts(rid, "run.json", tmp)).read_text())["metadata"]
        except Exception:  # no run.json on this run
            continue
    return None


def window_devices(index: pd.Series, meta: dict | None) -> np.ndarray:
    """The device each window ran on: a run resumed elsewhere (`--resume` on another machine) has
    earlier attempts, each over samples [from_sample, to_sample), and its timings mix devices."""
    if meta is None:
        return np.full(len(index), "unrecorded", dtype=object)
    devices = np.full(len(index), meta.get("device_name", "unrecorded"), dtype=object)  # the last attempt
    for attempt in meta.get("earlier_attempts", []):
        devices[((index >= attempt["from_sample"]) & (index < attempt["to_sample"])).to_numpy()] = attempt["device_name"]
    return devices


KEPT = ["corpus", "method", "index", "delta", "label", "pred_source", "pred", "bpb_source", "bpb", "seconds",
        "select_seconds", "backwards", "data_space", "device"]  # what the report reads, for --save


def resamples(n_windows: int, n: int = 1000) -> np.ndarray:
    """n bootstrap resamples of a row's window positions, each row from the same seed: a row's CI
    depends on its own windows only, not on which other runs the report reads."""
    return np.random.default_rng(0).integers(0, n_windows, size=(n, n_windows))


def relative_bpb(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float]:
    """100·(mean bpb after / mean bpb before − 1) and its bootstrap 90 % interval over windows."""
    value = 100 * (after.mean() / before.mean() - 1)
    idx = resamples(len(before))
    boot = 100 * (after[idx].mean(1) / before[idx].mean(1) - 1)
    return value, *np.percentile(boot, [5, 95])


def common_windows(rows: pd.DataFrame) -> pd.DataFrame:
    """Per corpus, only the windows every method scored (a run stopped early covers fewer), so that
    each row compares like with like."""
    keep = []
    for _, g in rows.groupby("corpus"):
        shared = set.intersection(*(set(m["index"]) for _, m in g.groupby("method")))
        keep.append(g[g["index"].isin(shared)])
    return pd.concat(keep, ignore_index=True)


def table(rows: pd.DataFrame, gated: bool, d: float) -> list[list]:
    """One row per corpus and method (bootstrap: see `resamples`)."""
    out = []
    for (corpus, method), g in rows.groupby(["corpus", "method"], sort=True):
        g = g[g["delta"] < d] if gated else g
        g = g[np.isfinite(g["bpb"]) & np.isfinite(g["bpb_source"])]
        if g.empty:
            continue
        rel, lo, hi = relative_bpb(g["bpb_source"].to_numpy(), g["bpb"].to_numpy())
        acc0, acc = 100 * (g["pred_source"] == g["label"]).mean(), 100 * (g["pred"] == g["label"]).mean()
        device = g["device"].mode()[0]  # timings from one device only: the one most windows ran on
        timed = g[g["device"] == device]
        where = device if len(timed) == len(g) else f"{device} ({len(timed)} of {len(g)})"
        out.append([corpus, method, len(g), f"{g['bpb_source'].mean():.3f}", f"{g['bpb'].mean():.3f}",
                    f"{rel:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{acc - acc0:+.1f}", f"{timed['select_seconds'].mean():.2f}",
                    f"{(timed['seconds'] - timed['select_seconds']).mean():.2f}", where, f"{g['backwards'].mean():.1f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="tta-bench-retrieval")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--d", type=float, default=0.16, help="the shared gate's threshold")
    parser.add_argument("--all-windows", action="store_true",
                        help="each method on all its windows (default: only the windows every method of the corpus scored)")
    parser.add_argument("--save", type=Path, help="write the per-window rows read from the store to this parquet file")
    parser.add_argument("--rows", type=Path, help="report from a --save file instead of the store")
    parser.add_argument("--folders", type=Path, nargs="+", help="report from run folders instead of the store")
    parser.add_argument("--paired", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also B − A on the same windows (repeatable), e.g. --paired 'nn N=50' 'sift N=50'")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows = (pd.read_parquet(args.rows) if args.rows else rows_of_folders(args.folders) if args.folders
            else rows_of(args.tracking_uri, args.experiment))
    if "device" not in rows:  # saved before devices were recorded
        rows["device"] = "unrecorded"
    if args.save:
        rows[KEPT].to_parquet(args.save, index=False)
    rows = rows if args.all_windows else common_windows(rows)
    headers = ["corpus", "method", "windows", "bpb θ0", "bpb", "bpb vs base, % [90 % CI]", "Δacc (pp)",
               "select s/window", "other s/window", "timed on", "steps"]
    spaces = {(r.corpus, r.data_space) for r in rows[["corpus", "data_space"]].drop_duplicates().itertuples()}
    built = sorted({(c, i["embedder"], i["n_sequences"], i["n_tokens"], f"{i['build_seconds']:.0f}",
                     f"{i['size_bytes'] / 2**20:.1f}") for c, i in ((c, json.loads(s)) for c, s in spaces) if i})
    print(tabulate(built, headers=["corpus", "embedder", "sequences", "tokens", "build s", "MiB"], tablefmt="github"))
    whole = "every window (a run under a gate, e.g. a sweep's, left its certain windows unadapted)"
    for gated in (False, True):
        print(f"\n### {'shared gate, Δ1,2 < ' + str(args.d) if gated else whole}\n")
        print(tabulate(table(rows, gated, args.d), headers=headers, tablefmt="github"))
        if args.paired:
            print()
            print(tabulate([r for a, b in args.paired for r in paired(rows, a, b, gated, args.d)],
                           headers=["corpus", "difference", "windows", "bpb change, pp [90 % CI]",
                                    "windows lower / higher"], tablefmt="github"))


if __name__ == "__main__":
    main()
