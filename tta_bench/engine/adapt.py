"""The single-sample-reset protocol (docs/DESIGN.md §2): one place owns reset, gating, optimizer,
clipping, prediction, timing and recording for every method."""
from __future__ import annotations

import math
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError
from tta_bench.core.method import Augment, ClassLogits, Method, Source, Step
from tta_bench.core.protocol import Protocol
from tta_bench.core.settings import default

# (model, inputs of one sample) -> its class logits [C] and the task's per-sample metrics
# (the runner binds Task.evaluate to the sample being adapted)
Evaluate = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]


@dataclass
class Adaptation:
    """One sample's adaptation: adapted class logits per learning rate (None: not updated)."""

    logits: list[Tensor | None]
    metrics: list[dict[str, float] | None] | None = None  # per lr, from `evaluate` (None: not evaluated)
    loss: float = float("nan")  # the method's loss at θ0
    grad_norm: float = float("nan")  # before clipping
    updated: bool = False
    nonfinite: bool = False  # non-finite loss or gradient
    forwards: int = 0  # passes of one input (a batch of B views counts B)
    backwards: int = 0  # likewise: a backward through B inputs' forwards counts B
    graph_inputs: int = 0  # inputs forwarded with gradient since the last backward
    select_seconds: float = 0.0  # choosing the inputs to step on (methods with `step_inputs`)
    memory: Tensor | None = None  # the memory proposed for the next sample (`Method.remembers`)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = [None] * len(self.logits)


class Snapshot:
    """Copies of tensors that are restored in place, bit for bit (no deepcopy, no state dict)."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.live = list(tensors)
        self.saved = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


class Adapter:
    """Adapts one sample at a time on a shared model; θ0 is restored after every sample.

    Use as a context manager: on entry only the method's parameters require gradients, on exit
    the original flags and weights are back."""

    def __init__(self, model: nn.Module, method: Method, class_logits: ClassLogits, protocol: Protocol,
                 augmenter: Augment | None = None, evaluate: Evaluate | None = None, data_space: Any = None):
        self.model, self.method, self.class_logits, self.protocol = model, method, class_logits, protocol
        self.augmenter, self.evaluate = augmenter, evaluate  # evaluate: the prediction forward, if given
        self.data_space = data_space  # what methods that step on other data select from (Task.data_space)
        self.selects = method.selects
        protocol.check(method)
        named = method.parameters(model)
        if not named:
            raise TTAError(f"method {method.name} found no parameters to adapt in this model")
        self.param_names = list(named)
        self.params = list(named.values())
        self.snapshot = Snapshot(self.params + [b for b in model.buffers()])  # θ0: one copy, params first
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self.memory: Tensor | None = None  # what the samples so far left (`Method.remembers`), in stream order

    def __enter__(self) -> Adapter:
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        adapt = {id(p) for p in self.params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in adapt)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.snapshot.restore()
        for p, flag in self._flags:
            p.requires_grad_(flag)
            p.grad = None

    @property
    def one_gradient(self) -> bool:
        return self.protocol.one_gradient and self.method.sweepable and not self.selects

    def adapt(self, inputs: Any, index: int = 0) -> Adaptation:
        """Adapt on `inputs` (batch of one; `index` identifies the sample, e.g. to seed its
        augmentations) for every learning rate; restores θ0 afterwards."""
        try:
            with torch.enable_grad(), self.method.adaptation_mode(self.model):
                out = self._sweep(inputs, index) if self.one_gradient else self._per_lr(inputs, index)
        finally:
            for p in self.params:
                p.grad = None
            self.snapshot.restore()
        if self.method.remembers and out.memory is not None:  # committed once the sample is done
            self.memory = out.memory
        return out

    def _forward(self, inputs: Any) -> tuple[Tensor, dict[str, float] | None]:
        """The prediction: class logits [C] at the current weights, and the task's per-sample
        metrics when the adapter was given `evaluate`."""
        with torch.no_grad():
            if self.evaluate is not None:
                return self.evaluate(self.model, inputs)
            return self.class_logits(self.model, inputs)[0], None

    def _backward(self, loss: Tensor) -> float:
        """Gradient of `loss` into .grad, clipped like torch.nn.utils.clip_grad_norm_."""
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.protocol.clip is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))
        return float(torch.nn.utils.clip_grad_norm_(grads, self.protocol.clip))

    def _sweep(self, inputs: Any, index: int) -> Adaptation:
        """The method's update runs once and its step is captured instead of applied; then for
        each η the optimizer's first step from θ0 with the captured gradient, and a forward (plain
        SGD: θ0 − η·g in one pass). Bitwise what a separate run per η computes."""
        lrs = self.protocol.lrs
        out = Adaptation(logits=[None] * len(lrs))
        u = Updater(self, inputs, index, None, None, out)
        try:
            if not self.method.update(u):
                return out
        except Diverged:
            out.nonfinite = True
            return out
        if u.applied != 1:
            raise RuntimeError(f"method {self.method.name} applied {u.applied} steps in one update; "
                               "set `sweepable = False` on it")
        out.updated = True
        pairs = [(p, s) for p, s in zip(self.params, self.snapshot.saved[:len(self.params)], strict=True)
                 if p.grad is not None]
        live, saved = [p for p, _ in pairs], [s for _, s in pairs]
        grads = [p.grad for p in live]
        plain = self.protocol.plain_sgd
        with torch.no_grad():
            for k, lr in enumerate(lrs):
                if plain:
                    for p, s, g in zip(live, saved, grads, strict=True):  # p = θ0 − η·g in one pass,
                        torch.add(s, g, alpha=-lr, out=p)  # bitwise what SGD's step computes
                else:  # a fresh optimizer's first step from θ0 (its state is built from g alone)
                    if k:
                        torch._foreach_copy_(live, saved)
                    for p, g in zip(live, grads, strict=True):
                        p.grad = g
                    self.protocol.make_optimizer(live, lr).step()
                out.logits[k], out.metrics[k] = self._forward(inputs)
                out.forwards += 1
        return out

    def _per_lr(self, inputs: Any, index: int) -> Adaptation:
        """A full adaptation per learning rate (T steps, momentum, Adam, weight decay, a method's
        own update such as SAR's, or one step on each input the method selects for the sample)."""
        lrs = self.protocol.lrs
        out = Adaptation(logits=[None] * len(lrs))
        selected = self._select(inputs, index, out)
        source: Source | None = None
        for k, lr in enumerate(lrs):
            if k:
                self.snapshot.restore()
            optimizer = self.protocol.make_optimizer(self.params, lr)
            u = Updater(self, inputs, index, optimizer, source, out)
            updaters = ([u] * self.protocol.steps if selected is None else  # the steps on the sample,
                        [Updater(self, x, index, optimizer, None, out) for x in selected])  # or on others
            diverged = False
            try:
                for step_updater in updaters:
                    if not self.method.update(step_updater):
                        break
                    out.updated = True
            except Diverged:
                diverged = True
            source = u.source if selected is None else None
            if k == 0 and not out.updated:  # declined or non-finite at θ0: so for every lr
                out.nonfinite = diverged
                return out
            if diverged:  # a later step of this lr blew up: only this lr counts as non-finite
                logits = source.logits if source is not None else self._forward(inputs)[0]
                out.logits[k] = torch.full_like(logits, float("nan"))
            else:
                out.logits[k], out.metrics[k] = self._forward(inputs)
                out.forwards += 1
        return out

    def _select(self, inputs: Any, index: int, out: Adaptation) -> list[Any] | None:
        """The inputs the method steps on instead of the sample (once per sample, timed), or None."""
        if not self.selects:
            return None
        t0 = perf_counter()
        step = Updater(self, inputs, index, None, None, out).step()
        with torch.no_grad():
            selected = list(self.method.step_inputs(step))
        out.select_seconds = perf_counter() - t0
        return selected


class Diverged(Exception):
    """A non-finite loss or gradient norm during an update."""


class Updater:
    """What a method's `update` works with for one sample and learning rate: steps at the current
    weights, the engine's backward (with clipping) and its optimizer step."""

    def __init__(self, adapter: Adapter, inputs: Any, index: int, optimizer: torch.optim.Optimizer | None,
                 source: Source | None, out: Adaptation):
        self.adapter, self.inputs, self.index, self.optimizer, self.out = adapter, inputs, index, optimizer, out
        self.applied = 0  # optimizer steps taken (captured, in the one-gradient sweep)
        self._source = source
        self._first: Step | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return self.adapter.params

    @property
    def source(self) -> Source | None:
        """The θ0 prediction (from the first step's forward unless given)."""
        if self._source is None and self._first is not None:
            self._source = self._first.source
        return self._source

    def step(self) -> Step:
        """A fresh view of the sample at the current weights (its forward runs on first use)."""
        out = self.out  # not `self`: a Step must not hold its Updater (a cycle would keep the
        def count(n: int) -> None:  # optimizer's state, e.g. Adam's moments, alive until a full gc)
            out.forwards += n
            out.graph_inputs += n
        def remember(value: Tensor) -> None:  # the sample's first proposal, made at θ0, is kept
            if out.memory is None:
                out.memory = value
        a = self.adapter
        memory = a.memory if a.method.remembers else None
        step = Step(a.model, self.inputs, a.class_logits, self.source, count, augmenter=a.augmenter,
                    index=self.index, data_space=a.data_space, memory=memory, remember=remember)
        self._first = self._first or step
        return step

    def backward(self, loss: Tensor) -> float:
        """Gradients of `loss` into `.grad` of the adapted parameters, clipped; the norm before
        clipping. Raises Diverged (caught by the engine) if the loss or the norm is not finite."""
        value = float(loss.detach())
        if not math.isfinite(value):
            self._record(value, float("nan"))
            raise Diverged
        norm = self.adapter._backward(loss)
        self._record(value, norm)
        self.out.backwards += max(1, self.out.graph_inputs)
        self.out.graph_inputs = 0
        if not math.isfinite(norm):
            raise Diverged
        return norm

    def apply(self) -> None:
        """The optimizer step (SGD by default) with the current `.grad`; in the one-gradient
        sweep the gradient is kept and the engine applies θ0 − η·g for every η itself."""
        self.applied += 1
        if self.optimizer is not None:
            self.optimizer.step()

    def _record(self, loss: float, norm: float) -> None:
        if self.out.backwards == 0:  # the first backward: the loss at θ0
            self.out.loss, self.out.grad_norm = loss, norm


@dataclass
class AdaptResult:
    """Result of `tta_bench.adapt` for one sample."""

    source_logits: Tensor  # [C]
    adapted_logits: Tensor  # [C]; equal to source_logits when not updated
    uncertain: bool
    updated: bool
    loss: float = float("nan")
    nonfinite: bool = False


def adapt(model: nn.Module, inputs: Any, method: Method | str, *, threshold: float | None = default("threshold"),
          steps: int = default("steps"), clip: float | None = default("clip"), lr: float | None = None,
          optimizer: str = default("optimizer"), momentum: float = default("momentum"),
          weight_decay: float = default("weight_decay"), augment: Augment | None = None) -> AdaptResult:
    """Apply the protocol to one sample: gate, adapt, predict, reset (model bit-identical after).

    `model(inputs)` must return logits of shape [1, C]; the model runs in eval mode.
    `augment(inputs, n)` gives n augmented views, for methods that need them (MEMO)."""
    from tta_bench.core.registry import get_method

    method = get_method(method) if isinstance(method, str) else method
    protocol = Protocol(lrs=(lr if lr is not None else method.default_lr,), threshold=threshold,
                        steps=steps, clip=clip, optimizer=optimizer, momentum=momentum,
                        weight_decay=weight_decay)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = model(inputs)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != 1:
            raise TTAError(f"model(inputs) must return logits of shape [1, C], got "
                           f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        source = Source(z[0])
        uncertain = method.uncertain(source.delta, source.spread, threshold)
        if not (uncertain and method.adapts):
            return AdaptResult(z[0], z[0], uncertain, False)
        with Adapter(model, method, lambda m, x: m(x), protocol, augment) as adapter:
            out = adapter.adapt(inputs)
        adapted = out.logits[0]
        return AdaptResult(z[0], adapted if adapted is not None else z[0], True, out.updated,
                           out.loss, out.nonfinite)
    finally:
        model.train(was_training)
