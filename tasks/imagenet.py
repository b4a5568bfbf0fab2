"""ImageNet-1k validation on any torchvision classification model (IMAGENET1K_V1 weights), clean or
corrupted: `corruption` reads the released ImageNet-C (DIR/<corruption>/<severity>/<wnid>/*.JPEG,
224 px images: only normalised) or, given plain val (DIR/<wnid>/*.JPEG), corrupts on the fly
(resize 256, center crop 224, tta_bench.data.corruptions.corrupt_imagenet seeded by the sample index)."""
from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Sample, Task, UnreadableSample
from tta_bench.data import corruptions
from tta_bench.data.augment import augmix_views
from tta_bench.data.corruptions import CHOICES, CORRUPTIONS, SEVERITIES, canonical

DATA_ENV = "TTA_BENCH_IMAGENET_DIR"
SYNSETS_FILE = Path(__file__).parent / "data" / "imagenet_synsets.txt"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
C_SIZE, C_RESIZE = 224, 256  # ImageNet-C: val resized to 256, center-cropped to 224, corrupted, saved as JPEG


class ToCorrupt(NamedTuple):
    """A plain val image to corrupt on the fly, with the seed of its noise (the sample index)."""
    path: Path
    seed: int


def synsets() -> list[str]:
    """The 1000 WordNet ids in the standard class-index order."""
    return SYNSETS_FILE.read_text().split()


class ImageNet(Task):
    name = "imagenet"
    kind = "image"
    description = ("ImageNet-1k validation (folder per synset) on a torchvision model; ImageNet-C read from the "
                   "release or generated from val")
    options = {
        "model": HParam("resnet50", str, "torchvision classification model (tta-bench list models)"),
        "weights": HParam("IMAGENET1K_V1", str, "torchvision weights name, or none for random weights"),
        "data_dir": HParam(None, str, f"ImageNet val folder (or set ${DATA_ENV}), or an ImageNet-C release "
                           "folder (DIR/<corruption>/<severity>/<wnid>/*.JPEG)", nullable=True),
        "corruption": HParam("none", str, "ImageNet-C corruption: read from the release, or generated from val",
                             choices=CHOICES),
        "severity": HParam(3, int, "corruption severity 1..5", choices=SEVERITIES),
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
    def source(self) -> tuple[str, Path]:
        """(kind, folder of synset folders): kind is val (clean), release (ImageNet-C) or generated
        (val corrupted on the fly), chosen by what the data folder holds."""
        root = self.data_dir
        if self.opts.corruption == "none":
            return "val", root
        name, severity = canonical(self.opts.corruption), self.opts.severity
        for release in (root / name / str(severity), root / str(severity), root):  # also DIR = .../<c> or .../<c>/<s>
            if release.is_dir() and (release.parent.name, release.name) == (name, str(severity)):
                return "release", release
        if (root / name).is_dir():
            raise TTAError(f"ImageNet-C folder {root / name} has no severity folder {severity}; expected "
                           f"{root / name}/{severity}/<wnid>/*.JPEG")
        wnids = set(synsets())
        if any(p.is_dir() and p.name in wnids for p in root.iterdir()):
            return "generated", root
        raise TTAError(f"--data-dir {root} is neither an ImageNet-C release ({root}/{name}/{severity}/<wnid>/*.JPEG) "
                       f"nor ImageNet val to corrupt on the fly ({root}/<wnid>/*.JPEG)")

    @cached_property
    def files(self) -> list[tuple[Path, int]]:
        """(image, class index) in a fixed order: synsets in class order, files sorted by name."""
        index = {wnid: i for i, wnid in enumerate(synsets())}
        root = self.source[1]
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown and self.opts.corruption == "none" and set(unknown) <= set(CORRUPTIONS):
            raise TTAError(f"{root} looks like an ImageNet-C release (folders {', '.join(unknown[:3])}, ...): pass "
                           "--corruption NAME --severity 1..5, or --data-dir the clean validation folder")
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
        generated = self.source[0] == "generated"
        for i, (path, label) in enumerate(self.files):
            yield Sample(i, ToCorrupt(path, i) if generated else path, label)

    def num_samples(self) -> int:
        return len(self.files)

    def num_classes(self) -> int:
        return len(synsets())

    def collate(self, raws: list[Path | ToCorrupt]) -> Tensor:
        images = []
        for position, raw in enumerate(raws):
            path = raw.path if isinstance(raw, ToCorrupt) else raw
            try:
                with Image.open(path) as img:
                    images.append(self._preprocess(img.convert("RGB"), raw))
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # corrupt, truncated, …
                raise UnreadableSample(position, str(path), str(err) or type(err).__name__) from None
        return torch.stack(images)

    def _preprocess(self, img: Image.Image, raw: Path | ToCorrupt) -> Tensor:
        kind = self.source[0]
        if kind == "val":
            return self.transforms(img)
        if kind == "release":  # already resized, cropped and corrupted: only normalise
            if img.size != (C_SIZE, C_SIZE):
                raise ValueError(f"is {img.size[0]}x{img.size[1]} px; ImageNet-C images are {C_SIZE}x{C_SIZE}")
            return self._normalise(np.array(img))
        img = TF.center_crop(TF.resize(img, [C_RESIZE], interpolation=TF.InterpolationMode.BILINEAR), [C_SIZE])
        out = corruptions.corrupt_imagenet(np.array(img), canonical(self.opts.corruption), self.opts.severity, seed=raw.seed)
        return self._normalise(np.array(out, dtype=np.uint8))

    def _normalise(self, pixels: np.ndarray) -> Tensor:
        """uint8 [H, W, 3] -> float [3, H, W] normalised as the weights expect (no resize, no crop)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
        return TF.normalize(x, list(self.transforms.mean), list(self.transforms.std))

    def augmenter(self):
        mean, std = torch.tensor(self.transforms.mean), torch.tensor(self.transforms.std)
        return augmix_views(255.0 * std, 255.0 * mean)

    def data_identity(self) -> str:
        """A hash of the images' names and sizes under the data folder (reading 50,000 JPEGs on
        every resume would cost minutes; an edit that keeps a file's size goes unnoticed)."""
        root = self.source[1]
        listing = "\n".join(f"{f.relative_to(root)} {f.stat().st_size} {label}" for f, label in self.files)
        return hashlib.sha256(listing.encode()).hexdigest()

    def metadata(self) -> dict:
        kind, folder = self.source
        preprocessing = {
            "val": repr(self.transforms),
            "release": f"ImageNet-C {C_SIZE} px JPEG, only normalised (mean {self.transforms.mean}, "
                       f"std {self.transforms.std})",
            "generated": f"resize {C_RESIZE}, center crop {C_SIZE}, corrupt_imagenet(seed=sample index), "
                         f"normalised (mean {self.transforms.mean}, std {self.transforms.std})"}[kind]
        return {"model": self.opts.model, "weights": self.opts.weights, "data_dir": str(self.data_dir),
                "images_dir": str(folder), "n_images": len(self.files), "transforms": preprocessing,
                "corruption": self.opts.corruption, "severity": self.opts.severity,
                "corruption_source": {"val": "none", "release": "release", "generated": "generated"}[kind],
                "torchvision": torchvision.__version__}
