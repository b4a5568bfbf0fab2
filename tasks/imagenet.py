"""ImageNet-1k validation on any torchvision classification model (IMAGENET1K_V1 weights)."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

from tta_bench.errors import TTAError
from tta_bench.hparams import HParam
from tta_bench.task import Sample, Task, UnreadableSample

from .augment import augmix_views

DATA_ENV = "TTA_BENCH_IMAGENET_DIR"
SYNSETS_FILE = Path(__file__).parent / "data" / "imagenet_synsets.txt"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def synsets() -> list[str]:
    """The 1000 WordNet ids in the standard class-index order."""
    return SYNSETS_FILE.read_text().split()


class ImageNet(Task):
    name = "imagenet"
    kind = "image"
    description = "ImageNet-1k validation (folder per synset) on a torchvision model"
    options = {
        "model": HParam("resnet50", str, "torchvision classification model (tta-bench list models)"),
        "weights": HParam("IMAGENET1K_V1", str, "torchvision weights name, or none for random weights"),
        "data_dir": HParam(None, str, f"ImageNet val folder (or set ${DATA_ENV})", nullable=True),
    }

    @classmethod
    def models(cls) -> list[str]:
        return [m for m in torchvision.models.list_models(module=torchvision.models)
                if "IMAGENET1K_V1" in torchvision.models.get_model_weights(m).__members__]

    @cached_property
    def _weights_enum(self) -> Any:
        if self.opts.model not in torchvision.models.list_models(module=torchvision.models):
            raise TTAError(f"unknown torchvision classification model {self.opts.model!r}; "
                           "see `tta-bench list models`")
        return torchvision.models.get_model_weights(self.opts.model)

    @property
    def weights(self) -> Any:
        """The weights enum member, or None for random weights."""
        if self.opts.weights.lower() == "none":
            return None
        members = self._weights_enum.__members__
        if self.opts.weights not in members:
            raise TTAError(f"model {self.opts.model} has no weights {self.opts.weights!r}; "
                           f"choose one of: {', '.join(members)}, none")
        return members[self.opts.weights]

    @cached_property
    def transforms(self) -> Any:
        members = self._weights_enum.__members__
        ref = self.weights or members.get("IMAGENET1K_V1") or next(iter(members.values()))
        return ref.transforms()

    @property
    def data_dir(self) -> Path:
        given = self.opts.data_dir or os.environ.get(DATA_ENV)
        if not given:
            raise TTAError(f"no ImageNet data: pass --data-dir DIR or set {DATA_ENV} to the validation "
                           "folder with one sub-folder per synset (n01440764/*.JPEG, ...)")
        path = Path(given).expanduser()
        if not path.is_dir():
            raise TTAError(f"ImageNet data folder {path} does not exist; pass --data-dir with the "
                           "validation folder (one sub-folder per synset)")
        return path

    @cached_property
    def files(self) -> list[tuple[Path, int]]:
        """(image, class index) in a fixed order: synsets in class order, files sorted by name."""
        index = {wnid: i for i, wnid in enumerate(synsets())}
        root = self.data_dir
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise TTAError(f"{root} has folders that are not ImageNet-1k synsets: {', '.join(unknown[:5])}"
                           " (expected the validation layout: one folder per WordNet id, e.g. n01440764)")
        files = [(f, index[d.name]) for d in folders for f in sorted(d.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise TTAError(f"no images (.JPEG/.jpg/.png) in the synset folders of {root}")
        return files

    def check(self) -> None:
        _ = self._weights_enum, self.weights, self.files  # each raises a TTAError saying what is wrong

    def load_model(self) -> nn.Module:
        name, weights = self.opts.model, self.weights
        try:
            return torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
            raise TTAError(f"cannot load {name} {weights.name} weights: {file} is not there and the "
                           f"download failed ({err}); fetch {weights.url} to that path (or set TORCH_HOME)"
                           ", or pass --weights none for random weights") from None

    def samples(self) -> Iterator[Sample]:
        for i, (path, label) in enumerate(self.files):
            yield Sample(i, path, label)

    def num_samples(self) -> int:
        return len(self.files)

    def num_classes(self) -> int:
        return len(synsets())

    def collate(self, raws: list[Path]) -> Tensor:
        images = []
        for position, path in enumerate(raws):
            try:
                with Image.open(path) as img:
                    images.append(self.transforms(img.convert("RGB")))
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # corrupt, truncated, …
                raise UnreadableSample(position, str(path), str(err) or type(err).__name__) from None
        return torch.stack(images)

    def augmenter(self):
        mean, std = torch.tensor(self.transforms.mean), torch.tensor(self.transforms.std)
        return augmix_views(255.0 * std, 255.0 * mean)

    def metadata(self) -> dict:
        return {"model": self.opts.model, "weights": self.opts.weights, "data_dir": str(self.data_dir),
                "n_images": len(self.files), "transforms": repr(self.transforms),
                "torchvision": torchvision.__version__}
