"""`tta-bench leaderboard --runs DIR`: run folders (run.json, summary.csv) read as the runs table
that logging the same runs to MLflow gives, so runs made without a store (a GPU machine without
MLflow) are published without one."""

import numpy as np
import pandas as pd
import pytest
from lb_store import GridToy

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError
from tta_bench.reporting.runs import METRICS, folder_runs, load_runs

COLUMNS = ["task", "configuration", "method", "method_name", "lr", "threshold", "option.model", "option.shift"]


def test_run_folders_give_the_rows_mlflow_gives(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for model in ("a", "b"):
        for name, hp in (("ifo", {}), ("ifo", {"weighted": False}), ("entropy", {})):
            out = tmp_path / "runs" / f"{model}-{name}-{len(hp)}"
            tta_bench.run(GridToy(model=model), tta_bench.get_method(name, **hp), Protocol((5e-3, 2e-2)),
                          RunOptions(progress=False, tracking_uri=uri, experiment="f", out=out))
    logged = load_runs(uri, "f").sort_values(COLUMNS[1:5], ignore_index=True)
    read = folder_runs(tmp_path / "runs").sort_values(COLUMNS[1:5], ignore_index=True)
    assert len(read) == len(logged) == 12
    pd.testing.assert_frame_equal(read[COLUMNS].astype(str), logged[COLUMNS].astype(str))
    for m in METRICS:
        if m in logged and logged[m].notna().any():
            np.testing.assert_allclose(read[m].astype(float), logged[m].astype(float), rtol=1e-9, err_msg=m)
    assert read["hp.weighted"].tolist() == logged["hp.weighted"].tolist()
    assert read["source"].notna().all() and read["parent"].notna().all()  # a sweep of 2 lrs: its folder
    assert set(read["device"]) == set(logged["device"]) == {"CPU"}  # what ran them, for the cost columns


def test_a_folder_without_runs_or_with_a_damaged_run_is_one_line(tmp_path):
    with pytest.raises(TTAError, match="no run folders"):
        folder_runs(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(TTAError, match="is not a readable run folder") as err:
        folder_runs(tmp_path)
    assert "\n" not in str(err.value)
