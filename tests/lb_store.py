"""A small real MLflow store shared by the leaderboard and site tests (built once per process):
the toy task on two models × two shifts, three methods at three learning rates, and iFo at two
more thresholds on one configuration."""
import functools
import tempfile

from conftest import ToyTask, small_cnn

import tta_bench
from tta_bench import HParam, Protocol, RunOptions

LRS = (5e-3, 2e-2, 1e-1)  # 2e-2 is within x2 of the focus methods' default lr 2.05e-2
METHODS = ("ifo", "entropy", "dofo")
MODELS = ("a", "b")
SHIFTS = (0.5, 1.0)
CONFIGS = [f"toy(model={m}, shift={s})" for m in MODELS for s in SHIFTS]


class GridToy(ToyTask):
    """The toy task with two task options, as a benchmark with several models and shifts."""

    options = {"model": HParam("a", str, "toy network", choices=MODELS),
               "shift": HParam(0.5, float, "added to every input")}

    def __init__(self, **options):
        super().__init__(**options)
        self.x = self.x + self.opts.shift
        self.model = small_cnn(seed=MODELS.index(self.opts.model))


@functools.cache
def grid_store() -> tuple[str, dict]:
    """(tracking URI, {(configuration, method): {lr: summary}}) of the runs at d = 0.16."""
    uri = f"sqlite:///{tempfile.mkdtemp(prefix='tta-bench-lb-')}/mlflow.db"
    options = RunOptions(progress=False, tracking_uri=uri, experiment="lb")
    results = {}
    for model in MODELS:
        for shift in SHIFTS:
            for name in METHODS:
                r = tta_bench.run(GridToy(model=model, shift=shift), tta_bench.get_method(name), Protocol(LRS), options)
                results[f"toy(model={model}, shift={shift})", name] = {s["lr"]: s for s in r.summary}
    for d in (0.08, 0.32):
        tta_bench.run(GridToy(), tta_bench.get_method("ifo"), Protocol(LRS, threshold=d), options)
    return uri, results
