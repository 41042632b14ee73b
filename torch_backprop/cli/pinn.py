"""The ``pinn`` command: train a physics-informed BackpropMLP on a reference PDE problem.

    torch-backprop pinn --problem poisson5d --optimizer engd --steps 1000 --out runs/p5

A preset (:mod:`torch_backprop.cli.pinn_problems`) fixes the PDE, its exact solution, the sampler,
the network and the point counts; the optimiser is ENGD (the residual Jacobian of one Taylor pass,
:class:`~torch_backprop.optim.ENGD`), Adam or L-BFGS (strong Wolfe) on the same loss
½ mean r_Ω² + ½ mean r_∂Ω². Every ``--log-every`` steps the run measures the absolute RMS and
relative L2 errors on 10 N_Ω fixed test points and writes, atomically, ``checkpoint.pt`` (the
model, the optimiser, the sampler's generator and the current points: ``--resume`` continues
bitwise), ``model.pt`` and ``metrics.json``; at the end ``curves.png`` (error against step and
against time) when matplotlib is installed.

``--optimizer kfac`` is :class:`~torch_backprop.optim.KFAC`: the interior and boundary Kronecker
factors of the same tapes, their moving averages (``--ema-factor``), the inverse every
``--inverse-every`` steps, and the automatic step size and momentum (``--line-search auto``) or the
grid line search; each logged entry carries its skipped-step counts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..core.module import BackpropMLP
from ..optim import ENGD, KFAC
from .files import write_figure, write_json, write_torch
from .options import ConfigError, number
from .pinn_problems import PROBLEMS, Problem, errors, loss_terms, residual_tapes
from .run_folder import CHECKPOINT, CURVES, METRICS, MODEL, RunFolder, check_out

__all__ = ["add_arguments", "run", "train"]

OPTIMIZERS = ("engd", "kfac", "adam", "lbfgs")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ENGD_SOLVER = "cholesky"
ENGD_EMA_FACTOR = 0.3  # with the identity start: the KFAC-for-PINNs authors' best ENGD runs
KFAC_EMA_FACTOR = 0.95
_DEFAULT_LR = {
    "engd": None,
    "kfac": None,
    "adam": 1e-3,
    "lbfgs": 0.1,
}  # L-BFGS at lr 1 stalls on poisson2d (loss 29 from step 25)
_CONFIG_KEYS = (
    "problem", "optimizer", "dtype", "seed", "lr", "damping", "momentum", "solver", "ema_factor",
    "initialize_to_identity", "inverse_every", "line_search",
)  # fmt: skip
_SECOND_ORDER = ("engd", "kfac")
_KFAC_DEFAULTS = {"inverse_every": 1, "line_search": None}  # KFAC's own options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pinn`` command's options."""
    add = parser.add_argument
    add(
        "--problem",
        choices=list(PROBLEMS),
        default="poisson2d",
        help="the reference problem (default: %(default)s)",
    )
    add("--optimizer", choices=OPTIMIZERS, default="engd", help="the optimiser (default: %(default)s)")
    add(
        "--steps", type=number(int, low=0), default=1000, help="optimiser steps in all (default: %(default)s)"
    )
    add(
        "--seed",
        type=number(int, low=0),
        default=0,
        help="seeds the network and the points (default: %(default)s)",
    )
    add("--dtype", choices=list(DTYPES), default="float64", help="the model's dtype (default: %(default)s)")
    add(
        "--lr",
        type=number(float, low=0, low_open=True),
        default=None,
        help="step size: Adam 1e-3, L-BFGS 0.1; ENGD's default is the grid line search over 2^-30..1",
    )
    add(
        "--damping",
        type=number(float, low=0),
        default=1e-10,
        help="ENGD's damping λ of the Gramian or kernel, KFAC's of every Kronecker factor "
        "(default: %(default)s)",
    )
    add(
        "--momentum",
        type=number(float, low=0, high=1, high_open=True),
        default=0.0,
        help="ENGD's and KFAC's momentum μ (not with KFAC's --line-search auto, which chooses it)",
    )
    add(
        "--line-search",
        choices=["auto", "grid"],
        default=None,
        help="KFAC's step rule without --lr: auto (the 2x2 quadratic model, the default) or grid",
    )
    add(
        "--inverse-every",
        type=number(int, low=1),
        default=_KFAC_DEFAULTS["inverse_every"],
        help="KFAC recomputes its inverse every this many steps (default: %(default)s)",
    )
    add(
        "--solver",
        choices=["cholesky", "pseudo-inverse"],
        default=None,
        help="ENGD's solve: Cholesky, or the minimum-norm step by eigendecomposition as the "
        "authors' least-squares solve, best with --damping 0 (default: cholesky)",
    )
    add(
        "--ema-factor",
        type=number(float, low=0, high=1, high_open=True),
        default=None,
        help="the moving average β over steps: of ENGD's Gramian, in parameter space (0: none; "
        "default 0.3, the KFAC-for-PINNs authors' best ENGD runs), of KFAC's Kronecker factors "
        "(default 0.95)",
    )
    add(
        "--initialize-to-identity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ENGD's moving average starts from the identity, a damping of the first steps "
        "(default: yes, as the authors' best ENGD runs)",
    )
    add(
        "--log-every",
        type=number(int, low=1),
        default=10,
        help="measure the error and write the run's files every this many steps (default: %(default)s)",
    )
    add(
        "--out",
        type=Path,
        default=None,
        help="the run folder (default: runs/pinn-<problem>-<optimizer>-<time>)",
    )
    add("--resume", type=Path, default=None, help="continue the run in this folder, exactly")
    add("--quiet", action="store_true", help="no progress bar")


def validate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Check the options and the folders before any work; returns the checkpoint to resume, if any.

    Raises:
        ConfigError: options that do not fit together, an unusable folder, or a checkpoint of another run.
    """
    shared = args.momentum or args.damping != 1e-10 or args.ema_factor is not None
    if args.optimizer not in _SECOND_ORDER and shared:
        raise ConfigError(
            "--damping, --momentum and --ema-factor are ENGD's and KFAC's; "
            f"--optimizer {args.optimizer} takes none of them"
        )
    if args.optimizer != "engd" and (args.solver is not None or args.initialize_to_identity is not None):
        raise ConfigError(
            f"--solver and --initialize-to-identity are ENGD's; --optimizer {args.optimizer} takes neither"
        )
    kfac_options = [
        f"--{key.replace('_', '-')}" for key, value in _KFAC_DEFAULTS.items() if getattr(args, key) != value
    ]
    if args.optimizer != "kfac" and kfac_options:
        raise ConfigError(f"{', '.join(kfac_options)}: KFAC's; --optimizer {args.optimizer} takes none")
    if args.optimizer == "kfac" and args.lr is not None and args.line_search is not None:
        raise ConfigError(f"--lr {args.lr} is a fixed step size; leave out --line-search {args.line_search}")
    if args.optimizer == "kfac" and args.momentum and args.lr is None and args.line_search != "grid":
        raise ConfigError(
            "KFAC's --line-search auto chooses the momentum itself; give --line-search grid or --lr "
            f"with --momentum {args.momentum}"
        )
    if args.ema_factor is None:
        args.ema_factor = {"engd": ENGD_EMA_FACTOR, "kfac": KFAC_EMA_FACTOR}.get(args.optimizer, 0.0)
    if args.initialize_to_identity is None:
        args.initialize_to_identity = args.optimizer == "engd"
    if args.solver is None:
        args.solver = ENGD_SOLVER
    if args.resume is not None:
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ConfigError(
                f"--resume continues in its own folder, {args.resume}; leave out --out {args.out}"
            )
        if not (args.resume / CHECKPOINT).is_file():
            raise ConfigError(
                f"--resume expected the folder of a pinn run, got {args.resume} (no {CHECKPOINT})"
            )
        try:
            saved = torch.load(args.resume / CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which, in one line
            why = type(error).__name__
            raise ConfigError(f"--resume {args.resume}: cannot read {CHECKPOINT} ({why})") from None
        if saved.get("command") != "pinn":
            raise ConfigError(
                f"--resume expected the folder of a pinn run, got one of {saved.get('command')!r}"
            )
        for key in _CONFIG_KEYS:
            was = saved["config"].get(key, getattr(args, key))  # a key a run predates: as given now
            if getattr(args, key) != was:
                raise ConfigError(
                    f"--resume {args.resume} is a run with --{key.replace('_', '-')} {was}, "
                    f"got {getattr(args, key)}"
                )
        args.out = args.resume
        return saved
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = Path("runs") / f"pinn-{args.problem}-{args.optimizer}-{stamp}"
    check_out(args.out)
    return None


def make_optimizer(model: BackpropMLP, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimiser ``--optimizer`` names, with the command's defaults."""
    lr = args.lr if args.lr is not None else _DEFAULT_LR[args.optimizer]
    if args.optimizer == "engd":
        search = "grid" if lr is None else None
        return ENGD(
            model.parameters(),
            lr=lr or 1.0,
            damping=args.damping,
            momentum=args.momentum,
            line_search_fn=search,
            ema_factor=args.ema_factor,
            initialize_to_identity=args.initialize_to_identity,
            solver=args.solver,
        )
    if args.optimizer == "kfac":
        return KFAC(
            model.parameters(),
            lr=lr or 1.0,
            damping=args.damping,
            momentum=args.momentum,
            ema_factor=args.ema_factor,
            inverse_every=args.inverse_every,
            line_search_fn=None if lr is not None else (args.line_search or "auto"),
        )
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.LBFGS(
        model.parameters(), lr=lr, max_iter=1, history_size=100, line_search_fn="strong_wolfe"
    )


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    model: BackpropMLP,
    problem: Problem,
    x_in: torch.Tensor,
    x_bd: torch.Tensor,
) -> tuple[float, list[float]]:
    """One step of any of the four; returns the loss before it and its two terms."""
    if isinstance(optimizer, (ENGD, KFAC)):
        loss = optimizer.step(lambda: residual_tapes(model, problem, x_in, x_bd))
        return float(loss), list(optimizer.state[_state_key(optimizer)]["losses"])
    terms: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        parts = loss_terms(model, problem, x_in, x_bd)
        loss = parts[0] + parts[1]
        loss.backward()
        if not terms:
            terms.extend(float(p.detach()) for p in parts)
        return loss

    loss = optimizer.step(closure)
    return float(loss.detach()), terms


def train(
    args: argparse.Namespace, saved: dict[str, Any] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run ``args.steps`` steps of the run ``args`` describes (from ``saved`` when resuming).

    Returns:
        The metrics: the options, and per logged step the loss, its terms, the errors and the seconds.
    """
    problem = PROBLEMS[args.problem]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    model = BackpropMLP(problem.sizes, "tanh", dtype=dtype)
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    test_points = torch.rand(
        10 * problem.interior,
        problem.dim,
        generator=torch.Generator().manual_seed(10_000 + args.seed),
        dtype=dtype,
    )
    config = {key: getattr(args, key) for key in _CONFIG_KEYS}
    metrics: dict[str, Any] = {
        "config": {**config, "sizes": problem.sizes, "problem_name": problem.name},
        "log": [],
    }
    start, elapsed, points = 0, 0.0, None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        start, elapsed, points, metrics = saved["step"], saved["seconds"], saved["points"], saved["metrics"]
    elif args.steps:
        metrics["log"].append(_measure(model, problem, test_points, 0, 0.0, math.nan, [], optimizer))
    bar = _progress(args.steps, start, progress and not args.quiet)
    out = Path(args.out)
    for step in range(start, args.steps):
        if points is None or (problem.resample and step % problem.resample == 0):
            points = problem.sample(generator, dtype)
        began = time.perf_counter()
        loss, terms = optimizer_step(optimizer, model, problem, *points)
        elapsed += time.perf_counter() - began
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = _measure(model, problem, test_points, step + 1, elapsed, loss, terms, optimizer)
            metrics["log"].append(entry)
            _write(out, model, optimizer, generator, step + 1, elapsed, points, metrics, config)
            bar.set_postfix(loss=f"{loss:.2e}", rms=f"{entry['rms_error']:.2e}", refresh=False)
        bar.update(1)
    bar.close()
    if args.steps == 0 or start == args.steps:
        _write(out, model, optimizer, generator, start, elapsed, points, metrics, config)
    _write_curves(out, metrics)
    return metrics


def _measure(
    model: BackpropMLP,
    problem: Problem,
    points: torch.Tensor,
    step: int,
    seconds: float,
    loss: float,
    terms: list[float],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    rms, relative = errors(model, problem, points)
    entry = {
        "step": step,
        "seconds": seconds,
        "loss": loss,
        "losses": terms,
        "rms_error": rms,
        "relative_l2": relative,
    }
    if isinstance(optimizer, (ENGD, KFAC)) and "lr" in optimizer.state[_state_key(optimizer)]:
        state = optimizer.state[_state_key(optimizer)]
        entry["lr"] = state["lr"]
        if isinstance(optimizer, KFAC):
            entry["momentum"] = state["momentum"]
            entry["skipped"] = dict(state["skipped"])  # steps, factors, inverses left out so far
    return entry


def _state_key(optimizer: torch.optim.Optimizer) -> str:
    return "kfac" if isinstance(optimizer, KFAC) else "engd"


def _write(
    out: Path,
    model: BackpropMLP,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    seconds: float,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    metrics: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """checkpoint.pt, then model.pt and metrics.json, each atomically."""
    write_torch(
        {
            "command": "pinn",
            "config": config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "seconds": seconds,
            "points": points,
            "metrics": metrics,
        },
        out / CHECKPOINT,
    )
    write_torch(model.state_dict(), out / MODEL)
    write_json(metrics, out / METRICS)


def _write_curves(out: Path, metrics: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is not installed
        return
    log = metrics["log"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "seconds", "seconds (optimiser steps only)")):
        ax.semilogy([e[key] for e in log], [e["rms_error"] for e in log], label="absolute RMS error")
        ax.semilogy([e[key] for e in log], [e["relative_l2"] for e in log], label="relative L2 error")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    config = metrics["config"]
    figure.suptitle(f"{config['problem_name']}: {config['optimizer']}, {'-'.join(map(str, config['sizes']))}")
    figure.tight_layout()
    write_figure(figure, out / CURVES)
    plt.close(figure)


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True, leave=False)


def run(args: argparse.Namespace) -> int:
    """Run the ``pinn`` command; returns the exit status."""
    try:
        saved = validate(args)
        with RunFolder(args.out, resume=args.resume, overwrite=False):
            metrics = train(args, saved, progress=True)
    except ConfigError as error:
        print(f"torch-backprop pinn: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torch-backprop pinn: interrupted", file=sys.stderr)
        return 130
    last = metrics["log"][-1] if metrics["log"] else None
    if last is not None:
        print(
            f"{metrics['config']['problem_name']}, {args.optimizer}: step {last['step']}, absolute RMS error "
            f"{last['rms_error']:.3e}, relative L2 {last['relative_l2']:.3e}, {last['seconds']:.1f} s; "
            f"files in {args.out}"
        )
    return 0
