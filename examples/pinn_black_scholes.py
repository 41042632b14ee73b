r"""A physics-informed BackpropMLP: the Black-Scholes PDE for a European call, solved by the network.

The network u(t, S) is the call's price at time t and spot S. No prices are given to it: the loss
holds the PDE residual at random collocation points, and the terminal and boundary conditions,

    R = u_t + ½ σ² S² u_SS + r S u_S - r u                     (0 < t < T, 0 < S < S_max)
    u(T, S) = max(S - K, 0),  u(t, 0) = 0,  u(t, S_max) = S_max - K e^{-r (T - t)},
    loss = mean R² + 10 mean (terminal error)² + mean (boundary errors)²,

with the terminal condition, which carries the contract, weighted 10. Each step needs R, so first and
second derivatives of the network in its input inside the loss, then a backward through them to the
parameters. Three ways to R are timed:

* one forward pass (``torch_backprop.pde.input_derivatives``, the default for BackpropMLP): R is
  (D - r) u for the linear operator D = ∂_t + r S ∂_S + ½ σ² S² ∂²_S, whose first-order part costs
  nothing extra, so only ∂/∂S is carried up the stack beside u (TY1-TY4), and the backward is the
  adjoint recursion TA1-TA5;
* double backward: u_t and u_S by a backward (``create_graph=True``), u_SS by a second one;
* forward over reverse: u_SS as ``torch.func.jvp`` of the input gradient along e_S.

The native twin can only take the last two. The learned surface is compared with the closed-form price

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

from torch_backprop import BackpropMLP, input_derivatives
from torch_backprop.activations import available_activations
from torch_backprop.cli import options


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

    def scale(self, points: Tensor) -> Tensor:
        """The factors of x = points * scale - 1: ∂x/∂t and ∂x/∂S."""
        return points.new_tensor([2 / self.contract.maturity, 2 / self.contract.spot_max])

    def forward(self, points: Tensor) -> Tensor:
        return self.net(points * self.scale(points) - 1).squeeze(-1)


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


def residual_from_derivatives(derivatives: Callable) -> Callable[[Pricer, Tensor], Tensor]:
    """R = u_t + ½ σ² S² u_SS + r S u_S - r u at interior points, from (u, u_t, u_S, u_SS)."""

    def residual(u: Pricer, points: Tensor) -> Tensor:
        c = u.contract
        value, u_t, u_s, u_ss = derivatives(u, points)
        spot = points[:, 1]
        return u_t + 0.5 * c.volatility**2 * spot**2 * u_ss + c.rate * spot * u_s - c.rate * value

    return residual


def residual_one_pass(u: Pricer, points: Tensor) -> Tensor:
    """R = (D - r) u in one forward pass of the BackpropMLP, D = ∂_t + r S ∂_S + ½ σ² S² ∂²_S.

    The network sees x = points * scale - 1, so in x: D = scale_t ∂_{x_0} + r S scale_S ∂_{x_1}
    + ½ σ² S² scale_S² ∂²_{x_1}: second derivatives in x_1 alone, and a first-order term b.
    """
    c = u.contract
    scale, spot = u.scale(points), points[:, 1]
    drift = torch.stack([scale[0].expand_as(spot), c.rate * scale[1] * spot], 1)  # b, (N, 2)
    diffusion = (0.5 * c.volatility**2 * scale[1] ** 2) * spot.square()  # C_SS, (N,)
    value, _, operator = input_derivatives(
        u.net, points * scale - 1, [1], diagonal=diffusion.unsqueeze(1), drift=drift
    )
    return operator[:, 0] - c.rate * value[:, 0]


RESIDUALS: dict[str, Callable[[Pricer, Tensor], Tensor]] = {
    "one forward pass": residual_one_pass,
    **{name: residual_from_derivatives(derivatives) for name, derivatives in DERIVATIVES.items()},
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


def pde_loss(u: Pricer, points: Points, residual: Callable[[Pricer, Tensor], Tensor]) -> Tensor:
    """The loss: mean R² over the interior plus the terminal (weight 10) and boundary squared errors."""
    c = u.contract
    payoff = (points.terminal[:, 1] - c.strike).clamp_min(0)
    far = c.spot_max - c.strike * torch.exp(-c.rate * (c.maturity - points.high[:, 0]))
    return (
        residual(u, points.interior).square().mean()
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
    u: Pricer, steps: int, points: int, lr: float, seed: int, residual: Callable, log_every: int = 0
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
        loss = pde_loss(u, batch, residual)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3e}")
    return losses


def time_step(u: Pricer, points: Points, residual: Callable, repeats: int) -> float:
    """Median seconds of one step's forward, input derivatives, loss and backward."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pde_loss(u, points, residual).backward()
        times.append(time.perf_counter() - start)
    u.zero_grad()
    return sorted(times)[len(times) // 2]


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/pinn_black_scholes.py", __doc__)
    count = options.number(int, low=1)
    parser.add_argument("--steps", type=count, default=3000, help="training steps, fresh points each")
    parser.add_argument("--points", type=count, default=512, help="interior collocation points per step")
    options.add_widths(parser, "--hidden", default=[48, 48, 48], help="hidden widths", example="48,48,48")
    parser.add_argument(
        "--activation",
        choices=available_activations(),
        default="tanh",
        help="hidden activation (smooth: R needs u_SS)",
    )
    parser.add_argument(
        "--lr", type=options.number(float, low=0, low_open=True), default=3e-3, help="Adam's initial lr"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the points")
    parser.add_argument(
        "--derivatives",
        choices=list(RESIDUALS),
        default="one forward pass",
        help="how BackpropMLP gets R (the twin uses double backward where this is 'one forward pass')",
    )
    parser.add_argument("--float64", action="store_true", help="train in float64 (default: float32)")
    parser.add_argument("--repeats", type=count, default=20, help="timed steps per way to u_SS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = torch.float64 if args.float64 else torch.float32
    contract = Contract()
    ours, twin = make_pricers(contract, args.hidden, args.activation, dtype, args.seed)
    reference = copy.deepcopy(ours)  # untrained, for timing the two ways to u_SS

    batch = sample_points(contract, args.points, torch.Generator().manual_seed(args.seed), dtype)
    print(f"one step (forward, R, loss, backward), median of {args.repeats}:")
    for name, residual in RESIDUALS.items():
        ours_ms = 1e3 * time_step(reference, batch, residual, args.repeats)
        twin_ms = "    n/a"  # the one-forward-pass operator needs a BackpropMLP
        if name != "one forward pass":
            twin_ms = f"{1e3 * time_step(twin, batch, residual, args.repeats):7.2f}"
        print(f"  {name:21s} BackpropMLP {ours_ms:7.2f} ms   twin {twin_ms} ms")

    twin_way = "double backward" if args.derivatives == "one forward pass" else args.derivatives
    options = {"steps": args.steps, "points": args.points, "lr": args.lr, "seed": args.seed}
    options["log_every"] = max(args.steps // 6, 1)
    print(f"BackpropMLP, R by {args.derivatives}:")
    ours_losses = train(ours, residual=RESIDUALS[args.derivatives], **options)
    print(f"native twin, same initial parameters and points, R by {twin_way}:")
    twin_losses = train(twin, residual=RESIDUALS[twin_way], **options)
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
