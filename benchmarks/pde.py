"""The physics-informed step and a Hessian-vector product: BackpropMLP against its twin and torch.compile.

Two workloads that need derivatives beyond one backward, each timed (interleaved rotated rounds,
``torch_backprop.timing.interleaved_medians``) for three contenders with the same parameters:
``manual`` (BackpropMLP), ``native`` (its ``to_sequential()`` twin under plain autograd) and
``compiled`` (``torch.compile`` of the native workload, compile time excluded):

* ``pde double backward`` / ``pde forward over reverse``: one training step of
  ``examples/pinn_black_scholes.py`` (forward, u_t and u_S, u_SS by a second backward or by forward
  mode over the first, the Black-Scholes residual, terminal and boundary losses, backward to the
  parameters);
* ``hvp reverse over reverse`` / ``hvp forward over reverse``: a Hessian-vector product H v of a
  mean squared error in the parameters, by a backward through the gradient (``create_graph=True``)
  or by ``torch.func.jvp`` of ``torch.func.grad``.

For the compiled contender the whole workload, its derivatives included, is one compiled function;
torch.compile does not compile a double backward through ``autograd.grad``, so those rows fail to
compile and say so under the table. Run from the repository root:

    python benchmarks/pde.py --threads 1 --timer cpu --rounds 7 --json benchmarks/results/pde.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_backprop.cli.files import write_json
from torch_backprop.cli.timing import TIMERS, interleaved_medians, machine_info, threads
from torch_backprop.testing import format_table

ROOT = Path(__file__).resolve().parent.parent


def load_pinn() -> Any:
    """``examples/pinn_black_scholes.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "pinn_black_scholes", ROOT / "examples" / "pinn_black_scholes.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pde_steps(
    pinn: Any, hidden: Sequence[int], points: int, derivatives: str, compile: bool
) -> dict[str, Callable]:
    """Name -> one PDE training step (loss and backward; gradients dropped each time)."""
    contract = pinn.Contract()
    ours, twin = pinn.make_pricers(contract, hidden, "tanh", torch.float32, seed=0)
    batch = pinn.sample_points(contract, points, torch.Generator().manual_seed(0), torch.float32)
    how = pinn.DERIVATIVES[derivatives]

    def step(u: nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in u.parameters():
                p.grad = None
            loss().backward()

        run.module = u  # the pricer whose gradients the step leaves (for the tests)
        return run

    steps = {
        "manual": step(ours, lambda: pinn.pde_loss(ours, batch, how)),
        "native": step(twin, lambda: pinn.pde_loss(twin, batch, how)),
    }
    if compile:
        compiled = torch.compile(lambda: pinn.pde_loss(twin, batch, how))
        steps["compiled"] = step(twin, compiled)
    return steps


def hvp_steps(sizes: Sequence[int], batch: int, how: str, compile: bool) -> dict[str, Callable]:
    """Name -> one Hessian-vector product H v of an MSE loss in the parameters.

    ``how`` is ``"reverse over reverse"`` (a backward through the gradient, ``create_graph=True``)
    or ``"forward over reverse"`` (``torch.func.jvp`` of ``torch.func.grad``).
    """
    from torch_backprop import BackpropMLP

    torch.manual_seed(0)
    model = BackpropMLP(list(sizes), "tanh")
    twin = model.to_sequential()
    x, y = torch.randn(batch, sizes[0]), torch.randn(batch, sizes[-1])
    vector = [torch.randn_like(p) for p in model.parameters()]

    def reverse_over_reverse(module: nn.Module) -> Callable[[], list[torch.Tensor]]:
        params = list(module.parameters())

        def run() -> list[torch.Tensor]:
            loss = (module(x) - y).square().mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
            return list(torch.autograd.grad(dot, params))

        return run

    def forward_over_reverse(module: nn.Module) -> Callable[[], Any]:
        values = {name: p.detach() for name, p in module.named_parameters()}
        tangents = dict(zip(values, vector, strict=True))

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return (torch.func.functional_call(module, params, (x,)) - y).square().mean()

        def run() -> Any:
            return torch.func.jvp(torch.func.grad(loss), (values,), (tangents,))[1]

        return run

    make = reverse_over_reverse if how == "reverse over reverse" else forward_over_reverse
    steps = {"manual": make(model), "native": make(twin)}
    if compile:
        steps["compiled"] = torch.compile(make(model.to_sequential()))
    return steps


def check(steps: dict[str, Callable]) -> dict[str, str]:
    """Run each contender once (compiling it); name -> error message for those that fail (dropped)."""
    failed = {}
    for name in list(steps):
        try:
            steps[name]()
        except Exception as error:  # noqa: BLE001 - reported in the table
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            del steps[name]
    return failed


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload's medians and ratios (``manual / native``, ``manual / compiled``)."""
    pinn = load_pinn()
    hidden = [int(w) for w in args.hidden.split("-")]
    hvp_sizes = [int(w) for w in args.hvp_sizes.split("-")]
    workloads = {
        "pde double backward": lambda: pde_steps(pinn, hidden, args.points, "double backward", args.compile),
        "pde forward over reverse": lambda: pde_steps(
            pinn, hidden, args.points, "forward over reverse", args.compile
        ),
        "hvp reverse over reverse": lambda: hvp_steps(
            hvp_sizes, args.hvp_batch, "reverse over reverse", args.compile
        ),
        "hvp forward over reverse": lambda: hvp_steps(
            hvp_sizes, args.hvp_batch, "forward over reverse", args.compile
        ),
    }
    results = {}
    with threads(args.threads):
        for name, make in workloads.items():
            steps = make()
            failed = check(steps)
            medians = interleaved_medians(
                steps,
                rounds=args.rounds,
                min_run_time=args.min_run_time,
                threads=args.threads,
                label=name,
                timer=args.timer,
            )
            row = {k: v["median_s"] for k, v in medians.items()}
            results[name] = {"median_s": row, "rounds_s": {k: v["rounds_s"] for k, v in medians.items()}}
            results[name]["failed"] = failed
    return {"machine": machine_info("cpu", args.threads), "args": vars(args), "workloads": results}


def table(report: dict[str, Any]) -> str:
    """The report as a text table: medians in ms and the two ratios."""
    rows = [["workload", "manual ms", "native ms", "compiled ms", "manual/native", "manual/compiled"]]
    for name, result in report["workloads"].items():
        m = result["median_s"]
        ms = [f"{1e3 * m[k]:.3g}" if k in m else "n/a" for k in ("manual", "native", "compiled")]
        native = f"{m['manual'] / m['native']:.3f}" if {"manual", "native"} <= set(m) else "n/a"
        compiled = f"{m['manual'] / m['compiled']:.3f}" if {"manual", "compiled"} <= set(m) else "n/a"
        rows.append([name, *ms, native, compiled])
    lines = [format_table(rows)]
    for name, result in report["workloads"].items():
        for contender, message in result["failed"].items():
            lines.append(f"{name}, {contender} failed: {message}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="48-48-48", help="the PINN's hidden widths")
    parser.add_argument("--points", type=int, default=512, help="interior collocation points")
    parser.add_argument("--hvp-sizes", default="64-128-128-10", help="the Hessian-vector product's sizes")
    parser.add_argument("--hvp-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument(
        "--timer", choices=list(TIMERS), default="wall", help="cpu: steadier on a busy machine"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
