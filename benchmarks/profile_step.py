"""Profile one training step of BackpropMLP and of its native twin with ``torch.profiler``.

Where ``torch-backprop bench`` finds the manual backward slower than native autograd, this says
which operators (and how much Python around them) cost what. Run from the repository root:

    python benchmarks/profile_step.py --case 8-16-16-1@32 --activation relu --threads 2

It profiles each contender in ``--sessions`` sessions of ``--steps`` steps, alternating between
them, and prints the operators of the last session sorted by self CPU time, and a side-by-side
summary of the total time per step (the median over the sessions) split into matrix multiplies,
other operators and time outside operators (Python, autograd engine).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from torch_backprop import BackpropMLP
from torch_backprop.cli.bench import Case, parse_cases, training_step
from torch_backprop.cli.timing import rotated

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def profile_step(name: str, step: Callable[[], None], steps: int, rows: int, show: bool) -> dict[str, float]:
    for _ in range(20):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("step"):
                step()
    averages = prof.key_averages()
    if show:
        print(f"\n=== {name}: operators by self CPU time, {steps} steps ===")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    step_total = next(e.cpu_time_total for e in averages if e.key == "step") / steps
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS) / steps
    operators = sum(e.self_cpu_time_total for e in averages if e.key.startswith("aten::")) / steps
    return {"step_us": step_total, "matmul_us": matmul, "other_ops_us": operators - matmul}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="8-16-16-1@32", help="WIDTHS@BATCH")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=3, help="profiling sessions per contender")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ((sizes, batch),) = parse_cases(args.case)
    torch.manual_seed(0)
    manual = BackpropMLP(sizes, activation=args.activation)
    native = manual.to_sequential()
    case = Case(sizes, batch)
    x, target = case.data()
    steps = {
        name: training_step(model, list(model.parameters()), x, target, case.loss)
        for name, model in (("manual", manual), ("native", native))
    }
    # Sessions alternate between the contenders and each figure is the median over them: a
    # profiling session can run slow for a while (the first of a process often does), and
    # whichever contender it falls on would otherwise look slower.
    sessions: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for session in range(args.sessions):
        for name in rotated(list(steps), session):
            show = session == args.sessions - 1
            sessions[name].append(profile_step(name, steps[name], args.steps, args.rows, show))
    results = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in sessions.items()
    }
    print(
        f"\n=== per step (µs, under the profiler, median of {args.sessions} sessions), "
        f"{args.case} {args.activation} ==="
    )
    print(
        "| contender | step | matmuls (self) | other aten ops (self) | outside aten ops (Python, autograd) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        outside = r["step_us"] - r["matmul_us"] - r["other_ops_us"]
        cells = [r["step_us"], r["matmul_us"], r["other_ops_us"], outside]
        print(f"| {name} | " + " | ".join(f"{cell:.0f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
