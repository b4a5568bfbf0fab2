"""Per-sample adaptation of a block of samples at once, for accelerators (docs/DESIGN.md §6).

Per-sample gradients at θ0 come from `torch.func` (vmap over grad through functional_call), are
clipped per sample like `clip_grad_norm_`, and the adapted forward of every sample at every
learning rate runs as one vmapped call on θ0 − η·g_b. The maths is that of the one-gradient sweep
for each sample alone (one SGD step, no momentum or weight decay); only floating-point summation
order differs. On CPUs it is slower than one sample at a time (measured 0.3–0.6× on 11–16M-
parameter models), so runs use it on CUDA only, unless asked (`adapt_block`): the whole policy is `BlockPolicy`."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.method import ClassLogits, Method, Step
from tta_bench.core.protocol import Protocol
from tta_bench.core.task import Task
from tta_bench.engine.adapt import Adaptation

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def supports_blocks(method: Method, protocol: Protocol) -> str | None:
    """Why this combination cannot adapt in blocks (None: it can)."""
    if not protocol.plain_sgd:
        return "blocks need one plain SGD step (steps=1, sgd, no momentum or weight decay)"
    if method.remembers:
        return f"method {method.name} carries memory from sample to sample (stream order)"
    if not method.batchable:
        return f"method {method.name} is not batchable (its loss has data-dependent control flow)"
    return None


class _Loss(nn.Module):
    """The method's loss at the (swapped-in) weights for one sample; its logits as aux."""

    def __init__(self, model: nn.Module, method: Method, class_logits: ClassLogits):
        super().__init__()
        self.model, self.method, self.class_logits = model, method, class_logits

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        step = Step(self.model, x, self.class_logits)
        loss = self.method.loss(step)
        if loss is None:
            raise TTAError(f"method {self.method.name} declined a sample inside a block; mark it "
                           "batchable = False")
        return loss, step.logits.detach()


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, class_logits: ClassLogits):
        super().__init__()
        self.model, self.class_logits = model, class_logits

    def forward(self, x: Tensor) -> Tensor:
        return self.class_logits(self.model, x)[0]


class BlockAdapter:
    """Adapts blocks of samples (stacked inputs [B, ...]) for every learning rate at once."""

    def __init__(self, model: nn.Module, method: Method, class_logits: ClassLogits, protocol: Protocol,
                 param_names: list[str]):
        self.protocol = protocol
        self.loss_module = _Loss(model, method, class_logits)
        self.logits_module = _Logits(model, class_logits)
        adapted = set(param_names)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.theta0 = {f"model.{n}": t.detach() for n, t in state.items() if n in adapted}
        self.frozen = {f"model.{n}": t.detach() for n, t in state.items() if n not in adapted}

    def adapt(self, inputs: Tensor) -> list[Adaptation]:
        def loss_of(theta: dict, x: Tensor) -> tuple[Tensor, Tensor]:
            return functional_call(self.loss_module, {**theta, **self.frozen}, (x.unsqueeze(0),))

        def logits_of(theta: dict, x: Tensor) -> Tensor:
            return functional_call(self.logits_module, {**theta, **self.frozen}, (x.unsqueeze(0),))

        with torch.enable_grad():
            grads, (losses, _) = vmap(grad_and_value(loss_of, has_aux=True), in_dims=(None, 0))(self.theta0, inputs)
        b = inputs.shape[0]
        norms = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.reshape(b, -1), dim=1) for g in grads.values()], dim=1), dim=1)
        scale = torch.ones_like(norms)
        if self.protocol.clip is not None:
            scale = torch.clamp(self.protocol.clip / (norms + CLIP_EPS), max=1.0)
        finite = (torch.isfinite(losses) & torch.isfinite(norms)).tolist()
        out = [Adaptation(logits=[None] * len(self.protocol.lrs), loss=loss, grad_norm=norm, updated=ok,
                          nonfinite=not ok, forwards=1, backwards=1)
               for loss, norm, ok in zip(losses.tolist(), norms.tolist(), finite, strict=True)]
        with torch.no_grad():
            clipped = {n: g * _expand(scale, g) for n, g in grads.items()}  # once, for every lr
            for k, lr in enumerate(self.protocol.lrs):
                theta = {n: self.theta0[n] - lr * g for n, g in clipped.items()}
                logits = vmap(logits_of, in_dims=(0, 0))(theta, inputs)
                for i in range(b):
                    if out[i].updated:
                        out[i].logits[k] = logits[i]
                        out[i].forwards += 1
        return out


def _expand(scale: Tensor, like: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


PROBE_BLOCK = 8  # samples of the first block, whose measured memory sizes the later ones
MAX_BLOCK = 64  # H200: 64 → 256 gained ≤ 17 % (EfficientNet-Lite0), none for resnet50, at 4× the memory
BUDGET_SHARE = 0.7  # of the free device memory, when no --max-memory is given


class BlockSizer:
    """Block size from measured memory (CUDA). The first block (PROBE_BLOCK samples) is adapted
    while the peak of allocated memory is tracked; its rise per sample (per-sample gradients,
    adapted weights, activations of every pass, and fixed costs shared out, so an overestimate)
    sets the later blocks to as many samples as fit the budget, at most MAX_BLOCK. A parameter
    count alone cannot size a block: activations dominate for convolutional nets at 224 px."""

    def __init__(self, device: torch.device, budget: int | None = None):
        self.device = device
        self.budget = budget if budget is not None else int(torch.cuda.mem_get_info(device)[0] * BUDGET_SHARE)
        self.per_sample: float | None = None  # bytes, once measured
        self.base = 0  # bytes allocated before the probe (model, snapshot, …)

    def measure(self, adapt: Callable[[Tensor], list[Adaptation]], inputs: Tensor) -> tuple[list[Adaptation], int]:
        """Adapt the probe block; returns its adaptations and the block size for the rest."""
        torch.cuda.synchronize(self.device)
        self.base = base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = adapt(inputs)
        torch.cuda.synchronize(self.device)
        self.per_sample = max(1, torch.cuda.max_memory_allocated(self.device) - base) / len(inputs)
        return out, self.block()

    def block(self) -> int:
        assert self.per_sample is not None
        return max(1, min(MAX_BLOCK, int(self.budget // self.per_sample)))

    def record(self) -> dict:
        return {"budget_bytes": self.budget, "base_bytes": self.base, "probe_samples": PROBE_BLOCK,
                "bytes_per_sample": self.per_sample, "block": self.block() if self.per_sample else None}

    def describe(self) -> str:
        """How the block was sized, for run.json's `adaptation` ("" before the probe)."""
        if self.per_sample is None:
            return ""
        return (f"; sized from a first block of {PROBE_BLOCK}: {self.per_sample / 2**20:.1f} MiB per sample, "
                f"budget {self.budget / 2**30:.1f} GiB")


def why_no_blocks(method: Method, protocol: Protocol, task: Task) -> str | None:
    """Why a run of `method` on `task` cannot adapt in blocks (None: it can)."""
    if task.kind != "image":
        return f"blocks need tensor inputs of one shape (image tasks), not {task.kind} tasks"
    if task.metrics:
        return f"blocks do not compute the per-sample metrics of task {task.name} ({', '.join(task.metrics)})"
    return supports_blocks(method, protocol)


def adapt_in_blocks(blocks: BlockAdapter, inputs: Tensor, size: int, sizer: BlockSizer | None = None
                    ) -> tuple[list[Adaptation], int, int]:
    """Adapt `inputs` in blocks of `size`; a block that runs out of memory is halved and retried,
    down to one sample. A sizer that has not measured yet measures the first block and sets the
    size of the rest. Returns the adaptations, the block size that fitted and the halvings."""
    results: list[Adaptation] = []
    halvings = 0
    while len(results) < len(inputs):
        start, out_of_memory = len(results), False
        try:
            if sizer is not None and sizer.per_sample is None:
                done, size = sizer.measure(blocks.adapt, inputs[start:start + size])
                results += done
            else:
                results += blocks.adapt(inputs[start:start + size])
        except torch.OutOfMemoryError:
            if size == 1:
                raise TTAError("out of memory adapting a single sample; free GPU memory, use a smaller "
                               "model, --autocast bf16 or --device cpu") from None
            out_of_memory = True
        if out_of_memory:  # outside the handler, so the failed block's tensors are freed first
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size, halvings = max(1, size // 2), halvings + 1
            warnings.warn(f"out of memory in a block; retrying it in blocks of {size}")
    return results, size, halvings


class BlockPolicy:
    """How a run adapts its uncertain samples: one at a time, or in blocks (vmap). By default in
    blocks on CUDA (faster there), sized from measured memory, and one at a time on CPU (faster
    there); `adapt_block` fixes the block (1: one at a time). A block that runs out of memory is
    halved; an op vmap cannot batch makes the rest of the run adapt one at a time. An explicit
    adapt_block > 1 that cannot work is refused by the runner before any work (`why_no_blocks`)."""

    def __init__(self, adapts: bool, model: nn.Module, method: Method, task: Task, protocol: Protocol,
                 param_names: list[str], device: torch.device, adapt_block: int | None, max_memory: int | None):
        self.size, self.blocks, self.sizer = 1, None, None
        self.fallback = ""  # why blocks were given up, if they were
        self.halvings = 0  # after out-of-memory errors
        want = adapt_block
        if adapts and want is None and device.type == "cuda" and not why_no_blocks(method, protocol, task):
            want, self.sizer = PROBE_BLOCK, BlockSizer(device, max_memory)
        if adapts and want is not None and want > 1:
            self.size = want
            self.blocks = BlockAdapter(model, method, task.class_logits, protocol, param_names)
        self.first = self.size

    def adapt(self, inputs: list[Tensor]) -> list[Adaptation] | None:
        """The adaptations of the samples' `inputs` (each a batch of one), or None: adapt them one at a time."""
        if self.blocks is None:
            return None
        try:
            results, self.size, halved = adapt_in_blocks(self.blocks, torch.cat(inputs), self.size, self.sizer)
        except RuntimeError as err:  # an op vmap cannot batch: this model adapts one at a time
            self.fallback = first_line(err, 200)
            warnings.warn(f"adapting in blocks failed ({self.fallback}); adapting one sample at a time")
            self.blocks, self.size = None, 1
            return None
        self.halvings += halved
        return results

    def record(self) -> dict:
        """How the run adapted, for its configuration."""
        how = (f"blocks of {self.size} (torch.func.vmap{self.sizer.describe() if self.sizer else ''})" if self.blocks
               else f"one sample at a time (blocks failed: {self.fallback})" if self.fallback
               else "one sample at a time")
        if self.halvings:
            start = self.sizer.block() if self.sizer and self.sizer.per_sample else self.first
            how += f", halved from {start} after {self.halvings} out-of-memory error(s)"
        return {"adaptation": how, "out_of_memory_halvings": self.halvings,
                "block_memory": self.sizer.record() if self.sizer else None}
