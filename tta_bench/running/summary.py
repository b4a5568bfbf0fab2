"""Per-configuration metrics (docs/DESIGN.md §2) from the per-sample rows."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from tta_bench.core.stats import mcnemar_exact


def summarize(rows: pd.DataFrame, wall_seconds: float, metrics: Sequence[str] = ()) -> list[dict]:
    """One summary per learning rate; accuracies (%) are on the uncertain (scored) samples, and
    `*_all` over every sample scanned (an unscored sample keeps the source prediction), as
    whole-set error rates are reported. Per-sample task metrics (text: bpb), where their columns exist: see `metric_summary`."""
    out = []
    for lr, g in rows.groupby("lr", sort=True):
        n_total = len(g)
        s = g[g["uncertain"]]
        n = len(s)
        right0, right = s["pred_source"] == s["label"], s["pred"] == s["label"]
        acc0 = 100.0 * right0.mean() if n else float("nan")
        acc = 100.0 * right.mean() if n else float("nan")
        n_fixed, n_broken = int((~right0 & right).sum()), int((right0 & ~right).sum())
        # over every sample scanned (NaN for none)
        all0, all1 = (100.0 * (g[c] == g["label"]).mean() if n_total else float("nan")
                      for c in ("pred_source", "pred"))
        out.append({
            "lr": float(lr),
            "n_total": n_total,
            "n_uncertain": n,
            "frac_uncertain": n / n_total if n_total else float("nan"),
            "acc_source": acc0,
            "acc_adapted": acc,
            "delta_acc": acc - acc0,
            "n_changed": int((s["pred"] != s["pred_source"]).sum()),
            "n_fixed": n_fixed,
            "n_broken": n_broken,
            "p_mcnemar": mcnemar_exact(n_fixed, n_broken),
            "acc_source_all": all0,
            "acc_adapted_all": all1,
            "delta_acc_all": all1 - all0,
            "n_updated": int(s["updated"].sum()),
            "n_nonfinite": int(s["nonfinite"].sum()),
            "forwards_per_sample": float(s["forwards"].mean()) if n else 0.0,
            "backwards_per_sample": float(s["backwards"].mean()) if n else 0.0,
            "select_seconds_per_sample": float(s["select_seconds"].mean()) if n and "select_seconds" in s else 0.0,
            "wall_seconds": wall_seconds,
            "samples_per_s": n_total / wall_seconds if wall_seconds > 0 else float("nan"),
            "seconds_per_sample": wall_seconds / n if n else float("nan"),  # per scored sample, all lrs
            **{k: v for name in metrics if name in s for k, v in metric_summary(s, name).items()},
        })
    return out


def metric_summary(scored: pd.DataFrame, name: str) -> dict[str, float]:
    """`<name>_source` and `<name>`: means over the scored samples at θ0 and after adaptation, each
    over its finite values; `n_<name>_nan`: scored samples whose adapted value is not finite (a
    non-finite adaptation), left out of the mean; `<name>_change_pct`: 100·(after − θ0)/θ0."""
    before, after = scored[f"{name}_source"].to_numpy(float), scored[name].to_numpy(float)
    mean0 = float(before[np.isfinite(before)].mean()) if np.isfinite(before).any() else math.nan
    mean = float(after[np.isfinite(after)].mean()) if np.isfinite(after).any() else math.nan
    return {f"{name}_source": mean0, name: mean, f"n_{name}_nan": int((~np.isfinite(after)).sum()),
            f"{name}_change_pct": 100.0 * (mean - mean0) / mean0 if mean0 else math.nan}
