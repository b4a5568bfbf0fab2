"""`tta-bench` command line: run one configuration, list what is available."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

import torch

from .engine import OPTIMIZERS, PAPER_LR_GRID, Protocol
from .errors import TTAError
from .hparams import parse_assignments
from .registry import get_method, get_task, list_methods, list_tasks, method_class, task_class
from .runner import RunOptions, run

DEFAULT_TASK, DEFAULT_METHOD = "cifar10", "ifo"
LR_GRIDS = {"paper": PAPER_LR_GRID, "llm": PAPER_LR_GRID[9:14]}  # llm: 2.56e-3 … 4.10e-2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _optional(kind: type):
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or none, got {text!r}") from None
    return parse


def _task_options() -> dict[str, str]:
    """Every option any registered task declares -> its help (flags are shared across tasks)."""
    helps: dict[str, str] = {}
    tasks: dict[str, list[str]] = {}
    for name in list_tasks():
        for key, spec in task_class(name).options.items():
            helps.setdefault(key, spec.help)
            tasks.setdefault(key, []).append(name)
    return {key: f"{helps[key]} [{', '.join(tasks[key])}]".strip() for key in helps}


def build_parser() -> Parser:
    parser = Parser(prog="tta-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    r = sub.add_parser("run", help="run one method on one task", description=(
        "Apply a TTA method under the single-sample-reset protocol and summarise it."))
    r.add_argument("--method", default=DEFAULT_METHOD, help=f"method name (default {DEFAULT_METHOD})")
    r.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK}: embedded, offline)")
    r.add_argument("--hparam", "-H", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable or comma-separated (e.g. -H weighted=false)")
    lr = r.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=_floats, help="learning rate(s), comma-separated (default: the method's)")
    lr.add_argument("--lr-grid", choices=sorted(LR_GRIDS), help="paper: 5e-6·2^(j−1), j = 1..19; llm: its values 2.56e-3 … 4.10e-2 "
                    "(the paper's LLM range)")
    r.add_argument("--threshold", type=_optional(float), default=0.16,
                   help="adapt and score samples with Δ1,2 < threshold (default 0.16; none: all)")
    r.add_argument("--gate", choices=("delta", "none"), default="delta",
                   help="none: adapt and score every sample (same as --threshold none)")
    r.add_argument("--steps", type=int, default=1, help="gradient steps per sample (default 1)")
    r.add_argument("--clip", type=_optional(float), default=1.0, help="max gradient norm (default 1.0; none: off)")
    r.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    r.add_argument("--momentum", type=float, default=0.0)
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--limit", type=int, help="use only the first N samples")
    r.add_argument("--max-uncertain", type=int, help="stop after N uncertain samples")
    r.add_argument("--batch-size", type=int, help="batch size of the source forward and gate "
                   "(default: 1 on CPU, where it measured fastest per sample; 64 on CUDA)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--threads", type=int, help="CPU threads for torch (recorded)")
    r.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (faster, less exact; recorded)")
    r.add_argument("--out", type=Path, help="output folder (default runs/TASK-METHOD-TIME)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = r.add_argument_group("task options (each applies to the tasks named in its help)")
    for key, help_text in _task_options().items():
        group.add_argument(f"--{key.replace('_', '-')}", dest=f"task_{key}", default=None, help=help_text)

    ls = sub.add_parser("list", help="list methods, tasks or models")
    ls.add_argument("what", choices=("methods", "tasks", "models", "corpora", "datasets"))
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise TTAError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    method = get_method(args.method, **parse_assignments(args.hparam))
    task_opts = {k[5:]: v for k, v in vars(args).items() if k.startswith("task_") and v is not None}
    task = get_task(args.task, **task_opts)
    lrs = LR_GRIDS[args.lr_grid] if args.lr_grid else (args.lr or [method.default_lr])
    protocol = Protocol(lrs=tuple(lrs), threshold=None if args.gate == "none" else args.threshold,
                        steps=args.steps, clip=args.clip, optimizer=args.optimizer,
                        momentum=args.momentum, weight_decay=args.weight_decay)
    options = RunOptions(limit=args.limit, max_uncertain=args.max_uncertain, batch_size=args.batch_size,
                         seed=args.seed, device=args.device, tf32=args.tf32,
                         progress=not args.no_progress)
    out = args.out or Path("runs") / f"{task.name}-{method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_writable(out)
    result = run(task, method, protocol, options)
    result.save(out)
    print(f"{task.name} · {method!r} · {result.config['sweep']} sweep · d={protocol.threshold}")
    print(result.table())
    print(f"per-sample rows: {out / 'samples.parquet'}")
    if result.interrupted:
        print("interrupted: the rows above cover the samples finished before Ctrl-C", file=sys.stderr)
        return 130
    return 0


def _check_writable(out: Path) -> None:
    """Fail before any work if results could not be saved."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TTAError(f"cannot write to output folder {out}: {err.strerror}; pass --out DIR") from None


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for name in list_methods():
            cls = method_class(name)
            hp = " ".join(f"{k}={v.default}" for k, v in cls.hparams.items())
            print(f"{name:12} {cls.description}" + (f"  [{hp}]" if hp else ""))
    elif args.what == "tasks":
        for name in list_tasks():
            print(f"{name:12} {task_class(name).description}")
    elif args.what == "models":
        for name in list_tasks():
            print(f"{name}: {', '.join(task_class(name).models())}")
    else:  # corpora (text task) or datasets (mc task)
        print("\n".join(getattr(task_class("text" if args.what == "corpora" else "mc"), args.what)()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {"run": cmd_run, "list": cmd_list}[args.command](args)
    except TTAError as err:
        print(f"tta-bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
