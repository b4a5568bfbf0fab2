"""Per-configuration metrics (DESIGN §2) from the per-sample rows."""
from __future__ import annotations

import pandas as pd

from .stats import mcnemar_exact


def summarize(rows: pd.DataFrame, wall_seconds: float) -> list[dict]:
    """One summary per learning rate; accuracies (%) are on the uncertain (scored) samples."""
    out = []
    for lr, g in rows.groupby("lr", sort=True):
        n_total = len(g)
        s = g[g["uncertain"]]
        n = len(s)
        right0, right = s["pred_source"] == s["label"], s["pred"] == s["label"]
        acc0 = 100.0 * right0.mean() if n else float("nan")
        acc = 100.0 * right.mean() if n else float("nan")
        n_fixed, n_broken = int((~right0 & right).sum()), int((right0 & ~right).sum())
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
            "n_updated": int(s["updated"].sum()),
            "n_nonfinite": int(s["nonfinite"].sum()),
            "forwards_per_sample": float(s["forwards"].mean()) if n else 0.0,
            "backwards_per_sample": float(s["backwards"].mean()) if n else 0.0,
            "wall_seconds": wall_seconds,
            "samples_per_s": n_total / wall_seconds if wall_seconds > 0 else float("nan"),
        })
    return out
