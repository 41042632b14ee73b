"""Input derivatives for physics-informed training: BackpropMLP's one forward pass against nested autograd.

Every workload is timed in interleaved rotated rounds (``torch_backprop.cli.timing.interleaved_medians``)
for contenders with the same parameters: ``manual`` (BackpropMLP, the derivatives in one forward pass,
``torch_backprop.pde``), the native twin ``to_sequential()`` under plain autograd by ``double backward``
(∇u by a backward with ``create_graph=True``, then one more backward per second derivative) and by
``forward over reverse`` (``torch.func``: jvp of the input gradient, vmapped over the directions),
``compiled`` (``torch.compile`` of the twin's forward-over-reverse workload; a double backward through
``autograd.grad`` does not compile) and ``manual compiled`` (``torch.compile`` of ours). Compile
time is excluded. The workloads:

* ``black-scholes step``: one training step of ``examples/pinn_black_scholes.py`` (``[2, 48, 48,
  48, 1]`` tanh, float32; 512 interior points and 128 on each edge): R = u_t + r S u_S + ½σ²S² u_SS
  - r u, the terminal and boundary losses, backward to the parameters;
* ``laplacian d=D w=W``: u and Δu of ``[D, W, W, W, 1]`` tanh at ``--laplacian-points`` points,
  float32, with the parameters requiring grad (as inside a training step);
* ``poisson step d=D w=W``: one training step of ``examples/poisson.py`` (u* = Σ cos(π x_i)) on the
  same network: the residual (Δu + f) / π² at as many interior points and u - g at as many boundary
  points, backward;
* ``hvp ...``: a Hessian-vector product H v of an MSE in the parameters, by a backward through the
  gradient (reverse over reverse) or ``torch.func.jvp`` of ``torch.func.grad`` (forward over reverse).

Ratios: ``manual / native`` against the faster of the twin's two eager methods, ``manual /
compiled``, ``manual compiled / compiled``. Run from the repository root:

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
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp, vmap

from torch_backprop import BackpropMLP, laplacian
from torch_backprop.cli.files import write_json
from torch_backprop.cli.timing import TIMERS, interleaved_medians, machine_info, threads
from torch_backprop.testing import format_table

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ("double backward", "forward over reverse")


def load_example(name: str) -> Any:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_pinn() -> Any:
    """``examples/pinn_black_scholes.py`` as a module."""
    return load_example("pinn_black_scholes")


def training_step(module: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], None]:
    """One step: gradients dropped, the loss, its backward (the optimiser's update is not timed)."""

    def run() -> None:
        for p in module.parameters():
            p.grad = None
        loss().backward()

    run.module = module  # the module whose gradients the step leaves (for the tests)
    return run


# ---------------------------------------------------------------------------------------------
# The Black-Scholes PINN step (examples/pinn_black_scholes.py).


def black_scholes_steps(pinn: Any, hidden: Sequence[int], points: int, compile: bool) -> dict[str, Callable]:
    """Name -> one training step of the Black-Scholes PINN."""
    contract = pinn.Contract()
    ours, twin = pinn.make_pricers(contract, hidden, "tanh", torch.float32, seed=0)
    batch = pinn.sample_points(contract, points, torch.Generator().manual_seed(0), torch.float32)

    def loss(u: nn.Module, way: str) -> Callable[[], Tensor]:
        return lambda: pinn.pde_loss(u, batch, pinn.RESIDUALS[way])

    steps = {"manual": training_step(ours, loss(ours, "one forward pass"))}
    steps.update({way: training_step(twin, loss(twin, way)) for way in NATIVE})
    if compile:
        steps["compiled"] = training_step(twin, torch.compile(loss(twin, "forward over reverse")))
        steps["manual compiled"] = training_step(ours, torch.compile(loss(ours, "one forward pass")))
    return steps


# ---------------------------------------------------------------------------------------------
# The Laplacian and the Poisson step (examples/poisson.py) for the twin: nested autograd.


def laplacian_double_backward(u: nn.Module, x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """(u, Δu), (N,) each: ∇u by a backward, then ∂²u/∂x_i² by one backward per coordinate."""
    x = x.detach().requires_grad_()
    value = u(x)[:, 0]
    (first,) = torch.autograd.grad(value.sum(), x, create_graph=True)
    total = torch.zeros_like(value)
    for i in range(x.shape[1]):
        (second,) = torch.autograd.grad(first[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + second[:, i]
    return value, total


def laplacian_forward_over_reverse(u: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(u, Δu): the trace of ``torch.func.hessian`` (jvp of the input gradient along each e_i), per point."""
    params = dict(u.named_parameters())

    def scalar(point: Tensor) -> Tensor:
        return functional_call(u, params, (point,))[0]

    return u(x)[:, 0], vmap(lambda p: torch.trace(hessian(scalar)(p)))(x)


def laplacian_ours(model: BackpropMLP, x: Tensor) -> tuple[Tensor, Tensor]:
    """(u, Δu) in one forward pass."""
    value, _, lap = laplacian(model, x)
    return value[:, 0], lap[:, 0]


def laplacian_steps(
    poisson: Any, dim: int, width: int, points: int, train: bool, compile: bool
) -> dict[str, Callable]:
    """Name -> Δu at ``points`` points (``train=False``), or one Poisson training step (``train=True``)."""
    torch.manual_seed(0)
    model = BackpropMLP([dim, width, width, width, 1], "tanh")
    twin = model.to_sequential()
    interior, boundary = poisson.sample_points(dim, points, torch.Generator().manual_seed(0), torch.float32)
    ways: dict[str, tuple[nn.Module, Callable[[], tuple[Tensor, Tensor]]]] = {
        "manual": (model, lambda: laplacian_ours(model, interior)),
        "double backward": (twin, lambda: laplacian_double_backward(twin, interior, create_graph=train)),
        "forward over reverse": (twin, lambda: laplacian_forward_over_reverse(twin, interior)),
    }

    problem = poisson.PROBLEMS["cosines"]

    def poisson_loss(u: nn.Module, operator: Callable[[], tuple[Tensor, Tensor]]) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            residual = (operator()[1] + problem.source(interior)) / problem.scale
            return residual.square().mean() + (u(boundary)[:, 0] - problem.exact(boundary)).square().mean()

        return loss

    if train:
        steps = {name: training_step(u, poisson_loss(u, operator)) for name, (u, operator) in ways.items()}
    else:
        steps = {name: operator for name, (_, operator) in ways.items()}
    if compile:
        for name, source in (("compiled", "forward over reverse"), ("manual compiled", "manual")):
            u, operator = ways[source]
            if train:
                steps[name] = training_step(u, torch.compile(poisson_loss(u, operator)))
            else:
                steps[name] = torch.compile(operator)
    return steps


# ---------------------------------------------------------------------------------------------
# Hessian-vector products in the parameters.


def hvp_steps(sizes: Sequence[int], batch: int, how: str, compile: bool) -> dict[str, Callable]:
    """Name -> one Hessian-vector product H v of an MSE loss in the parameters.

    ``how`` is ``"reverse over reverse"`` (a backward through the gradient, ``create_graph=True``)
    or ``"forward over reverse"`` (``torch.func.jvp`` of ``torch.func.grad``).
    """
    torch.manual_seed(0)
    model = BackpropMLP(list(sizes), "tanh")
    twin = model.to_sequential()
    x, y = torch.randn(batch, sizes[0]), torch.randn(batch, sizes[-1])
    vector = [torch.randn_like(p) for p in model.parameters()]

    def reverse_over_reverse(module: nn.Module) -> Callable[[], list[Tensor]]:
        params = list(module.parameters())

        def run() -> list[Tensor]:
            loss = (module(x) - y).square().mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
            return list(torch.autograd.grad(dot, params))

        return run

    def forward_over_reverse(module: nn.Module) -> Callable[[], Any]:
        values = {name: p.detach() for name, p in module.named_parameters()}
        tangents = dict(zip(values, vector, strict=True))

        def loss(params: dict[str, Tensor]) -> Tensor:
            return (functional_call(module, params, (x,)) - y).square().mean()

        def run() -> Any:
            return jvp(grad(loss), (values,), (tangents,))[1]

        return run

    make = reverse_over_reverse if how == "reverse over reverse" else forward_over_reverse
    steps = {"manual": make(model), how: make(twin)}
    if compile:
        steps["compiled"] = torch.compile(make(model.to_sequential()))
    return steps


# ---------------------------------------------------------------------------------------------
# Running and reporting.


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


def workloads(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Callable]]]:
    """Name -> a maker of that workload's contenders, in the order they are measured."""
    pinn, poisson = load_pinn(), load_example("poisson")
    hidden = [int(w) for w in args.hidden.split("-")]
    found: dict[str, Callable[[], dict[str, Callable]]] = {
        "black-scholes step": lambda: black_scholes_steps(pinn, hidden, args.points, args.compile)
    }
    for dim in (int(d) for d in args.dims.split(",")):
        for width in (int(w) for w in args.widths.split(",")):
            for train, kind in ((False, "laplacian"), (True, "poisson step")):
                found[f"{kind} d={dim} w={width}"] = (
                    lambda dim=dim, width=width, train=train: laplacian_steps(
                        poisson, dim, width, args.laplacian_points, train, args.compile
                    )
                )
    hvp_sizes = [int(w) for w in args.hvp_sizes.split("-")]
    for how in ("reverse over reverse", "forward over reverse"):
        found[f"hvp {how}"] = lambda how=how: hvp_steps(hvp_sizes, args.hvp_batch, how, args.compile)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload's medians (seconds) and failures."""
    results = {}
    with threads(args.threads):
        for name, make in workloads(args).items():
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
            results[name] = {
                "median_s": {k: v["median_s"] for k, v in medians.items()},
                "rounds_s": {k: v["rounds_s"] for k, v in medians.items()},
                "failed": failed,
            }
            print(f"measured {name}", file=sys.stderr, flush=True)
    return {"machine": machine_info("cpu", args.threads), "args": vars(args), "workloads": results}


def ratios(medians: dict[str, float]) -> dict[str, float | None]:
    """The three ratios of a workload; ``None`` where a contender is missing.

    ``manual / native`` (against the faster eager method of the twin), ``manual / compiled``,
    ``manual compiled / compiled``.
    """
    native = [medians[k] for k in medians if k not in ("manual", "compiled", "manual compiled")]
    manual, compiled = medians.get("manual"), medians.get("compiled")
    return {
        "manual / native": manual / min(native) if manual and native else None,
        "manual / compiled": manual / compiled if manual and compiled else None,
        "manual compiled / compiled": (
            medians["manual compiled"] / compiled if "manual compiled" in medians and compiled else None
        ),
    }


def table(report: dict[str, Any]) -> str:
    """The report as a text table: medians in ms and the three ratios."""
    contenders = ["manual", "double backward", "forward over reverse", "reverse over reverse", "compiled"]
    contenders.append("manual compiled")
    header = ["workload", *(f"{c} ms" for c in contenders)]
    rows = [[*header, "manual/native", "manual/compiled", "compiled/compiled"]]
    for name, result in report["workloads"].items():
        m = result["median_s"]
        r = ratios(m)
        cells = [f"{1e3 * m[c]:.3g}" if c in m else "" for c in contenders]
        rows.append([name, *cells, *(f"{v:.3f}" if v is not None else "n/a" for v in r.values())])
    lines = [format_table(rows)]
    for name, result in report["workloads"].items():
        for contender, message in result["failed"].items():
            lines.append(f"{name}, {contender} failed: {message}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="48-48-48", help="the Black-Scholes PINN's hidden widths")
    parser.add_argument("--points", type=int, default=512, help="Black-Scholes interior collocation points")
    parser.add_argument("--dims", default="2,10,100", help="input dimensions of the Laplacian workloads")
    parser.add_argument("--widths", default="64,256", help="hidden widths of the Laplacian workloads")
    parser.add_argument("--laplacian-points", type=int, default=256, help="points of the Laplacian workloads")
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
