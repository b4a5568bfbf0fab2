"""What a task is: samples, a model, and how model outputs become class logits."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam, resolve


class Sample(NamedTuple):
    index: int
    raw: Any  # whatever `collate` turns into model inputs
    label: int
    extra: Any = None  # what only `Task.evaluate` sees, never the model inputs nor a method's loss


class UnreadableSample(TTAError):
    """Raised by `Task.collate` for a sample whose data cannot be read (e.g. a corrupt image):
    the run stops keeping what finished, or skips it with `skip_unreadable`."""

    def __init__(self, position: int, what: str, reason: str):
        super().__init__(f"cannot read {what}: {reason}")
        self.position, self.what, self.reason = position, what, reason  # position in collate's list


class Task:
    """Base class of every task. Subclasses set `name`, `kind`, `options` and implement
    `load_model`, `samples`, `collate` and (if outputs are not already class logits) `class_logits`.
    Options are validated on construction and read as `self.opts.<name>`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "image"  # image | text | mc
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, HParam]] = {}
    # Per-sample metrics `evaluate` returns (text: ("bpb",)); the runs record each at θ0 and
    # after adaptation (columns `<name>_source`, `<name>`). Tasks without any have no such columns.
    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any):
        self.config = resolve(f"task {self.name}", self.options, options)
        self.opts = SimpleNamespace(**self.config)

    @classmethod
    def models(cls) -> list[str]:
        """Model names this task can load (for `tta-bench list models`)."""
        return []

    def check(self) -> None:
        """Fail early, with a TTAError saying how to fix it, if data or weights are missing."""

    def load_model(self) -> nn.Module:
        raise NotImplementedError

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def num_classes(self) -> int | None:
        """The number of classes (the most of any sample where it varies), if known before the
        model loads: methods check their hyperparameters against it (e.g. n_focus < classes)."""
        return None

    def num_samples(self) -> int | None:
        """How many samples `samples()` yields, if known (for the progress bar)."""
        return None

    def collate(self, raws: list[Any]) -> Any:
        """Model inputs for a batch of raw samples."""
        return torch.stack(raws)

    def class_logits(self, model: nn.Module, inputs: Any) -> Tensor:
        """[B, C] class logits for a batch of inputs."""
        return model(inputs)

    def evaluate(self, model: nn.Module, inputs: Any, sample: Sample) -> tuple[Tensor, dict[str, float]]:
        """Class logits [C] of one sample's inputs (a batch of one) and its per-sample `metrics`,
        at the model's current weights (called without gradient, at θ0 and after adaptation).
        `sample` brings what the inputs must not carry (its label, `extra`): the methods' losses
        see the inputs only. Default: the class logits and no metrics."""
        return self.class_logits(model, inputs)[0], {}

    def data_space(self, progress: bool = True) -> Any:
        """What methods that fine-tune on selected data choose from (text: tta_bench.data.dataspace.DataSpace),
        built on first use after the model is loaded (`progress`: a bar while it builds); None if the
        task has none."""
        return None

    def data_identity(self) -> str | None:
        """A hash of this machine's copy of the data, where the options alone do not fix it (a
        corpus read from the machine, local files); a checkpoint records it, so a run never resumes
        on other data. None: the options fix the data (a shipped file, a hub dataset's id)."""
        return None

    def reference_samples(self) -> Iterator[Sample] | None:
        """Clean samples disjoint from every scored and validation sample, in a fixed order, for
        methods that estimate something at θ0 before the scan (EATA's Fisher); None: none."""
        return None

    def augmenter(self) -> Callable[[Any, int], Any] | None:
        """(inputs of one sample, n) -> n augmented views, if the task supports augmentation."""
        return None

    def metadata(self) -> dict[str, Any]:
        """Provenance recorded with every run (data and weights versions, hashes, ...)."""
        return {}


def select(inputs: Any, i: int) -> Any:
    """Sample i of a batch, keeping the batch dimension (tensors or dicts of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs[i:i + 1]
    if isinstance(inputs, dict):
        return {k: select(v, i) for k, v in inputs.items()}
    raise TypeError(f"cannot select from inputs of type {type(inputs).__name__}")


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs
