"""Count the CPU instructions of one training step, BackpropMLP against its native twin (callgrind).

Step times on a shared machine move by several percent between runs; instruction counts do not.
This runs one training step (zero the gradients, forward, loss, backward) of ``BackpropMLP`` and of
``to_sequential()`` under valgrind's callgrind (``torch.utils.benchmark.Timer.collect_callgrind``)
and reports the instructions per step, so a change to the Python around the δ recursion can be
judged exactly. Needs ``valgrind`` on PATH; takes about a minute per contender and case.

    python benchmarks/instructions.py --cases 8-16-16-1@32,784-256-10@64 --activation relu
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from torch.utils.benchmark import Timer

from torch_backprop.cli.bench import Case, parse_cases

# The step is torch-backprop bench's (zero the gradients, forward, loss, backward), on the same
# loss: MSE for width-1 outputs, cross-entropy otherwise.
SETUP = """
import torch
from torch_backprop import BackpropMLP
from torch_backprop.cli.bench import Case, training_step

torch.manual_seed(0)
manual = BackpropMLP({sizes}, activation="{activation}")
model = {{"manual": manual, "native": manual.to_sequential()}}["{name}"]
case = Case({sizes}, {batch})
x, target = case.data()
step = training_step(model, list(model.parameters()), x, target, case.loss)
for _ in range(20):
    step()
"""


def instructions_per_step(
    sizes: tuple[int, ...], batch: int, activation: str, name: str, steps: int
) -> float:
    setup = SETUP.format(sizes=tuple(sizes), batch=batch, activation=activation, name=name)
    stats = Timer("step()", setup=setup, num_threads=1).collect_callgrind(
        number=steps, collect_baseline=False
    )
    return stats.counts(denoise=True) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8-16-16-1@32,784-256-10@64", help="WIDTHS@BATCH,...")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--steps", type=int, default=100, help="steps counted per contender")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind on PATH (e.g. apt install valgrind)")
    # callgrind runs a fresh `python`: make it this interpreter (a virtual environment's)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    print("| case | manual instructions/step | native instructions/step | manual/native |")
    print("|---|---:|---:|---:|")
    for sizes, batch in parse_cases(args.cases):
        counts = {
            name: instructions_per_step(sizes, batch, args.activation, name, args.steps)
            for name in ("manual", "native")
        }
        case = f"{Case(sizes, batch).shape_name} {args.activation}"
        ratio = counts["manual"] / counts["native"]
        print(f"| {case} | {counts['manual']:,.0f} | {counts['native']:,.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
