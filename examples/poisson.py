r"""A physics-informed BackpropMLP for the Poisson equation in d dimensions, Δu in one forward pass.

    -Δu = f  on Ω = [0, 1]^d,   u = g = u*  on ∂Ω,
    loss = mean over interior points of ((Δu + f) / s)² + mean over boundary points of (u - g)²,

with one of three known solutions u* (``--solution``):

* ``cosines`` (default): u*(x) = Σ_i cos(π x_i), so f = π² u*, and s = π² puts both terms in units
  of u: the sum-of-cosines problem of the KFAC-for-PINNs experiments (Dangel, Müller, Zeinhofer 2024);
* ``sines``: u*(x) = Σ_i sin(π x_i), f = π² u*, s = π²;
* ``products``: u*(x) = Σ_{i < d/2} x_{2i} x_{2i+1} (d even), a harmonic polynomial (f = 0, s = 1):
  the high-dimensional problem of E and Yu's Deep Ritz method.

Each step draws fresh points: interior ones uniform in Ω, boundary ones uniform in Ω with one random
coordinate set to 0 or 1. Δu comes from ``torch_backprop.laplacian``: u, ∇u and Δu carried up the
stack in one forward pass (TY1-TY4 of ``torch_backprop.pde.taylor``), and the loss's backward is
the adjoint recursion TA1-TA5, no nested backward. The run reports the relative L2 error
‖u - u*‖ / ‖u*‖ on fresh points, and checks Δu against ``torch.func.hessian`` of the native twin.

With ``--optimizer engd`` the same loss is minimised by energy natural gradient descent
(``torch_backprop.ENGD``): the residuals' Jacobian from one Taylor pass and one adjoint pass
(``torch_backprop.residual_jacobian``), the Gauss–Newton step solved in float64, the grid line search;
ENGD trains in float64. ``--optimizer kfac`` takes ``torch_backprop.KFAC`` instead: the same tapes,
their Kronecker factors per layer inverted exactly, the automatic step size and momentum; also float64.

    python examples/poisson.py --dim 10               # u* = Σ cos(π x_i), 3000 steps
    python examples/poisson.py --dim 100
    python examples/poisson.py --dim 10 --optimizer engd
    python examples/poisson.py --dim 10 --optimizer kfac
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_backprop import ENGD, KFAC, BackpropMLP, laplacian, residual_jacobian
from torch_backprop.activations import available_activations
from torch_backprop.cli import options


@dataclass(frozen=True)
class Problem:
    """A Poisson problem with a known solution: u*, f = -Δu*, and the residual's scale s."""

    name: str
    exact: Callable[[Tensor], Tensor]  # u*(x), (N, d) -> (N,)
    source: Callable[[Tensor], Tensor]  # f(x) = -Δu*(x), (N,)
    scale: float


def _sines(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x).sum(-1)  # Σ_i sin(π x_i)


def _products(x: Tensor) -> Tensor:
    return x.unflatten(-1, (-1, 2)).prod(-1).sum(-1)  # Σ_i x_{2i} x_{2i+1}


def _cosines(x: Tensor) -> Tensor:
    return torch.cos(math.pi * x).sum(-1)  # Σ_i cos(π x_i)


PROBLEMS = {
    "cosines": Problem("u* = Σ cos(π x_i)", _cosines, lambda x: math.pi**2 * _cosines(x), math.pi**2),
    "sines": Problem("u* = Σ sin(π x_i)", _sines, lambda x: math.pi**2 * _sines(x), math.pi**2),
    "products": Problem("u* = Σ x_{2i} x_{2i+1}", _products, lambda x: x.new_zeros(x.shape[:-1]), 1.0),
}


def sample_points(
    dim: int, count: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``count`` interior points and ``count`` boundary points of [0, 1]^dim."""
    interior = torch.rand(count, dim, generator=generator, dtype=dtype)
    boundary = torch.rand(count, dim, generator=generator, dtype=dtype)
    side = torch.randint(dim, (count,), generator=generator)
    boundary[torch.arange(count), side] = torch.randint(2, (count,), generator=generator).to(dtype)
    return interior, boundary


def poisson_loss(model: BackpropMLP, problem: Problem, interior: Tensor, boundary: Tensor) -> Tensor:
    """Mean squared residual (Δu + f) / s over the interior plus mean squared error u - g on the boundary."""
    lap = laplacian(model, interior).operator[:, 0]
    residual = (lap + problem.source(interior)) / problem.scale
    return residual.square().mean() + (model(boundary)[:, 0] - problem.exact(boundary)).square().mean()


def relative_error(model: BackpropMLP, problem: Problem, dim: int, count: int = 4096, seed: int = 1) -> float:
    """‖u - u*‖ / ‖u*‖ over ``count`` fresh uniform points of [0, 1]^dim."""
    dtype = model.layers[0].weight.dtype
    x = torch.rand(count, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        error = model(x)[:, 0] - problem.exact(x)
    return (error.norm() / problem.exact(x).norm()).item()


def train(
    model: BackpropMLP,
    problem: Problem,
    dim: int,
    steps: int,
    points: int,
    lr: float,
    seed: int,
    log_every: int = 0,
) -> list[float]:
    """Adam with a cosine schedule on fresh points each step (drawn from ``seed``); the losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    dtype = model.layers[0].weight.dtype
    losses = []
    for step in range(steps):
        interior, boundary = sample_points(dim, points, generator, dtype)
        optimizer.zero_grad()
        loss = poisson_loss(model, problem, interior, boundary)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            error = relative_error(model, problem, dim)
            print(f"step {step:5d}  loss {loss.item():.3e}  relative L2 error {error:.2e}")
    return losses


def train_engd(
    model: BackpropMLP,
    problem: Problem,
    dim: int,
    steps: int,
    points: int,
    seed: int,
    log_every: int = 0,
    kfac: bool = False,
) -> list[float]:
    """ENGD (or KFAC) on fresh points each step (drawn from ``seed``), the terms of ``poisson_loss``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = KFAC(model.parameters(), damping=1e-8) if kfac else ENGD(model.parameters())
    dtype = model.layers[0].weight.dtype

    def interior(x: Tensor, d) -> Tensor:
        return (d.operator[:, 0] + problem.source(x)) / problem.scale  # (Δu + f) / s

    def boundary(x: Tensor, d) -> Tensor:
        return d.value[:, 0] - problem.exact(x)  # u - g

    losses = []
    for step in range(steps):
        inside, edge = sample_points(dim, points, generator, dtype)
        # weight 2: ENGD's terms are ½ mean r², poisson_loss's mean r²
        loss = optimizer.step(
            lambda: [
                residual_jacobian(model, inside, interior, weight=2.0),  # noqa: B023
                residual_jacobian(model, edge, boundary, order=0, weight=2.0),  # noqa: B023
            ]
        )
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            error = relative_error(model, problem, dim)
            print(f"step {step:5d}  loss {loss.item():.3e}  relative L2 error {error:.2e}")
    return losses


def laplacian_check(model: BackpropMLP, dim: int, count: int = 16) -> float:
    """Max |Δu - tr ∇²u| on ``count`` points, ∇²u by torch.func.hessian of the native twin."""
    twin = model.to_sequential()
    x = torch.rand(count, dim, generator=torch.Generator().manual_seed(2), dtype=model.layers[0].weight.dtype)
    with torch.no_grad():
        ours = laplacian(model, x).operator[:, 0]
    with warnings.catch_warnings():  # torch.func's forward mode registers decompositions with jit.script
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        hessians = torch.func.vmap(torch.func.hessian(lambda p: twin(p)[0]))(x)
    return (ours - hessians.diagonal(dim1=-2, dim2=-1).sum(-1)).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/poisson.py", __doc__)
    count = options.number(int, low=1)
    parser.add_argument("--dim", type=count, default=10, help="d, the dimension of the domain")
    parser.add_argument(
        "--solution", choices=list(PROBLEMS), default="cosines", help="the known solution u* (see above)"
    )
    options.add_widths(parser, "--hidden", default=[64, 64, 64], help="hidden widths", example="64,64,64")
    parser.add_argument(
        "--activation",
        choices=available_activations(),
        default="tanh",
        help="hidden activation (smooth: Δu needs σ'')",
    )
    parser.add_argument("--steps", type=options.number(int, low=0), default=3000, help="training steps")
    parser.add_argument("--points", type=count, default=256, help="interior and boundary points per step")
    parser.add_argument(
        "--lr", type=options.number(float, low=0, low_open=True), default=2e-3, help="Adam's initial lr"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the points")
    parser.add_argument(
        "--float64", action="store_true", help="train in float64 (default: float32; ENGD, KFAC: float64)"
    )
    parser.add_argument(
        "--optimizer", choices=["adam", "engd", "kfac"], default="adam", help="Adam, ENGD or KFAC"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.solution == "products" and args.dim % 2:
        parser.error(f"--solution products pairs the coordinates: expected an even --dim, got {args.dim}")
    problem = PROBLEMS[args.solution]
    dtype = torch.float64 if args.float64 or args.optimizer != "adam" else torch.float32
    torch.manual_seed(args.seed)
    model = BackpropMLP([args.dim, *args.hidden, 1], args.activation, dtype=dtype)
    print(f"Poisson on [0, 1]^{args.dim}, {problem.name}; BackpropMLP {model.sizes} {args.activation}")
    start = time.perf_counter()
    log_every = max(args.steps // 6, 1)
    if args.optimizer != "adam":
        kfac = args.optimizer == "kfac"
        losses = train_engd(model, problem, args.dim, args.steps, args.points, args.seed, log_every, kfac)
    else:
        losses = train(model, problem, args.dim, args.steps, args.points, args.lr, args.seed, log_every)
    seconds = time.perf_counter() - start
    error = relative_error(model, problem, args.dim)
    print(
        f"final loss {losses[-1] if losses else float('nan'):.3e}; relative L2 error {error:.3e} on 4096 "
        f"fresh points; {seconds:.1f} s ({1e3 * seconds / max(args.steps, 1):.2f} ms a step)"
    )
    check = laplacian_check(model, args.dim)
    print(f"Δu against torch.func.hessian of the native twin: max difference {check:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
