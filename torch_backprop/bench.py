"""``torch-backprop bench``: the command that runs the step-time benchmark and prints its table.

This file parses the options and prints; the measuring is :mod:`torch_backprop.benchmark` (the grid
of cases and contenders), :mod:`torch_backprop.timing` (interleaved rounds) and the output
:mod:`torch_backprop.report` (markdown table, ratio chart). The command prints times and ratios
only; checking them against a project's thresholds is ``benchmarks/check_threshold.py``'s job,
on the JSON that ``--json`` writes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .benchmark import (
    DEFAULT_ACTIVATIONS,
    DEFAULT_SHAPES,
    DTYPES,
    QUICK_SHAPES,
    Settings,
    parse_cases,
    run_benchmark,
)
from .devices import select_device
from .files import write_json
from .report import format_table, impossible_ratios, plot_ratios
from .timing import TIMERS

__all__ = ["add_arguments", "run", "settings_from_args"]


def _case_list(text: str) -> list[tuple[tuple[int, ...], int]]:
    try:
        return parse_cases(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("--cases", type=_case_list, help="grid shapes, e.g. 784-256-10@64,8-16-16-1@32")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, ReLU only, short measurements")
    parser.add_argument("--activations", type=_names, help="comma list (default relu,tanh,gelu)")
    parser.add_argument(
        "--dtypes",
        type=_names,
        help="comma list of float32,bfloat16,float16 (default: float32, "
        "plus bfloat16 on CUDA devices that support it)",
    )
    parser.add_argument("--bf16", action="store_true", help="add bfloat16 to the dtypes (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's current setting)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default 5; 2 with --quick)")
    parser.add_argument(
        "--min-run-time", type=float, help="seconds per measurement (default 0.2; 0.05 with --quick)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument(
        "--timer",
        choices=sorted(TIMERS),
        default="wall",
        help="wall time (default) or the process's CPU time, which load from other processes on a "
        "shared CPU machine distorts far less",
    )
    parser.add_argument("--no-larger-batches", action="store_true", help="on CUDA, skip the 8x batches")
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters and data (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also write a bar chart of the ratios")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:class:`Settings` from the parsed options (``--quick`` sets the defaults it changes).

    Raises:
        ValueError: an unknown dtype, a CUDA device without CUDA, or non-positive counts.
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
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.2)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if rounds < 1 or min_run_time <= 0 or threads < 1:
        raise ValueError(
            f"--rounds, --min-run-time and --threads must be positive, got "
            f"{rounds}, {min_run_time}, {threads}"
        )
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
        try:
            plot_ratios(report, args.plot)
        except ImportError:
            print(
                "torch-backprop bench: --plot needs matplotlib (pip install torch-backprop[plot])",
                file=sys.stderr,
            )
            return 1
    return 0
