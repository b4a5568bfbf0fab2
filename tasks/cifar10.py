"""CIFAR-10 test set on EfficientNet-Lite0/1/2 with real ImageNet-1k weights (tasks/zoo.py): an
offline, naturally shifted domain (32 px photos upsampled to the model's resolution, 224/240/260
px). CIFAR class logit = log-sum-exp of the ImageNet logits of its group (see cifar10_groups.py).

Shifts: `corruption` generates CIFAR-10-C corruptions (tta_bench/data/corruptions.py) or, with `data_dir`,
reads the released CIFAR-10-C files (DIR/<corruption>.npy, DIR/labels.npy): then nothing is
generated."""
from __future__ import annotations

import hashlib
import zipfile
from functools import cache, cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Sample, Task
from tta_bench.data.augment import augmix_views
from tta_bench.data.cache import file_sha256
from tta_bench.data.corruptions import CHOICES, SEVERITIES, CorruptedSet, canonical

from . import zoo
from .cifar10_groups import CIFAR10_GROUPS

DATA_FILE = Path(__file__).parent / "data" / "cifar10-test.npz"
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


RELEASE_EXPECTED = ("a CIFAR-10-C release folder: DIR/<corruption>.npy uint8 [5·N, 32, 32, 3] (severities 1..5 "
                    "in blocks of N rows; N = 10,000 in the official release) and DIR/labels.npy integer [5·N] "
                    "in 0..9")


@cache
def load_release(folder: Path, name: str, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """All 5·N rows of a CIFAR-10-C (or CIFAR-100-C) release file, memory-mapped, and its labels.
    N comes from the length of labels.npy (10,000 in the official release, 50,000 rows)."""
    if not folder.is_dir():
        raise TTAError(f"--data-dir {folder} is not a folder; expected {RELEASE_EXPECTED}")
    files = {"images": folder / f"{name}.npy", "labels": folder / "labels.npy"}
    if missing := [p.name for p in files.values() if not p.is_file()]:
        raise TTAError(f"--data-dir {folder} has no {' or '.join(missing)}; expected {RELEASE_EXPECTED}")
    arrays = {}
    for key, path in files.items():
        try:
            arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            arrays[key] = f"cannot be read as .npy ({first_line(err)})"
        if not isinstance(arrays[key], np.ndarray):  # an .npz under a .npy name loads as an NpzFile
            reason = arrays[key] if isinstance(arrays[key], str) else "is an .npz archive, not an .npy array"
            raise TTAError(f"--data-dir: {path} {reason}; expected {RELEASE_EXPECTED}")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise TTAError(f"--data-dir: {files['images']} holds {images.dtype} {list(images.shape)}; "
                       f"expected {RELEASE_EXPECTED}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise TTAError(f"--data-dir: {files['labels']} holds {labels.dtype} {list(labels.shape)}; "
                       f"expected {RELEASE_EXPECTED}")
    if len(labels) != len(images):
        raise TTAError(f"--data-dir: {files['labels']} has {len(labels)} labels for the {len(images)} rows of "
                       f"{files['images'].name}; expected {RELEASE_EXPECTED}")
    if not len(images) or len(images) % len(SEVERITIES):
        raise TTAError(f"--data-dir: {files['images']} has {len(images)} rows, not 5 severities × N "
                       f"(50,000 in the official release); expected {RELEASE_EXPECTED}")
    labels = np.array(labels)  # small: read it whole
    if not ((0 <= labels) & (labels < n_classes)).all():
        raise TTAError(f"--data-dir: {files['labels']} has labels outside 0..{n_classes - 1}; "
                       f"expected {RELEASE_EXPECTED}")
    return images, labels


SUBSETS = ("test", "val", "all")
SUBSET_RULE = {"test": "first half (rounded up) of each class's test-set indices, in the set's order",
               "val": "second half of each class's test-set indices (disjoint from test)",
               "all": "every test-set index"}


def balanced_order(labels: np.ndarray, n_classes: int, subset: str = "all") -> np.ndarray:
    """Test-set indices interleaved by class (c0, c1, …, c9, c0, …), keeping the set's own order
    within a class: every prefix whose length is a multiple of n_classes is balanced. subset
    `test`: the first half (rounded up) of each class's images; `val`: the rest, disjoint from
    `test` whatever the limits (held out for choosing hyperparameters); `all`: every image."""
    per_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    if subset != "all":
        per_class = [ix[:(len(ix) + 1) // 2] if subset == "test" else ix[(len(ix) + 1) // 2:] for ix in per_class]
    depth = max(len(ix) for ix in per_class)
    order = [ix[j] for j in range(depth) for ix in per_class if j < len(ix)]
    return np.asarray(order, dtype=np.int64)


class Cifar10(Task):
    name = "cifar10"
    kind = "image"
    description = ("CIFAR-10 test set (10,000 real images) on EfficientNet-Lite0/1/2 (ImageNet-1k weights); "
                   "CIFAR-10-C generated or read from the release")
    options = {
        "model": HParam("efficientnet-lite0", str, "model to load (tta-bench list models)", choices=tuple(zoo.ZOO)),
        "data_file": HParam(None, str, "an .npz with `images` uint8 [N,32,32,3] and `labels`", nullable=True),
        "data_dir": HParam(None, str, "cifar10: a CIFAR-10-C release folder (<corruption>.npy, labels.npy), "
                           "read instead of generating; imagenet: an ImageNet val or ImageNet-C folder",
                           nullable=True),
        "corruption": HParam("none", str, "CIFAR-10-C / ImageNet-C corruption of every image: generated, or "
                             "read from the release in --data-dir", choices=CHOICES),
        "severity": HParam(3, int, "corruption severity 1..5", choices=SEVERITIES),
        "subset": HParam("test", str, "test: the first half of each class's images (scored); val: the other "
                         "half (held out to choose hyperparameters); all: every image", choices=SUBSETS),
    }
    classes = tuple(CIFAR10_GROUPS)

    @classmethod
    def models(cls) -> list[str]:
        return list(zoo.ZOO)

    @property
    def path(self) -> Path:
        """The clean images (.npz); with data_dir, the release file of the corruption."""
        if self.release is not None:
            return self.release
        return Path(self.opts.data_file) if self.opts.data_file else DATA_FILE

    @property
    def release(self) -> Path | None:
        """DIR/<corruption>.npy of a CIFAR-10-C release, when data_dir is given."""
        if self.opts.data_dir is None:
            return None
        if not self.opts.data_dir.strip():
            raise TTAError("--data-dir is empty; pass the folder of a CIFAR-10-C release "
                           "(<corruption>.npy, labels.npy)")
        folder = Path(self.opts.data_dir).expanduser()
        if self.opts.data_file:
            raise TTAError("pass --data-file (clean images in an .npz) or --data-dir (a CIFAR-10-C release), "
                           "not both")
        if self.opts.corruption == "none":
            raise TTAError(f"--data-dir {folder} is read as a CIFAR-10-C release (<corruption>.npy, labels.npy), "
                           "which has no clean images: pass --corruption NAME --severity 1..5, or --data-file "
                           "for clean images")
        return folder / f"{canonical(self.opts.corruption)}.npy"

    @cached_property
    def resolution(self) -> int:
        return zoo.resolution(self.opts.model)

    def data(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(images, labels of the N test images, first row of this severity in images)."""
        if self.release is None:
            images, labels = load_cifar10(self.path)
            return images, labels, 0
        images, labels = load_release(self.release.parent, self.release.stem, len(self.classes))
        n = len(labels) // len(SEVERITIES)
        start = (self.opts.severity - 1) * n
        return images, labels[start:start + n], start

    def check(self) -> None:
        self.data()
        zoo.check(self.opts.model)

    def data_identity(self) -> str | None:
        """The given data files' hashes (--data-file, or --data-dir's release file and labels); the
        shipped test set is fixed by the package."""
        if not (self.opts.data_file or self.opts.data_dir):
            return None
        files = [self.path] + ([self.release.parent / "labels.npy"] if self.release is not None else [])
        return " ".join(_sha256(f) for f in files)

    def load_model(self) -> nn.Module:
        return zoo.load(self.opts.model)

    def samples(self) -> Iterator[Sample]:
        images, labels, start = self.data()
        generated = self.opts.corruption != "none" and self.release is None
        order = self.order(labels)
        bounds = [0]
        while bounds[-1] < len(order):  # chunks of 32, 64, … 2048: a short run corrupts few images
            bounds.append(min(len(order), bounds[-1] + min(2048, 32 << (len(bounds) - 1))))
        corrupted = CorruptedSet(images, canonical(self.opts.corruption), self.opts.severity) if generated else None
        for chunk in (order[a:b] for a, b in zip(bounds, bounds[1:])):
            if corrupted is not None:  # cached on disk: corrupted once per (images, corruption, severity)
                block = corrupted.take(chunk)
            else:
                block = images[start + chunk]  # a copy: the release is memory-mapped
            for i, image in zip(chunk, block):
                yield Sample(int(i), torch.from_numpy(np.array(image)), int(labels[i]))

    def order(self, labels: np.ndarray) -> np.ndarray:
        """The indices this run scans, in order (`--limit N`: the first N)."""
        return balanced_order(labels, len(self.classes), self.opts.subset)

    def num_samples(self) -> int:
        return len(self.order(self.data()[1]))

    def reference_samples(self) -> Iterator[Sample]:
        """Clean images from the END of the val half, last first (class-balanced like every order
        here): disjoint from the test half always, and from a val run of --limit L while
        L + n <= 5,000 (a run here scores 500). With --data-dir, the clean shipped test set."""
        images, labels = load_cifar10(Path(self.opts.data_file) if self.opts.data_file else DATA_FILE)
        for i in balanced_order(labels, len(self.classes), "val")[::-1]:
            yield Sample(int(i), torch.from_numpy(np.array(images[i])), int(labels[i]))

    def num_classes(self) -> int:
        return len(self.classes)

    def collate(self, raws: list[Tensor]) -> Tensor:
        """uint8 HWC 32 px -> NCHW float at the model's resolution (bilinear), scaled (x − 127) / 128 as
        EfficientNet-Lite was trained."""
        x = torch.stack(raws).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (x - zoo.MEAN) / zoo.STD

    def class_logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        z = model(inputs)
        return torch.stack([z[:, list(g)].logsumexp(dim=-1) for g in CIFAR10_GROUPS.values()], dim=-1)

    def augmenter(self):
        return augmix_views(torch.tensor(zoo.STD), torch.tensor(zoo.MEAN))

    def metadata(self) -> dict:
        spec = zoo.ZOO[self.opts.model]
        meta = {"data_file": str(self.path), "data_sha256": _sha256(self.path),
                "classes": list(self.classes), "model": spec.name, "image_size": self.resolution,
                "groups": {k: list(v) for k, v in CIFAR10_GROUPS.items()},
                "weights": spec.weights, "weights_package": f"{spec.package}=={spec.version}",
                "imagenet_top1_reported": spec.top1,
                "corruption": self.opts.corruption, "severity": self.opts.severity,
                "subset": self.opts.subset, "subset_rule": SUBSET_RULE[self.opts.subset],
                "subset_indices_sha256": hashlib.sha256(self.order(self.data()[1]).tobytes()).hexdigest()}
        if self.release is not None:
            images, labels, start = self.data()
            meta |= {"corruption_source": "release", "release_name": self.release.stem,
                     "release_labels": str(self.release.parent / "labels.npy"),
                     "release_labels_sha256": _sha256(self.release.parent / "labels.npy"),
                     "release_rows": [start, start + len(labels)], "release_total_rows": len(images)}
        else:
            meta["corruption_source"] = "none" if self.opts.corruption == "none" else "generated"
        return meta


def _sha256(path: Path) -> str:
    """A data file's hash, computed once per version of the file (its size and mtime)."""
    stat = Path(path).stat()
    return _hashed(Path(path), stat.st_size, stat.st_mtime_ns)


@cache
def _hashed(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)
