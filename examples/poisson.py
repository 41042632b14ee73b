r"""A physics-informed BackpropMLP for the Poisson equation in d dimensions, Δu in one forward pass.

The problem, with a known solution (a sum of one-dimensional waves, as in the Poisson experiments of
physics-informed network papers):

    -Δu = f  on Ω = [0, 1]^d,   u = g  on ∂Ω,   u*(x) = Σ_i sin(π x_i),  so f = π² u* and g = u*,
    loss = mean over interior points of ((Δu + f) / π²)² + mean over boundary points of (u - g)²,

with the residual divided by π² so that both terms are in units of u.

Each step draws fresh points: interior ones uniform in Ω, boundary ones uniform in Ω with one random
coordinate set to 0 or 1. Δu comes from ``torch_backprop.laplacian``: u, ∇u and Δu carried up the
stack in one forward pass (TY1-TY4 of ``torch_backprop.pde.taylor``), and the loss's backward is
the adjoint recursion TA1-TA5, no nested backward. The run reports the relative L2 error
‖u - u*‖ / ‖u*‖ on fresh points, and checks Δu against ``torch.func.hessian`` of the native twin.

    python examples/poisson.py --dim 10              # 3000 steps
    python examples/poisson.py --dim 100 --steps 3000
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_backprop import BackpropMLP, laplacian


def exact(x: Tensor) -> Tensor:
    """u*(x) = Σ_i sin(π x_i), (N,)."""
    return torch.sin(math.pi * x).sum(-1)


def source(x: Tensor) -> Tensor:
    """F = -Δu* = π² Σ_i sin(π x_i), (N,)."""
    return math.pi**2 * exact(x)


def sample_points(
    dim: int, count: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``count`` interior points and ``count`` boundary points of [0, 1]^dim."""
    interior = torch.rand(count, dim, generator=generator, dtype=dtype)
    boundary = torch.rand(count, dim, generator=generator, dtype=dtype)
    side = torch.randint(dim, (count,), generator=generator)
    boundary[torch.arange(count), side] = torch.randint(2, (count,), generator=generator).to(dtype)
    return interior, boundary


def poisson_loss(model: BackpropMLP, interior: Tensor, boundary: Tensor) -> Tensor:
    """Mean squared residual (Δu + f) / π² over the interior plus mean squared error u - g on the boundary."""
    lap = laplacian(model, interior).operator[:, 0]
    residual = (lap + source(interior)) / math.pi**2  # in units of u: f is π² times u*'s size
    return residual.square().mean() + (model(boundary)[:, 0] - exact(boundary)).square().mean()


def relative_error(model: BackpropMLP, dim: int, count: int = 4096, seed: int = 1) -> float:
    """‖u - u*‖ / ‖u*‖ over ``count`` fresh uniform points of [0, 1]^dim."""
    dtype = model.layers[0].weight.dtype
    x = torch.rand(count, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        error = model(x)[:, 0] - exact(x)
    return (error.norm() / exact(x).norm()).item()


def train(
    model: BackpropMLP, dim: int, steps: int, points: int, lr: float, seed: int, log_every: int = 0
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
        loss = poisson_loss(model, interior, boundary)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            error = relative_error(model, dim)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=10, help="d, the dimension of the domain")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--points", type=int, default=256, help="interior and boundary points per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="train in float64 (default float32)")
    args = parser.parse_args(argv)
    if args.dim < 1 or args.steps < 0 or args.points < 1:
        given = f"{args.dim}, {args.steps}, {args.points}"
        parser.error(f"expected --dim >= 1, --steps >= 0, --points >= 1, got {given}")
    dtype = torch.float64 if args.float64 else torch.float32
    torch.manual_seed(args.seed)
    model = BackpropMLP([args.dim, *args.hidden, 1], args.activation, dtype=dtype)
    print(f"Poisson on [0, 1]^{args.dim}, u* = Σ sin(π x_i); BackpropMLP {model.sizes} {args.activation}")
    start = time.perf_counter()
    losses = train(model, args.dim, args.steps, args.points, args.lr, args.seed, max(args.steps // 6, 1))
    seconds = time.perf_counter() - start
    print(
        f"final loss {losses[-1] if losses else float('nan'):.3e}; relative L2 error "
        f"{relative_error(model, args.dim):.3e} on 4096 fresh points; {seconds:.1f} s "
        f"({1e3 * seconds / max(args.steps, 1):.2f} ms a step)"
    )
    check = laplacian_check(model, args.dim)
    print(f"Δu against torch.func.hessian of the native twin: max difference {check:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
