"""What a method is: a loss, a parameter set and (rarely) its own update; the engine does the rest."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam, resolve
from tta_bench.core.settings import SETTINGS

if TYPE_CHECKING:
    from tta_bench.core.protocol import Protocol
    from tta_bench.core.task import Task
    from tta_bench.engine.adapt import Updater

ClassLogits = Callable[[nn.Module, Any], Tensor]  # (model, inputs) -> [B, C] class logits


class Source:
    """The source model's prediction for one sample (weights θ0, no gradient)."""

    def __init__(self, logits: Tensor):
        self.logits = logits.detach()

    @cached_property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits.float(), dim=-1)

    @cached_property
    def order(self) -> Tensor:
        """Class indices from most to least likely."""
        return torch.argsort(self.probs, descending=True, stable=True)

    def focus(self, n: int) -> Tensor:
        """The n most likely classes F."""
        return self.order[:n]

    @property
    def pred(self) -> int:
        return int(self.order[0])

    @property
    def delta(self) -> float:
        """Δ1,2 = p(1) − p(2)."""
        top = self.probs[self.order[:2]]
        return float(top[0] - top[1]) if top.numel() > 1 else 1.0

    @property
    def spread(self) -> float:
        """p(1) − p(C), the most likely class's lead over the least likely."""
        return float(self.probs.max() - self.probs.min())


Augment = Callable[[Any, int], Any]  # (inputs of one sample, n) -> inputs of n augmented views


class Step:
    """What a method's loss sees for one sample at the current weights: `logits`, `source`,
    and for methods that need more, `forward(inputs)`, `augment(n)`, the sample's `index` and the
    task's `data_space`."""

    def __init__(self, model: nn.Module, inputs: Any, class_logits: ClassLogits,
                 source: Source | None = None, count_forward: Callable[[int], None] = lambda n: None,
                 *, augmenter: Augment | None = None, index: int = 0, data_space: Any = None,
                 memory: Tensor | None = None, remember: Callable[[Tensor], None] = lambda value: None):
        self.model, self.inputs, self._source, self.index = model, inputs, source, index
        self._class_logits, self._count_forward, self._augmenter = class_logits, count_forward, augmenter
        self._data_space = data_space
        self.memory = memory  # what the samples before this one left (`Method.remembers`), or None
        self._remember = remember

    def remember(self, value: Tensor) -> None:
        """Propose the memory the next sample sees (`Method.remembers`). The engine keeps the
        sample's first proposal, made at θ0, and only once the sample is done: every learning rate
        and step of this sample sees the same `memory`."""
        self._remember(value.detach().clone())

    def forward(self, inputs: Any) -> Tensor:
        """[B, C] class logits of any inputs at the current weights, with gradient; counted as B
        forward passes (MEMO's B views cost B passes)."""
        logits = self._class_logits(self.model, inputs)
        self._count_forward(len(logits))
        return logits

    def count_forward(self, n: int = 1) -> None:
        """For a method that calls `step.model` itself: count that forward pass (of n inputs)."""
        self._count_forward(n)

    def augment(self, n: int) -> Any:
        """n augmented views of this sample's inputs (from the task; image tasks only)."""
        if self._augmenter is None:
            raise TTAError("this method needs augmented views of the input, and the task (or the "
                           "`augment` argument of tta_bench.adapt) provides none")
        return self._augmenter(self.inputs, n)

    @property
    def data_space(self) -> Any:
        """The task's data space (e.g. tta_bench.data.dataspace.DataSpace), for methods that select from it."""
        if self._data_space is None:
            raise TTAError("this method selects data from a data space, and the task provides none")
        return self._data_space

    @cached_property
    def source(self) -> Source:
        """The prediction at θ0: given for later steps, else taken from this step's logits."""
        return self._source if self._source is not None else Source(self.logits)

    @cached_property
    def logits(self) -> Tensor:
        """Class logits [C] at the current weights, with gradient (computed on first use)."""
        return self.forward(self.inputs)[0]


class Method:
    """Base class of every method. Subclasses set `name`, `hparams` and implement `loss`.

    `loss(step)` returns a scalar tensor, or None to leave the sample unadapted (its prediction
    stays the source prediction). `parameters(model)` selects what is adapted (default: all).
    Hyperparameters are validated on construction and read as `self.hp.<name>`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    hparams: ClassVar[dict[str, HParam]] = {}
    default_lr: ClassVar[float] = 1e-3
    default_optimizer: ClassVar[str] = SETTINGS["optimizer"].default  # when the run names none
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image", "text", "mc"})
    # Hyperparameters that change which samples are scored (PASLE's `gate`): variants that differ
    # in them are different methods on the leaderboard, not settings to tune (held-out selection).
    scoring_hparams: ClassVar[tuple[str, ...]] = ()
    adapts: ClassVar[bool] = True  # False for the source model `none`
    # State carried from sample to sample in stream order (EATA's moving average of predictions),
    # owned by the engine: each step reads what earlier samples left (`step.memory`, None at the
    # start) and proposes the next value (`step.remember`); the engine commits it after the sample,
    # checkpoints it with the rows and never resets it within a run. False: no state, every sample
    # starts from nothing, which is what the single-sample reset means for every other method.
    remembers: bool = False

    def __init__(self, **hparams: Any):
        self.config = resolve(f"method {self.name}", self.hparams, hparams)
        self.hp = SimpleNamespace(**self.config)
        self.resolved: dict[str, Any] = {}  # values fixed at run time (e.g. SAR's E0), recorded

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Named parameters this method adapts (default: all)."""
        return dict(model.named_parameters())

    def prepare(self, model: nn.Module, forward: Callable[[Any], Tensor], params: dict[str, nn.Parameter],
                protocol: Protocol, reference: Callable[[int, int], Iterable[Any]]) -> None:
        """Once per run at θ0, before any sample (EATA's Fisher information), with only `params`
        requiring gradients: `forward(inputs)` gives [B, C] class logits at the current weights,
        `reference(n, batch)` batches of model inputs of the task's first n reference samples
        (clean, never scored nor used for validation; a TTAError if the task has none). Leave the
        weights as they are. Default: nothing."""

    def loss(self, step: Step) -> Tensor | None:
        raise NotImplementedError(f"method {self.name} must implement loss(step)")

    def declines(self, step: Step) -> bool:
        """True to leave this sample unadapted on what its source prediction shows (e.g. too few
        classes for the method). Checked per sample, outside `loss`, so a batchable loss stays
        free of data-dependent control flow (blocks adapt image tasks, whose classes are fixed)."""
        return False

    def update(self, u: Updater) -> bool:
        """One step at the current weights; False if the method declines (no update).
        Override only when the update is not a plain gradient step on `loss` (e.g. SAR); end it
        with one `u.apply()` at θ0, or set `sweepable = False`."""
        step = u.step()
        if self.declines(step) or (loss := self.loss(step)) is None:
            return False
        u.backward(loss)
        u.apply()
        return True

    def step_inputs(self, step: Step) -> Sequence[Any]:
        """Override only for a method that adapts on other inputs than the sample (e.g. data
        retrieved for it): the inputs of its steps, in order. The engine then takes one step
        (`update`, with `loss` on a Step of that input) on each, with one optimizer, and predicts
        the sample. Called once per sample, without gradient; the time it takes is recorded."""
        raise NotImplementedError

    @property
    def selects(self) -> bool:
        """True for a method that steps on inputs it selects (it overrides `step_inputs`)."""
        return type(self).step_inputs is not Method.step_inputs

    # The loss is a pure tensor function of the step (no Python branching on values, no
    # data-dependent shapes): blocks of samples can then be adapted at once with torch.func.vmap.
    batchable: ClassVar[bool] = False

    # One update = one optimizer step at θ0 with a gradient that does not depend on the learning
    # rate (true of plain losses and of SAR): one update then serves a whole lr sweep.
    sweepable: ClassVar[bool] = True

    def adaptation_mode(self, model: nn.Module) -> AbstractContextManager:
        """Context for the adaptation and prediction forwards (default: none; Tent's
        norm_stats=sample uses it). The source forward and gate never run inside it."""
        return nullcontext()

    def gate_threshold(self, threshold: float | None) -> float | None:
        """The Δ1,2 threshold deciding which samples are adapted and scored, as recorded (default:
        the shared one; PASLE gate=own substitutes its own margin)."""
        return threshold

    def uncertain(self, delta: float, spread: float, threshold: float | None) -> bool:
        """Whether the engine adapts and scores a sample, from its source prediction (Δ1,2 and
        p(1) − p(C)) and the shared threshold d: by default Δ1,2 < d (every sample without a gate).
        A method with a selection of its own (PASLE gate=own) overrides it; the engine still
        owns the gate: it asks before any adaptation."""
        threshold = self.gate_threshold(threshold)
        return threshold is None or delta < threshold

    def supports(self, task: Task) -> None:
        """Raise TTAError if this method cannot run on `task` (checked before any work)."""
        if task.kind not in self.task_kinds:
            kinds = ", ".join(sorted(self.task_kinds))
            raise TTAError(f"method {self.name} does not support {task.kind} tasks such as "
                           f"{task.name} (it supports: {kinds})")

    def __repr__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.name}({args})" if args else self.name
