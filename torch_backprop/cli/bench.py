"""``torch-backprop bench``: time a training step of BackpropMLP against native autograd and its floor.

For each case of a grid (widths, batch, activation, dtype) it times one training step (zero the
gradients, forward, loss, backward) of six contenders, interleaved and repeated because shared
machines are noisy (:mod:`torch_backprop.cli.timing`):

    manual     BackpropMLP, whose backward is the slides' δ recursion (slides 8-10)
    fused      BackpropMLP.loss: forward phase, loss and backward phase in one autograd node, the
               recursion started from the slides' BP1, δ^(L) = Q' ⊙ σ'_L (:mod:`torch_backprop.core.losses`)
    native     its twin ``nn.Sequential`` (``BackpropMLP.to_sequential``) under plain autograd
    compiled   the twin under ``torch.compile`` (compiled and warmed up first; compile time excluded)
    floor      the matrix multiplies alone that any exact backprop does: per layer the forward
               product h^(l) W^(l), the weight-gradient product h^(l)ᵀ δ^(l+1) (BP3) and, except for the
               first layer, the input-gradient product δ^(l+1) W^(l)ᵀ (BP2)
    recompute  BackpropMLP(recompute=True), which keeps only its input and reruns the forward in backward

The whole grid is built first; then each round measures every case, and within a case every
contender once, in a rotated order, so a case's rounds spread over the whole run; a case reports
the median of its rounds' medians. Memory is the bytes the forward saves for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` over unique storages, and on CUDA the peak of
``torch.cuda.max_memory_allocated`` during one step.

The loss is cross-entropy for classification-shaped outputs (width > 1) and mean squared error for
width-1 outputs. The per-sample / DP-SGD clipping benchmark is ``benchmarks/per_sample.py``.

The file reads top-down: the grid (cases, settings), the contenders and the measuring, then the
command (its options, :func:`run`), which prints the report as a table
(:mod:`torch_backprop.cli.bench_report`). The command prints times and ratios only; checking them
against a project's thresholds is ``benchmarks/check_threshold.py``'s job, on the JSON that
``--json`` writes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import benchmark

from ..core.activations import available_activations
from ..core.module import BackpropMLP
from .bench_report import format_table, impossible_ratios, plot_ratios
from .files import write_json
from .options import module_available, number, output_file, parse_widths, select_device
from .timing import TIMERS, machine_info, make_timer, measure_round, threads

__all__ = [
    "CONTENDERS",
    "DEFAULT_SHAPES",
    "DTYPES",
    "QUICK_SHAPES",
    "RATIOS",
    "Case",
    "Settings",
    "add_arguments",
    "fused_step",
    "matmul_floor",
    "measure_grid",
    "parse_cases",
    "run",
    "run_benchmark",
    "saved_bytes",
    "settings_from_args",
    "training_step",
]

CONTENDERS = ("manual", "fused", "native", "compiled", "floor", "recompute")

# (numerator, denominator) of each reported ratio; all are step-time ratios.
RATIOS = {
    "manual/native": ("manual", "native"),
    "manual/compiled": ("manual", "compiled"),
    "fused/native": ("fused", "native"),
    "fused/compiled": ("fused", "compiled"),
    "floor/manual": ("floor", "manual"),
    "recompute/manual": ("recompute", "manual"),
}

# The default grid: (widths, batch).
DEFAULT_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((784, 256, 10), 64),
    ((784, 256, 10), 512),
    ((784, 512, 512, 10), 256),
    ((1024, 1024, 1024, 1024), 1024),
    ((32, 64, 64, 64, 64, 1), 128),
    ((8, 16, 16, 1), 32),
)
QUICK_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((8, 16, 16, 1), 32),
    ((32, 64, 64, 64, 64, 1), 128),
)
DEFAULT_ACTIVATIONS = ("relu", "tanh", "gelu")
# On CUDA the grid also runs at this many times each batch ("larger batches").
CUDA_BATCH_FACTOR = 8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PLOT_INSTALL = "pip install 'torch-backprop[plot]'"


@dataclass(frozen=True)
class Case:
    """One benchmark case: a BackpropMLP of ``sizes`` with hidden ``activation``, a batch, a dtype."""

    sizes: tuple[int, ...]
    batch: int
    activation: str = "relu"
    dtype: str = "float32"

    @property
    def shape_name(self) -> str:
        """``"784-256-10@64"``."""
        return f"{'-'.join(map(str, self.sizes))}@{self.batch}"

    @property
    def name(self) -> str:
        """``"784-256-10@64 relu float32"``."""
        return f"{self.shape_name} {self.activation} {self.dtype}"

    @property
    def loss(self) -> str:
        """``"mse"`` for width-1 outputs, ``"cross_entropy"`` otherwise."""
        return "mse" if self.sizes[-1] == 1 else "cross_entropy"

    def data(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """A random input batch and a target for :attr:`loss` (values for MSE, else class labels)."""
        x = torch.randn(self.batch, self.sizes[0], device=device, dtype=dtype)
        if self.loss == "mse":
            return x, torch.randn(self.batch, 1, device=device, dtype=dtype)
        return x, torch.randint(self.sizes[-1], (self.batch,), device=device)


@dataclass
class Settings:
    """What to run and how long to measure.

    Attributes:
        shapes: ``(sizes, batch)`` pairs; crossed with ``activations`` and ``dtypes``.
        activations: hidden activations, by registry name.
        dtypes: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
        threads: intra-op threads for every measurement.
        rounds: measurements of each contender per case; the case reports their median.
        min_run_time: seconds per ``blocked_autorange`` measurement.
        timer: ``"wall"`` (default; synchronises CUDA) or ``"cpu"``: the process's CPU time over all
            its threads (``time.process_time``), which other processes on a shared CPU machine
            stretch far less than wall time (CPU devices only).
        compile: time the ``torch.compile`` contender.
        larger_batches: on CUDA, also run each shape at ``CUDA_BATCH_FACTOR`` times its batch.
        seed: seed of the parameters and data.
    """

    shapes: Sequence[tuple[tuple[int, ...], int]] = DEFAULT_SHAPES
    activations: Sequence[str] = DEFAULT_ACTIVATIONS
    dtypes: Sequence[str] = ("float32",)
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)
    rounds: int = 5
    min_run_time: float = 0.2
    timer: str = "wall"
    compile: bool = True
    larger_batches: bool = True
    seed: int = 0

    def cases(self) -> list[Case]:
        """The grid, shape-major (so a shape's activations run back to back)."""
        shapes = list(self.shapes)
        if self.larger_batches and torch.device(self.device).type == "cuda":
            shapes += [(sizes, batch * CUDA_BATCH_FACTOR) for sizes, batch in self.shapes]
        return [
            Case(tuple(sizes), batch, activation, dtype)
            for sizes, batch in shapes
            for dtype in self.dtypes
            for activation in self.activations
        ]


# ---------------------------------------------------------------------------------------------
# Measuring


def saved_bytes(forward: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the unique storages that ``forward()`` saves for backward.

    Every tensor autograd saves (``save_for_backward`` in custom Functions included) passes through
    ``torch.autograd.graph.saved_tensors_hooks``; tensors sharing a storage (views, a ReLU output
    saved by the ReLU and by the next Linear) count once, at their storage's full size.

    Args:
        forward: runs the forward pass (with grad enabled); its result is discarded.
        exclude: tensors whose storages are not counted (e.g. the parameters, to count only
            activations).

    Returns:
        The total ``untyped_storage().nbytes()`` over distinct storages.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    del result
    return sum(storages.values())


def matmul_floor(
    sizes: Sequence[int], batch: int, dtype: torch.dtype, device: torch.device | str
) -> Callable[[], None]:
    """One step's matrix multiplies alone, on tensors of the step's shapes (drawn here).

    Per layer l: the forward product h^(l) W^(l), the weight gradient h^(l)ᵀ δ^(l+1) (BP3) and,
    for l > 0, the input gradient δ^(l+1) W^(l)ᵀ (BP2), in nn.Linear's layout.
    """
    factory: dict[str, Any] = {"dtype": dtype, "device": device}
    weights = [torch.randn(n_out, n_in, **factory) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]
    h = [torch.randn(batch, n, **factory) for n in sizes[:-1]]
    delta = [torch.randn(batch, n, **factory) for n in sizes[1:]]

    def step() -> None:
        for k, weight in enumerate(weights):
            h[k].mm(weight.t())  # z^(k+1), (N, n_{k+1})
            delta[k].t().mm(h[k])  # BP3, (n_{k+1}, n_k)
            if k > 0:
                delta[k].mm(weight)  # BP2, (N, n_k)

    return step


def training_step(
    model: Callable[[Tensor], Tensor], parameters: Sequence[Tensor], x: Tensor, target: Tensor, loss: str
) -> Callable[[], None]:
    """One training step: gradients set to None, forward, ``loss`` ("mse" or "cross_entropy"), backward."""
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy

    def step() -> None:
        for p in parameters:
            p.grad = None
        loss_fn(model(x), target).backward()

    return step


def fused_step(model: BackpropMLP, x: Tensor, target: Tensor, loss: str) -> Callable[[], None]:
    """One training step with the loss inside the stack: ``model.loss(x, target, loss).backward()``."""
    parameters = list(model.parameters())

    def step() -> None:
        for p in parameters:
            p.grad = None
        model.loss(x, target, loss).backward()

    return step


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory above the resting level during one ``step()``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resting = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - resting


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


@dataclass
class _Prepared:
    """One case, built and warmed up: its models, data and step callables."""

    case: Case
    models: dict[str, torch.nn.Module]
    x: Tensor
    steps: dict[str, Callable[[], None]]
    timers: dict[str, benchmark.Timer]
    compile_s: float | None
    compile_error: str | None
    rounds_s: dict[str, list[float]] = field(default_factory=dict)


def _prepare(case: Case, settings: Settings, log: Callable[[str], None]) -> _Prepared:
    device = torch.device(settings.device)
    dtype = DTYPES[case.dtype]
    torch.manual_seed(settings.seed)
    manual = BackpropMLP(case.sizes, activation=case.activation, device=device, dtype=dtype)
    recompute = copy.deepcopy(manual)
    fused = copy.deepcopy(manual)
    recompute.recompute = True
    native = manual.to_sequential()
    x, target = case.data(device, dtype)

    steps: dict[str, Callable[[], None]] = {
        "manual": training_step(manual, list(manual.parameters()), x, target, case.loss),
        "fused": fused_step(fused, x, target, case.loss),
        "native": training_step(native, list(native.parameters()), x, target, case.loss),
        "floor": matmul_floor(case.sizes, case.batch, dtype, device),
        "recompute": training_step(recompute, list(recompute.parameters()), x, target, case.loss),
    }
    compile_s, compile_error = None, None
    if settings.compile:
        twin = manual.to_sequential()
        compiled = torch.compile(twin, dynamic=False)
        step = training_step(compiled, list(twin.parameters()), x, target, case.loss)
        start = time.perf_counter()
        try:
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
            steps["compiled"] = step
        except Exception as error:  # noqa: BLE001 - any backend failure leaves the contender out
            compile_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            log(f"  torch.compile failed, leaving it out: {compile_error}")
    for step in steps.values():  # warm-up (allocator, thread pool, lazy init)
        for _ in range(2):
            step()
    steps = {name: steps[name] for name in CONTENDERS if name in steps}
    timers = {
        name: make_timer(
            step, threads=settings.threads, timer=settings.timer, label=case.name, description=name
        )
        for name, step in steps.items()
    }
    models = {"manual": manual, "native": native, "recompute": recompute}
    return _Prepared(case, models, x, steps, timers, compile_s, compile_error, {name: [] for name in steps})


def _record(prepared: _Prepared, device: torch.device) -> dict[str, Any]:
    """The case's JSON record: shape, medians, per-round medians, ratios and memory."""
    case, x, models, steps = prepared.case, prepared.x, prepared.models, prepared.steps
    medians = {
        name: statistics.median(prepared.rounds_s[name]) if prepared.rounds_s.get(name) else None
        for name in CONTENDERS
    }
    ratios = {key: _ratio(medians[a], medians[b]) for key, (a, b) in RATIOS.items()}
    # The same ratios taken within each round (contenders measured back to back), then the median:
    # a cross-check that load drifting between rounds did not tilt the ratios of medians.
    rounds = prepared.rounds_s
    paired = {
        key: statistics.median(x / y for x, y in zip(rounds[a], rounds[b], strict=True))
        if a in rounds and b in rounds
        else None
        for key, (a, b) in RATIOS.items()
    }
    saved = {name: saved_bytes(lambda m=m: m(x)) for name, m in models.items()}
    saved_activations = {
        name: saved_bytes(lambda m=m: m(x), exclude=m.parameters()) for name, m in models.items()
    }
    peak = None
    if device.type == "cuda":
        peak = {name: _peak_bytes(steps[name], device) for name in ("manual", "native", "recompute")}
        if "compiled" in steps:
            peak["compiled"] = _peak_bytes(steps["compiled"], device)
    return {
        "name": case.name,
        "sizes": list(case.sizes),
        "batch": case.batch,
        "activation": case.activation,
        "dtype": case.dtype,
        "loss": case.loss,
        "median_s": medians,
        "rounds_s": prepared.rounds_s,
        "ratios": ratios,
        "paired_ratios": paired,
        "input_bytes": x.numel() * x.element_size(),
        "saved_bytes": saved,
        "saved_activation_bytes": saved_activations,
        "peak_bytes": peak,
        "compile_s": prepared.compile_s,
        "compile_error": prepared.compile_error,
    }


def measure_grid(
    cases: Sequence[Case], settings: Settings, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    """Time, and count the saved bytes of, the six contenders on every case.

    Every case is built (and compiled) first; then each round measures every case once, so that a
    case's rounds spread over the whole run and a burst of load from other processes touches only
    a few of them (the median discards those).

    Returns:
        One JSON record per case (see :func:`run_benchmark`).
    """
    device = torch.device(settings.device)
    # Every compiled twin is an nn.Sequential, and dynamo caches per code object: let it hold one
    # entry per case instead of falling back to eager (silently) after the default 8.
    limits = {"recompile_limit": len(cases) + 8, "accumulated_recompile_limit": 64 * (len(cases) + 8)}
    if settings.compile:
        torch._dynamo.reset()
    with torch._dynamo.config.patch(**limits):
        prepared = []
        for i, case in enumerate(cases, 1):
            log(f"[{i}/{len(cases)}] building {case.name}")
            prepared.append(_prepare(case, settings, log))
        for r in range(settings.rounds):
            log(f"round {r + 1}/{settings.rounds}")
            for p in prepared:
                measure_round(p.timers, r, settings.min_run_time, p.rounds_s)
        return [_record(p, device) for p in prepared]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_benchmark(
    settings: Settings,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the grid and return the report (JSON-serialisable).

    Args:
        settings: what to run.
        log: receives one line of progress per case.

    Returns:
        ``{"machine", "settings", "cases", "summary"}``; ``summary`` holds the grid
        median of each ratio.
    """
    machine = machine_info(settings.device, settings.threads)
    with threads(settings.threads):
        cases = measure_grid(settings.cases(), settings, log)
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_end"] = list(os.getloadavg())
    summary = {
        "median_ratios": {
            key: _median([c["ratios"][key] for c in cases if c["ratios"][key] is not None]) for key in RATIOS
        },
    }
    return {
        "machine": machine,
        "settings": {
            "shapes": [[list(sizes), batch] for sizes, batch in settings.shapes],
            "activations": list(settings.activations),
            "dtypes": list(settings.dtypes),
            "device": settings.device,
            "threads": settings.threads,
            "rounds": settings.rounds,
            "min_run_time": settings.min_run_time,
            "timer": settings.timer,
            "compile": settings.compile,
            "larger_batches": settings.larger_batches,
            "seed": settings.seed,
        },
        "cases": cases,
        "summary": summary,
    }


def parse_cases(text: str) -> list[tuple[tuple[int, ...], int]]:
    """``"784,256,10@64 8,16,16,1@32"`` -> ``[((784, 256, 10), 64), ((8, 16, 16, 1), 32)]``.

    Widths are written as every command writes them (:func:`~torch_backprop.cli.options.parse_widths`:
    ``784,256,10``, or ``784-256-10``), each case's batch after ``@``; cases are separated by spaces
    or commas, so the older ``"784-256-10@64,8-16-16-1@32"`` reads the same.

    Raises:
        ValueError: an entry that is not ``WIDTHS@BATCH`` with two or more positive widths and a
            positive batch.
    """
    example = "784,256,10@64"
    pieces = text.split("@")
    if len(pieces) < 2:
        raise ValueError(f"expected cases WIDTHS@BATCH such as {example}, got {text!r}")
    widths, batches = [pieces[0]], []
    for middle in pieces[1:-1]:  # "BATCH,WIDTHS" or "BATCH WIDTHS": one case's batch, the next one's widths
        match = re.fullmatch(r"\s*(\S+?)\s*(?:,\s*|\s+)(.*)", middle, flags=re.S)
        if match is None:
            raise ValueError(f"expected cases WIDTHS@BATCH such as {example}, got {text!r}")
        batches.append(match[1])
        widths.append(match[2])
    batches.append(pieces[-1])
    shapes = []
    for width_text, batch_text in zip(widths, batches, strict=True):
        entry = f"{width_text.strip()}@{batch_text.strip()}"
        try:
            sizes = tuple(parse_widths(width_text, what="widths", example="784,256,10", at_least=2))
        except argparse.ArgumentTypeError:
            raise ValueError(
                f"expected each case's widths as two or more positive integers, such as {example}, "
                f"got {entry!r}"
            ) from None
        try:
            batch = int(batch_text)
        except ValueError:
            batch = 0
        if batch <= 0:
            raise ValueError(f"expected a positive batch after @, such as {example}, got {entry!r}")
        shapes.append((sizes, batch))
    return shapes


# ---------------------------------------------------------------------------------------------
# The command

EPILOG = """\
contenders (one column of times each; a step is: zero the gradients, forward, loss, backward):
  manual     BackpropMLP, whose backward is the slides' δ recursion
  fused      BackpropMLP.loss(x, y, loss): the loss inside the stack, one autograd node, the
             recursion started from the slides' BP1
  native     its twin nn.Sequential (model.to_sequential()) under plain autograd
  compiled   the twin under torch.compile (compile time excluded; --no-compile leaves it out)
  floor      the step's matrix multiplies alone, which any exact backprop does
  recompute  BackpropMLP(recompute=True): keeps only its input and reruns the forward in backward
ratios are step-time ratios (below 1: the first is faster); "saved" columns are the bytes each
forward saves for backward, activations only. Example:
  torch-backprop bench --cases 784,256,10@64 8,16,16,1@32 --activations relu,tanh --json bench.json
"""


class _Cases(argparse.Action):
    """``--cases``: every case given (``784,256,10@64 8,16,16,1@32``), checked as it is parsed."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        try:
            setattr(namespace, self.dest, parse_cases(" ".join(values)))
        except ValueError as error:
            raise argparse.ArgumentError(self, str(error)) from None


def _activation_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in available_activations()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated activations from {', '.join(available_activations())}, got {text!r}"
        )
    return names


def _dtype_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in DTYPES for name in names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated dtypes from {', '.join(DTYPES)}, got {text!r}"
        )
    return names


_COUNT = number(int, low=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.epilog = EPILOG
    parser.add_argument(
        "--cases",
        nargs="+",
        action=_Cases,
        metavar="WIDTHS@BATCH",
        help="the grid's shapes, such as 784,256,10@64 8,16,16,1@32 (default: six shapes from 8,16,16,1@32 "
        "to 1024,1024,1024,1024@1024; with --quick: 8,16,16,1@32 and 32,64,64,64,64,1@128)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny grid, ReLU only, short measurements")
    parser.add_argument(
        "--activations",
        type=_activation_names,
        help="comma-separated hidden activations (default: relu,tanh,gelu; relu with --quick)",
    )
    parser.add_argument(
        "--dtypes",
        type=_dtype_names,
        help="comma-separated dtypes from float32,bfloat16,float16 (default: float32, "
        "plus bfloat16 on CUDA devices that support it)",
    )
    parser.add_argument("--bf16", action="store_true", help="add bfloat16 to the dtypes (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument(
        "--threads",
        type=_COUNT,
        help="intra-op threads of every measurement (default: torch's current setting)",
    )
    parser.add_argument(
        "--rounds",
        type=_COUNT,
        help="interleaved rounds per case, reported by their median (default: 5; 2 with --quick)",
    )
    parser.add_argument(
        "--min-run-time",
        type=number(float, low=0, low_open=True),
        help="seconds per measurement (default: 0.2; 0.05 with --quick)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    parser.add_argument(
        "--timer",
        choices=sorted(TIMERS),
        default="wall",
        help="wall time, or the process's CPU time, which load from other processes on a "
        "shared CPU machine distorts far less (CPU only)",
    )
    parser.add_argument(
        "--no-larger-batches",
        action="store_true",
        help=f"on CUDA the grid also runs every shape at {CUDA_BATCH_FACTOR}x its batch (the larger "
        "batches); this leaves them out (no effect on the CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the data")
    parser.add_argument(
        "--json",
        type=output_file,
        metavar="FILE",
        help="also write the report as JSON, in an existing folder",
    )
    parser.add_argument(
        "--plot",
        type=output_file,
        metavar="FILE.png",
        help="also write a bar chart of the ratios, in an existing folder (needs matplotlib)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:class:`Settings` from the parsed options (``--quick`` sets the defaults it changes).

    Everything is checked here, before any work: the values themselves by their argparse types.

    Raises:
        ValueError: an unknown dtype, a CUDA device without CUDA, ``--timer cpu`` off the CPU,
            ``--plot`` without matplotlib, ``--json`` and ``--plot`` naming one file.
    """
    device = select_device(args.device)
    dtypes = list(args.dtypes or ["float32"])
    if args.dtypes is None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtypes.append("bfloat16")
    if args.bf16 and "bfloat16" not in dtypes:
        dtypes.append("bfloat16")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes takes {', '.join(DTYPES)}, got {', '.join(unknown)}")
    if args.timer == "cpu" and device.type != "cpu":
        raise ValueError(f"--timer cpu measures host CPU time; use the wall timer on {device}")
    if args.plot is not None and not module_available("matplotlib"):
        raise ValueError(f"--plot {args.plot} needs matplotlib, which is not installed: {_PLOT_INSTALL}")
    if args.plot is not None and args.json is not None and args.plot.resolve() == args.json.resolve():
        raise ValueError(f"--json and --plot expected two files, got {args.json} for both")
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.2)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    shapes = args.cases or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    activations = args.activations or (["relu"] if args.quick else list(DEFAULT_ACTIVATIONS))
    return Settings(
        shapes=shapes,
        activations=activations,
        dtypes=dtypes,
        device=str(device),
        threads=threads,
        rounds=rounds,
        min_run_time=min_run_time,
        compile=not args.no_compile,
        timer=args.timer,
        larger_batches=not args.no_larger_batches,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the markdown table; write ``--json`` / ``--plot`` if asked."""
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"torch-backprop bench: {error}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_benchmark(settings, log)
    machine = report["machine"]
    print(
        f"torch_backprop bench: {machine['cpu']}, {machine['threads']} threads, {machine['device']}, "
        f"torch {machine['torch']}; {settings.timer} time, medians of {settings.rounds} interleaved rounds\n"
    )
    print(format_table(report))
    for warning in impossible_ratios(report):
        print(f"torch-backprop bench: {warning}", file=sys.stderr)
    if args.json:
        write_json(report, args.json, allow_nan=False)
    if args.plot:
        plot_ratios(report, args.plot)
    return 0
