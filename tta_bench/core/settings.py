"""Every run setting, declared once: its type, default, allowed values, help and whether it is part
of the protocol (the maths of adaptation, docs/DESIGN.md §2) or of the scan (which samples, where). The
`tta-bench run` flags, the sweep spec's keys, the `Protocol` and `RunOptions` defaults and the
tracking defaults are all derived from `SETTINGS` (tests/test_settings.py checks that they agree)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tta_bench.core.hparams import HParam

PAPER_LR_GRID: tuple[float, ...] = tuple(5e-6 * 2**j for j in range(19))  # Listing 1
LR_GRIDS = {"paper": PAPER_LR_GRID, "llm": PAPER_LR_GRID[9:14]}  # llm: 2.56e-3 … 4.10e-2
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Setting(HParam):
    """A run setting: an `HParam` (default, type, help, choices, nullable) and where it belongs.
    `by_method`: a method may declare its own default (`Method.default_lr`, `default_optimizer`),
    so a run that names none takes the method's; `default` is then the base `Method`'s (or none)."""

    kind: Literal["protocol", "scan"] = "protocol"
    by_method: bool = False

    @property
    def unset(self) -> Any:
        """The value a CLI flag or spec key takes when not given (None: the method decides)."""
        return None if self.by_method else self.default


SETTINGS: dict[str, Setting] = {
    "lr": Setting(None, float, "learning rate(s), comma-separated (default: the method's)", by_method=True),
    "lr_grid": Setting(None, str, "a named grid instead of --lr: paper: 5e-6·2^(j−1), j = 1..19; llm: its "
                       "values 2.56e-3 … 4.10e-2 (the paper's LLM range)", choices=tuple(LR_GRIDS)),
    "threshold": Setting(0.16, float, "adapt and score samples with Δ1,2 < threshold; none: all", nullable=True),
    "steps": Setting(1, int, "gradient steps per sample"),
    "clip": Setting(1.0, float, "max gradient norm; none: no clipping", nullable=True),
    "optimizer": Setting("sgd", str, "default: the method's (sgd; adam for the retrieval methods nn, nn-f, "
                         "sift, random)", choices=OPTIMIZERS, nullable=True, by_method=True),
    "momentum": Setting(0.0, float, "SGD momentum"),
    "weight_decay": Setting(0.0, float, "weight decay of the optimizer"),
    "limit": Setting(None, int, "use only the first N samples", nullable=True, kind="scan"),
    "max_uncertain": Setting(None, int, "stop after N uncertain samples", nullable=True, kind="scan"),
    "batch_size": Setting(None, int, "batch size of the source forward and gate (default: 1 on CPU, where it "
                          "measured fastest per sample; 64 on CUDA)", nullable=True, kind="scan"),
    "seed": Setting(0, int, "seed of everything random in the run (recorded)", kind="scan"),
    "device": Setting("auto", str, "auto (CUDA when present), cpu, cuda, cuda:N", kind="scan"),
}
# What the tracking store compares a run's protocol with to name its non-default settings.
PROTOCOL_DEFAULTS = {k: s.default for k, s in SETTINGS.items()
                     if s.kind == "protocol" and k not in ("lr", "lr_grid", "threshold")}


def default(name: str) -> Any:
    """A setting's default, for the dataclasses that carry it (`Protocol`, `RunOptions`)."""
    return SETTINGS[name].default
