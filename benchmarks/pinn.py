r"""PINN optimisers on the reference problems: error after k steps over seeds, and the steps' cost.

Two parts, each optional:

* ``--runs PROBLEM:STEPS ...`` with ``--optimizers`` and ``--seeds``: each (problem, optimiser, seed)
  is one ``torch-backprop pinn`` run (``torch_backprop.cli.pinn.train``) in its own folder under
  ``--runs-dir``; a finished folder is read back, an unfinished one resumed, so long runs can be
  started beforehand (``torch-backprop pinn --out <runs-dir>/<problem>-<optimizer>-s<seed>``) and
  collected here. Reported per (problem, optimiser): the absolute RMS error (the authors' metric,
  on 10 N_Ω fixed test points) and the relative L2 error after the last step, median and range
  over the seeds, and the median curve at each logged step.
* ``--authors PROBLEM:STEPS:OPTIMIZER ...`` with ``--authors-python``: the authors' own ENGD
  (``benchmarks/authors_engd.py``, run by that interpreter, their package installed there; ENGD:
  their dense Gramian, RNGD: their Woodbury ENGD) beside ours for the same steps, network, initial
  weights and points, in the same invocation: seconds a step and the errors after the steps.
* ``--timing PROBLEM ...``: one step of each contender on the problem's model and points, timed in
  interleaved rotated rounds (``torch_backprop.cli.timing.interleaved_medians``): ``engd`` (the
  grid line search), ``engd fixed lr`` (no line search), ``floor`` (what the step cannot avoid: given
  the stacked float64 Jacobian J̃, the Gramian or kernel product, its Cholesky factorisation and the
  solves), ``tapes`` (the residual Jacobian's Taylor and adjoint passes), ``adam`` (the loss and
  its gradient through the one-pass operator, and Adam's update), ``kfac`` (KFAC with its automatic
  step size and momentum), ``kfac grid`` (with the grid line search) and ``gradient`` (the loss and
  its gradient alone, the plain step KFAC is held to). ``--contenders`` picks some (the ENGD ones
  hold the N × D Jacobian: leave them out where it does not fit). Ratios against the floor, Adam and
  the plain gradient step; ``--timer cpu`` takes the process's CPU time instead of wall time.
* ``--memory PROBLEM:N_INTERIOR:N_BOUNDARY ...``: the peak resident memory of a fresh process that
  builds the problem's model and takes one KFAC step on that many points (the tapes hold
  (K + 2) N_Ω rows per layer, so it grows linearly in N_Ω: two point counts give the slope for a
  preset too large for the machine).

Run from the repository root, for example:

    python benchmarks/pinn.py --runs poisson2d:6000 poisson5d:1000 poisson5d-deep:1000 heat4d:1000 \\
        --optimizers engd adam lbfgs --seeds 0 1 2 --timing poisson2d poisson5d poisson5d-deep heat4d \\
        --json benchmarks/results/pinn.json
    python benchmarks/pinn.py --timing poisson10d --contenders kfac gradient adam --json k.json
    python benchmarks/pinn.py --memory poisson100d:100:50 poisson100d:200:100 --json m.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from torch_backprop import ENGD, KFAC, BackpropMLP
from torch_backprop.cli.files import write_json
from torch_backprop.cli.options import number
from torch_backprop.cli.pinn import train
from torch_backprop.cli.pinn_problems import PROBLEMS, loss_terms, residual_tapes
from torch_backprop.cli.run_folder import CHECKPOINT, RunFolder
from torch_backprop.cli.timing import interleaved_medians, machine_info, threads
from torch_backprop.optim.least_squares import lower_gram, stacked_system

# The contenders of --optimizers: plain ENGD (Müller & Zeinhofer's), ENGD with the moving average of
# the Gramian from the identity (β = 0.3: the pinn command's default, the KFAC-for-PINNs authors'
# best ENGD runs), Adam and L-BFGS at the command's defaults.
PLAIN = {
    "damping": 1e-10, "ema_factor": 0.0, "initialize_to_identity": False, "solver": "cholesky",
    "inverse_every": 1, "line_search": None,
}  # fmt: skip
VARIANTS = {
    "engd": {"optimizer": "engd", **PLAIN},
    "engd-ema": {**PLAIN, "optimizer": "engd", "ema_factor": 0.3, "initialize_to_identity": True},
    "engd-pinv": {**PLAIN, "optimizer": "engd", "solver": "pseudo-inverse", "damping": 0.0},
    "engd-ema-pinv": {
        "optimizer": "engd",
        "ema_factor": 0.3,
        "initialize_to_identity": True,
        "solver": "pseudo-inverse",
        "damping": 0.0,
    },  # fmt: skip
    "kfac": {**PLAIN, "optimizer": "kfac", "ema_factor": 0.95},
    "adam": {"optimizer": "adam", **PLAIN},
    "lbfgs": {"optimizer": "lbfgs", **PLAIN},
}


def run_spec(text: str) -> tuple[str, int]:
    """``"poisson5d:1000"`` -> ``("poisson5d", 1000)``."""
    name, _, steps = text.partition(":")
    if name not in PROBLEMS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(
            f"expected PROBLEM:STEPS with PROBLEM one of {', '.join(PROBLEMS)}, got {text!r}"
        )
    return name, int(steps)


def authors_spec(text: str) -> tuple[str, int, str]:
    """``"poisson5d:50:ENGD"`` -> ``("poisson5d", 50, "ENGD")``."""
    parts = text.split(":")
    if len(parts) != 3 or parts[2] not in ("ENGD", "RNGD"):
        raise argparse.ArgumentTypeError(f"expected PROBLEM:STEPS:ENGD|RNGD, got {text!r}")
    name, steps = run_spec(f"{parts[0]}:{parts[1]}")
    return name, steps, parts[2]


def memory_spec(text: str) -> tuple[str, int, int]:
    """``"poisson100d:100:50"`` -> ``("poisson100d", 100, 50)``."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in PROBLEMS or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise argparse.ArgumentTypeError(
            f"expected PROBLEM:N_INTERIOR:N_BOUNDARY with PROBLEM one of {', '.join(PROBLEMS)}, got {text!r}"
        )
    return parts[0], int(parts[1]), int(parts[2])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=run_spec, nargs="*", default=[], help="PROBLEM:STEPS runs to collect")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(VARIANTS),
        default=["engd", "adam", "lbfgs"],
        help="the optimisers of each run (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=number(int, low=0),
        nargs="+",
        default=[0, 1, 2],
        help="the seeds of each run (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every",
        type=number(int, low=1),
        default=25,
        help="the runs' logging interval (default: %(default)s)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("benchmarks/results/pinn-runs"),
        help="the runs' folders (default: %(default)s)",
    )
    parser.add_argument(
        "--authors",
        type=authors_spec,
        nargs="*",
        default=[],
        help="PROBLEM:STEPS:ENGD|RNGD runs of the authors' ENGD beside ours",
    )
    parser.add_argument("--authors-python", type=Path, default=None, help="the authors' environment's python")
    parser.add_argument(
        "--authors-pythonpath", default="", help="extra PYTHONPATH there (a stand-in hessianfree package)"
    )  # fmt: skip
    parser.add_argument(
        "--timing",
        nargs="*",
        choices=list(PROBLEMS),
        default=[],
        help="problems whose step is timed",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help="the timed steps (default: all)",
    )
    parser.add_argument(
        "--timer", choices=["wall", "cpu"], default="wall", help="the timer (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=number(int, low=1), default=5, help="timing rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--min-run-time",
        type=number(float, low=0, low_open=True),
        default=1.0,
        help="seconds per timing measurement (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=number(int, low=1),
        default=torch.get_num_threads(),
        help="intra-op threads (default: all)",
    )
    parser.add_argument(
        "--memory",
        type=memory_spec,
        nargs="*",
        default=[],
        help="PROBLEM:N_INTERIOR:N_BOUNDARY: peak memory of one KFAC step on that many points",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)  # fmt: skip


def collect(problem: str, steps: int, optimizer: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of one run: read back when finished, else resumed or started."""
    folder = args.runs_dir / f"{problem}-{optimizer}-s{seed}"
    run = argparse.Namespace(
        problem=problem, steps=steps, seed=seed, dtype="float64", lr=None,
        momentum=0.0, log_every=args.log_every, out=folder, resume=None, quiet=True,
        **VARIANTS[optimizer],
    )  # fmt: skip
    saved = None
    if (folder / CHECKPOINT).is_file():
        saved = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
        if saved["step"] >= steps:
            return saved["metrics"]
        run.resume = folder
    print(
        f"running {folder} from step {saved['step'] if saved else 0} to {steps}",
        file=sys.stderr,
        flush=True,
    )
    with RunFolder(folder, resume=run.resume, overwrite=False):  # a run still going there is refused
        return train(run, saved)


def summarise(logs: list[list[dict[str, Any]]], steps: int) -> dict[str, Any]:
    """Median and range over seeds of the errors at the last step; the median curve."""
    finals = [next(e for e in log if e["step"] == steps) for log in logs]

    def spread(key: str) -> dict[str, float]:
        values = [e[key] for e in finals]
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "seeds": values,
        }

    by_step: dict[int, list[dict[str, Any]]] = {}
    for log in logs:
        for e in log:
            by_step.setdefault(e["step"], []).append(e)
    curve = [
        {
            "step": step,
            "rms_error": statistics.median(e["rms_error"] for e in entries),
            "relative_l2": statistics.median(e["relative_l2"] for e in entries),
            "seconds": statistics.median(e["seconds"] for e in entries),
        }
        for step, entries in sorted(by_step.items())
        if len(entries) == len(logs)
    ]
    return {
        "steps": steps,
        "rms_error": spread("rms_error"),
        "relative_l2": spread("relative_l2"),
        "seconds": spread("seconds"),
        "curve": curve,
    }


CONTENDERS = ("engd", "engd fixed lr", "floor", "tapes", "adam", "kfac", "kfac grid", "gradient")


def timing(problem_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One step of each contender on the problem's model and points, interleaved."""
    problem = PROBLEMS[problem_name]
    torch.manual_seed(0)
    points = problem.sample(torch.Generator().manual_seed(0), torch.float64)
    wanted = set(args.contenders)
    models = {
        name: BackpropMLP(problem.sizes, "tanh", dtype=torch.float64)
        for name in ("grid", "fixed", "adam", "kfac", "kfac grid", "gradient")
    }
    steps: dict[str, Any] = {}
    columns = sum(p.numel() for p in models["grid"].parameters())
    rows = problem.interior + problem.boundary
    if wanted & {"engd", "engd fixed lr", "floor", "tapes"}:
        engd = ENGD(models["grid"].parameters())
        fixed = ENGD(models["fixed"].parameters(), lr=1e-3, line_search_fn=None)
        jacobian, residual = stacked_system(residual_tapes(models["grid"], problem, *points))

        def floor() -> None:
            if rows < columns:  # EN2: J̃ J̃ᵀ, Cholesky, two triangular solves, J̃ᵀ α
                factor = torch.linalg.cholesky(
                    lower_gram(jacobian) + 1e-10 * torch.eye(rows, dtype=jacobian.dtype)
                )
                jacobian.t().mv(torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1))
            else:  # EN1: J̃ᵀ J̃, J̃ᵀ r̃, Cholesky, two triangular solves
                gramian = lower_gram(jacobian.t()) + 1e-10 * torch.eye(columns, dtype=jacobian.dtype)
                torch.cholesky_solve(jacobian.t().mv(residual).unsqueeze(1), torch.linalg.cholesky(gramian))

        steps.update(
            {
                "engd": lambda: engd.step(lambda: residual_tapes(models["grid"], problem, *points)),
                "engd fixed lr": lambda: fixed.step(
                    lambda: residual_tapes(models["fixed"], problem, *points)
                ),
                "floor": floor,
                "tapes": lambda: stacked_system(residual_tapes(models["grid"], problem, *points)),
            }
        )
    adam = torch.optim.Adam(models["adam"].parameters(), lr=1e-3)

    def adam_step() -> None:
        adam.zero_grad()
        sum(loss_terms(models["adam"], problem, *points)).backward()
        adam.step()

    def gradient_step() -> None:
        for p in models["gradient"].parameters():
            p.grad = None
        sum(loss_terms(models["gradient"], problem, *points)).backward()

    kfac = KFAC(models["kfac"].parameters())
    kfac_grid = KFAC(models["kfac grid"].parameters(), line_search_fn="grid")
    steps.update(
        {
            "adam": adam_step,
            "kfac": lambda: kfac.step(lambda: residual_tapes(models["kfac"], problem, *points)),
            "kfac grid": lambda: kfac_grid.step(
                lambda: residual_tapes(models["kfac grid"], problem, *points)
            ),
            "gradient": gradient_step,
        }
    )
    steps = {name: step for name, step in steps.items() if name in wanted}
    with threads(args.threads):
        times = interleaved_medians(
            steps,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            threads=args.threads,
            timer=args.timer,
        )
    median = {name: t["median_s"] for name, t in times.items()}
    ratios = {
        "engd_over_floor": ("engd", "floor"),
        "engd_fixed_over_floor": ("engd fixed lr", "floor"),
        "engd_over_adam": ("engd", "adam"),
        "kfac_over_gradient": ("kfac", "gradient"),
        "kfac_grid_over_gradient": ("kfac grid", "gradient"),
        "kfac_over_adam": ("kfac", "adam"),
    }
    return {
        "problem": problem_name,
        "sizes": problem.sizes,
        "parameters": columns,
        "residuals": rows,
        "space": "residuals (kernel, EN2)" if rows < columns else "parameters (Gramian, EN1)",
        "timer": args.timer,
        "times": times,
        **{
            key: median[a] / median[b]
            for key, (a, b) in ratios.items()
            if a in median and b in median
        },
    }  # fmt: skip


_ONE_KFAC_STEP = """
import dataclasses, json, resource, sys
import torch
from torch_backprop import KFAC, BackpropMLP
from torch_backprop.cli.pinn_problems import PROBLEMS, residual_tapes
name, interior, boundary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
problem = dataclasses.replace(PROBLEMS[name], interior=interior, boundary=boundary)
torch.manual_seed(0)
model = BackpropMLP(problem.sizes, "tanh", dtype=torch.float64)
points = problem.sample(torch.Generator().manual_seed(0), torch.float64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
KFAC(model.parameters()).step(lambda: residual_tapes(model, problem, *points))
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def memory(problem_name: str, interior: int, boundary: int) -> dict[str, Any]:
    """Peak resident memory of one KFAC step in a fresh process (ru_maxrss, Linux KiB), and before it."""
    child = subprocess.run(
        [sys.executable, "-c", _ONE_KFAC_STEP, problem_name, str(interior), str(boundary)],
        capture_output=True,
        text=True,
        check=True,
    )
    baseline, peak = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "problem": problem_name,
        "interior": interior,
        "boundary": boundary,
        "peak_gib": peak / 2**20,
        "before_step_gib": baseline / 2**20,
    }


def side_by_side(problem: str, steps: int, theirs: str, args: argparse.Namespace) -> dict[str, Any]:
    """Our ENGD and the authors' for ``steps`` steps from the same start: seconds a step, errors after."""
    with tempfile.TemporaryDirectory() as folder:
        run = argparse.Namespace(
            problem=problem, steps=steps, seed=0, dtype="float64", lr=None,
            momentum=0.0, log_every=steps, out=Path(folder) / "ours", resume=None, quiet=True,
            **VARIANTS["engd"],
        )  # fmt: skip
        ours = train(run)["log"][-1]
        result = Path(folder) / "theirs.json"
        script = Path(__file__).with_name("authors_engd.py")
        paths = [str(Path(__file__).resolve().parents[1]), *filter(None, args.authors_pythonpath.split(":"))]
        env = {**os.environ, "PYTHONPATH": ":".join(paths)}
        command = [str(args.authors_python), str(script), "--problem", problem, "--optimizer", theirs]
        command += ["--steps", str(steps), "--json", str(result)]
        subprocess.run(command, env=env, check=True)
        authors = json.loads(result.read_text())
    theirs_last = authors["log"][-1]
    return {
        "problem": problem, "steps": steps, "theirs": theirs, "parameters": authors["parameters"],
        "ours_s_per_step": ours["seconds"] / steps, "theirs_s_per_step": theirs_last["seconds"] / steps,
        "ours_over_theirs": (ours["seconds"] / steps) / (theirs_last["seconds"] / steps),
        "ours_rms_error": ours["rms_error"], "theirs_rms_error": theirs_last["rms_error"],
        "ours_relative_l2": ours["relative_l2"], "theirs_relative_l2": theirs_last["relative_l2"],
        "theirs_damping": authors["damping"], "theirs_log": authors["log"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.authors and args.authors_python is None:
        raise SystemExit("benchmarks/pinn.py: --authors needs --authors-python (the authors' environment)")
    results: dict[str, Any] = {
        "machine": machine_info("cpu", args.threads),
        "runs": {},
        "timing": [],
        "authors": [],
    }
    for problem, steps in args.runs:
        for optimizer in args.optimizers:
            logs = [collect(problem, steps, optimizer, seed, args)["log"] for seed in args.seeds]
            summary = summarise(logs, steps)
            results["runs"][f"{problem}/{optimizer}"] = {
                "problem": problem,
                "optimizer": optimizer,
                **summary,
            }
            rms, rel = summary["rms_error"], summary["relative_l2"]
            print(
                f"{problem:15s} {optimizer:6s} {steps:5d} steps: RMS error {rms['median']:.2e} "
                f"[{rms['min']:.2e}, {rms['max']:.2e}], relative L2 {rel['median']:.2e}, "
                f"{summary['seconds']['median']:.0f} s"
            )
    for problem in args.timing:
        result = timing(problem, args)
        results["timing"].append(result)
        times = {name: t["median_s"] * 1e3 for name, t in result["times"].items()}
        print(
            f"{problem:15s} D={result['parameters']} N={result['residuals']} ({result['space']}): "
            + ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items())
            + "; "
            + ", ".join(f"{key} {value:.2f}" for key, value in result.items() if "_over_" in key)
        )
    results["memory"] = []
    for problem, interior, boundary in args.memory:
        result = memory(problem, interior, boundary)
        results["memory"].append(result)
        print(
            f"{problem:15s} one KFAC step on {interior} + {boundary} points: peak "
            f"{result['peak_gib']:.2f} GiB ({result['before_step_gib']:.2f} GiB before the step)"
        )
    for problem, steps, theirs in args.authors:
        result = side_by_side(problem, steps, theirs, args)
        results["authors"].append(result)
        print(
            f"{problem:15s} {steps} steps, ours vs the authors' {theirs}: {result['ours_s_per_step']:.3f} vs "
            f"{result['theirs_s_per_step']:.3f} s/step ({result['ours_over_theirs']:.2f}x); RMS error "
            f"{result['ours_rms_error']:.2e} vs {result['theirs_rms_error']:.2e}"
        )
    if args.json is not None:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
