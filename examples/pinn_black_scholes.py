r"""A physics-informed BackpropMLP: the Black-Scholes PDE for a European call, solved by the network.

The network u(t, S) is the call's price at time t and spot S. No prices are given to it: the loss
holds the PDE residual at random collocation points, and the terminal and boundary conditions,

    R = u_t + ½ σ² S² u_SS + r S u_S - r u                     (0 < t < T, 0 < S < S_max)
    u(T, S) = max(S - K, 0),  u(t, 0) = 0,  u(t, S_max) = S_max - K e^{-r (T - t)},
    loss = mean R² + 10 mean (terminal error)² + mean (boundary errors)²,

with the terminal condition, which carries the contract, weighted 10. Each step takes first and
second derivatives of the network in its input inside the loss, then a backward through them to
the parameters. u_SS comes either from a second backward (double backward)
or from forward mode over the first backward (forward-over-reverse: ``torch.func.jvp`` of the input
gradient along e_S); both are timed. The learned surface is compared with the closed-form price

    C = S Φ(d1) - K e^{-r τ} Φ(d2),  d1 = (ln(S/K) + (r + σ²/2) τ) / (σ √τ),  d2 = d1 - σ √τ,  τ = T - t,

and the native twin ``model.to_sequential()``, from the same initial parameters, is trained the same
way on the same points as the reference.

    python examples/pinn_black_scholes.py                # 3000 steps
    python examples/pinn_black_scholes.py --steps 300    # quick
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from torch_backprop import BackpropMLP


@dataclass(frozen=True)
class Contract:
    """A European call and its market: strike K, maturity T, rate r, volatility σ; S in [0, S_max]."""

    strike: float = 1.0
    maturity: float = 1.0
    rate: float = 0.05
    volatility: float = 0.2
    spot_max: float = 3.0


def call_price(t: Tensor, spot: Tensor, c: Contract) -> Tensor:
    """The closed-form Black-Scholes price of the call at (t, S); the payoff at τ = 0."""
    tau = (c.maturity - t).clamp_min(1e-12)
    root = c.volatility * tau.sqrt()
    d1 = (torch.log(spot.clamp_min(1e-12) / c.strike) + (c.rate + 0.5 * c.volatility**2) * tau) / root
    d2 = d1 - root
    price = spot * torch.special.ndtr(d1) - c.strike * torch.exp(-c.rate * tau) * torch.special.ndtr(d2)
    return torch.where(tau > 1e-12, price, (spot - c.strike).clamp_min(0))


class Pricer(nn.Module):
    """u(t, S): the network on (t, S) scaled to [-1, 1]², so that derivatives are in t and S themselves."""

    def __init__(self, net: nn.Module, contract: Contract) -> None:
        super().__init__()
        self.net, self.contract = net, contract

    def forward(self, points: Tensor) -> Tensor:
        scale = points.new_tensor([2 / self.contract.maturity, 2 / self.contract.spot_max])
        return self.net(points * scale - 1).squeeze(-1)


def derivatives_double_backward(u: nn.Module, points: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(u, u_t, u_S, u_SS) at ``points`` (N, 2): u_SS by a second backward through the first."""
    points = points.detach().requires_grad_()
    value = u(points)
    (first,) = torch.autograd.grad(value.sum(), points, create_graph=True)
    (second,) = torch.autograd.grad(first[:, 1].sum(), points, create_graph=True)
    return value, first[:, 0], first[:, 1], second[:, 1]


def derivatives_forward_over_reverse(u: nn.Module, points: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(u, u_t, u_S, u_SS) at ``points``: u_SS as the forward-mode derivative of ∇u along e_S."""
    e_spot = torch.zeros_like(points)
    e_spot[:, 1] = 1

    def gradient(p: Tensor) -> tuple[Tensor, Tensor]:
        value, pullback = vjp(u, p)
        return pullback(torch.ones_like(value))[0], value

    first, second, value = jvp(gradient, (points.detach(),), (e_spot,), has_aux=True)
    return value, first[:, 0], first[:, 1], second[:, 1]


DERIVATIVES: dict[str, Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]] = {
    "double backward": derivatives_double_backward,
    "forward over reverse": derivatives_forward_over_reverse,
}


@dataclass(frozen=True)
class Points:
    """One step's collocation points: interior (N, 2), terminal (M, 2), S = 0 and S = S_max (M, 2)."""

    interior: Tensor
    terminal: Tensor
    low: Tensor
    high: Tensor


def sample_points(c: Contract, count: int, generator: torch.Generator, dtype: torch.dtype) -> Points:
    """``count`` interior points and ``count // 4`` on each of the terminal and boundary lines."""
    edge = max(count // 4, 1)
    box = torch.tensor([c.maturity, c.spot_max], dtype=dtype)
    interior = torch.rand(count, 2, generator=generator, dtype=dtype) * box
    line = torch.rand(edge, 2, generator=generator, dtype=dtype) * box
    terminal = torch.stack([torch.full((edge,), c.maturity, dtype=dtype), line[:, 1]], 1)
    low = torch.stack([line[:, 0], torch.zeros(edge, dtype=dtype)], 1)
    high = torch.stack([line[:, 0], torch.full((edge,), c.spot_max, dtype=dtype)], 1)
    return Points(interior, terminal, low, high)


def pde_loss(u: Pricer, points: Points, derivatives: Callable) -> Tensor:
    """The loss: mean R² over the interior plus the terminal (weight 10) and boundary squared errors."""
    c = u.contract
    value, u_t, u_s, u_ss = derivatives(u, points.interior)
    spot = points.interior[:, 1]
    residual = u_t + 0.5 * c.volatility**2 * spot**2 * u_ss + c.rate * spot * u_s - c.rate * value
    payoff = (points.terminal[:, 1] - c.strike).clamp_min(0)
    far = c.spot_max - c.strike * torch.exp(-c.rate * (c.maturity - points.high[:, 0]))
    return (
        residual.square().mean()
        + 10 * (u(points.terminal) - payoff).square().mean()
        + u(points.low).square().mean()
        + (u(points.high) - far).square().mean()
    )


def make_pricers(
    c: Contract, hidden: Sequence[int], activation: str, dtype: torch.dtype, seed: int
) -> tuple[Pricer, Pricer]:
    """A BackpropMLP pricer and its native twin with the same initial parameters."""
    torch.manual_seed(seed)
    model = BackpropMLP([2, *hidden, 1], activation, dtype=dtype)
    return Pricer(model, c), Pricer(model.to_sequential(), c)


def price_errors(u: Pricer, grid_size: int = 41) -> dict[str, float]:
    """Max and RMS error against the closed form on a grid of t in [0, 0.9 T], S in [0.25 K, 2 K]."""
    c = u.contract
    dtype = next(u.parameters()).dtype
    t = torch.linspace(0, 0.9 * c.maturity, grid_size, dtype=dtype)
    spot = torch.linspace(0.25 * c.strike, 2 * c.strike, grid_size, dtype=dtype)
    grid = torch.cartesian_prod(t, spot)
    with torch.no_grad():
        error = u(grid) - call_price(grid[:, 0], grid[:, 1], c)
        at_the_money = u(grid.new_tensor([[0.0, c.strike]])).item()
    return {
        "max_error": error.abs().max().item(),
        "rms_error": error.square().mean().sqrt().item(),
        "at_the_money": at_the_money,
        "at_the_money_exact": call_price(grid.new_tensor([0.0]), grid.new_tensor([c.strike]), c).item(),
    }


def train(
    u: Pricer, steps: int, points: int, lr: float, seed: int, derivatives: Callable, log_every: int = 0
) -> list[float]:
    """Adam with a cosine schedule on fresh collocation points each step (drawn from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(u.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    dtype = next(u.parameters()).dtype
    losses = []
    for step in range(steps):
        batch = sample_points(u.contract, points, generator, dtype)
        optimizer.zero_grad()
        loss = pde_loss(u, batch, derivatives)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3e}")
    return losses


def time_step(u: Pricer, points: Points, derivatives: Callable, repeats: int) -> float:
    """Median seconds of one step's forward, input derivatives, loss and backward."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pde_loss(u, points, derivatives).backward()
        times.append(time.perf_counter() - start)
    u.zero_grad()
    return sorted(times)[len(times) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--points", type=int, default=512, help="interior collocation points per step")
    parser.add_argument("--hidden", type=int, nargs="+", default=[48, 48, 48])
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--derivatives", choices=list(DERIVATIVES), default="double backward")
    parser.add_argument("--float64", action="store_true", help="train in float64 (default float32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per way to u_SS")
    args = parser.parse_args(argv)
    dtype = torch.float64 if args.float64 else torch.float32
    contract = Contract()
    ours, twin = make_pricers(contract, args.hidden, args.activation, dtype, args.seed)
    reference = copy.deepcopy(ours)  # untrained, for timing the two ways to u_SS

    batch = sample_points(contract, args.points, torch.Generator().manual_seed(args.seed), dtype)
    print(f"one step (forward, u_t, u_S, u_SS, loss, backward), median of {args.repeats}:")
    for name, derivatives in DERIVATIVES.items():
        ms = {
            label: 1e3 * time_step(u, batch, derivatives, args.repeats)
            for label, u in [("ours", reference), ("twin", twin)]
        }
        print(f"  {name:21s} BackpropMLP {ms['ours']:7.2f} ms   twin {ms['twin']:7.2f} ms")

    derivatives = DERIVATIVES[args.derivatives]
    log_every = max(args.steps // 6, 1)
    print(f"BackpropMLP, u_SS by {args.derivatives}:")
    ours_losses = train(ours, args.steps, args.points, args.lr, args.seed, derivatives, log_every)
    print("native twin, same initial parameters and points:")
    twin_losses = train(twin, args.steps, args.points, args.lr, args.seed, derivatives, log_every)
    for label, u, losses in [("BackpropMLP", ours, ours_losses), ("native twin", twin, twin_losses)]:
        e = price_errors(u)
        print(
            f"{label}: final loss {losses[-1]:.2e}; price error against Black-Scholes on t in [0, 0.9], "
            f"S in [0.25, 2] (K = 1): max {e['max_error']:.2e}, RMS {e['rms_error']:.2e}; "
            f"at the money, t = 0: {e['at_the_money']:.4f} (exact {e['at_the_money_exact']:.4f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
