r"""The authors' own ENGD on our reference problems: the same network, initial weights and points.

Runs ``rla_pinns.optim.engd.ENGD`` (Müller & Zeinhofer's ENGD as the KFAC-for-PINNs and rla-pinns
authors implement it: the Gramian by nested autograd, a least-squares solve on the CPU, the grid
line search) or ``rla_pinns.optim.rngd.RNGD`` with ``approximation="exact"`` (their Woodbury ENGD,
arXiv 2505.12149) with their defaults, on a preset of ``torch-backprop pinn``: the model is our
``BackpropMLP``'s native twin (``to_sequential()``, so the same initial weights for a seed), and
the points come from the same sampler and seed. It reports the seconds of each step and the errors
on the same 10 N_Ω test points. It needs the authors' package, which is not ours to depend on:
run it in an environment of its own, for example

    python3 -m venv /tmp/venv-authors    # with torch 2.14.1, einops and tueplots; rla-pinns from its
                                         # repository, installed with --no-deps
    PYTHONPATH=.:STUBS /tmp/venv-authors/bin/python benchmarks/authors_engd.py --problem poisson5d \\
        --optimizer ENGD --steps 50 --json out.json

where STUBS holds a stand-in ``hessianfree`` package (a git dependency of rla-pinns that its
ENGD does not use). ``benchmarks/pinn.py --authors-python`` runs it beside our ENGD.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rla_pinns.optim.engd import ENGD
from rla_pinns.optim.rngd import RNGD

from torch_backprop import BackpropMLP
from torch_backprop.cli.files import write_json
from torch_backprop.cli.pinn_problems import PROBLEMS, errors
from torch_backprop.pde import InputDerivatives


def targets(
    problem_name: str, x_in: torch.Tensor, x_bd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``y_Ω`` and ``y_∂Ω``: Poisson's residual is Δu + y_Ω (so y_Ω = f), heat's ∂_t u − ¼Δu − 0."""
    problem = PROBLEMS[problem_name]
    if problem.heat:
        y_in = x_in.new_zeros(x_in.shape[0], 1)
    else:  # r_Ω = −Δu − f: evaluate it at u ≡ 0 to read f
        zero = torch.zeros(x_in.shape[0], 1, dtype=x_in.dtype)
        y_in = -problem.interior_residual(x_in, InputDerivatives(zero, None, zero)).unsqueeze(1)
    return y_in, problem.exact(x_bd).unsqueeze(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--problem", choices=list(PROBLEMS), required=True, help="the preset")
    parser.add_argument("--optimizer", choices=["ENGD", "RNGD"], required=True, help="dense or Woodbury")
    parser.add_argument("--steps", type=int, required=True, help="steps to run")
    parser.add_argument("--seed", type=int, default=0, help="the seed, as torch-backprop pinn's (default 0)")
    parser.add_argument("--damping", type=float, default=None, help="default: theirs (ENGD 0, RNGD 1e-8)")
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    args = parser.parse_args(argv)
    problem = PROBLEMS[args.problem]
    torch.manual_seed(args.seed)  # the initial weights of torch-backprop pinn --seed
    model = BackpropMLP(problem.sizes, "tanh", dtype=torch.float64)
    twin = model.to_sequential()
    generator = torch.Generator().manual_seed(args.seed)
    test = torch.rand(
        10 * problem.interior, problem.dim, generator=torch.Generator().manual_seed(10_000 + args.seed),
        dtype=torch.float64,
    )  # fmt: skip
    equation = "heat" if problem.heat else "poisson"
    if args.optimizer == "ENGD":
        damping = 0.0 if args.damping is None else args.damping
        optimizer = ENGD(twin, damping=damping, equation=equation)
    else:
        damping = 1e-8 if args.damping is None else args.damping
        optimizer = RNGD(list(twin), equation=equation, damping=damping, approximation="exact",
                         lr=("grid_line_search", [2.0**-k for k in range(30, -1, -1)]))  # fmt: skip
    seconds, log, points = [], [], None
    for step in range(args.steps):
        if points is None or (problem.resample and step % problem.resample == 0):
            points = problem.sample(generator, torch.float64)
        y_in, y_bd = targets(args.problem, *points)
        began = time.perf_counter()
        optimizer.zero_grad()
        optimizer.step(points[0], y_in, points[1], y_bd)
        seconds.append(time.perf_counter() - began)
        rms, relative = errors(twin, problem, test)  # the same measurement, of their trained twin
        log.append({"step": step + 1, "seconds": sum(seconds), "rms_error": rms, "relative_l2": relative})
    write_json(
        {
            "problem": args.problem, "optimizer": args.optimizer, "damping": damping, "seed": args.seed,
            "parameters": sum(p.numel() for p in twin.parameters()), "steps": args.steps,
            "median_step_s": statistics.median(seconds), "log": log,
        },
        args.json,
    )  # fmt: skip
    median = statistics.median(seconds)
    print(f"{args.problem} {args.optimizer}: {median:.3f} s/step, RMS {log[-1]['rms_error']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
