"""Regression with the slides' loss Q(h - y): learn the Black-Scholes call price surface.

The lecture comes from quantitative finance, where a network is fitted to prices with a squared
loss Q(h^(L) - y) = mean (h^(L) - y)². Here the targets are generated from the closed-form
Black-Scholes price of a European call (no data files, no network):

    C / K = m Φ(d1) - e^{-rT} Φ(d2),   d1 = (ln m + (r + σ²/2) T) / (σ √T),   d2 = d1 - σ √T,

with moneyness m = S/K, maturity T, volatility σ and rate r. A BackpropMLP with a smooth
activation (softplus) learns C/K from (m, T, σ, r).

    python examples/black_scholes.py              # 3000 steps, test RMSE in price units of K
    python examples/black_scholes.py --steps 200  # quick
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_backprop import BackpropMLP
from torch_backprop.cli import options

# Sampling box of (moneyness S/K, maturity T in years, volatility σ, rate r).
LOW = torch.tensor([0.6, 0.1, 0.1, 0.0], dtype=torch.float64)
HIGH = torch.tensor([1.4, 2.0, 0.5, 0.08], dtype=torch.float64)


def call_price(moneyness: Tensor, maturity: Tensor, volatility: Tensor, rate: Tensor) -> Tensor:
    """Black-Scholes price of a European call divided by the strike, C/K."""
    normal_cdf = torch.special.ndtr
    root_t = volatility * maturity.sqrt()
    d1 = (moneyness.log() + (rate + 0.5 * volatility**2) * maturity) / root_t
    d2 = d1 - root_t
    return moneyness * normal_cdf(d1) - torch.exp(-rate * maturity) * normal_cdf(d2)


def generate(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random contracts: features scaled to [-1, 1] (float32, (count, 4)) and C/K ((count, 1))."""
    raw = LOW + (HIGH - LOW) * torch.rand(count, 4, generator=generator, dtype=torch.float64)
    price = call_price(*raw.unbind(1)).unsqueeze(1)
    features = 2 * (raw - LOW) / (HIGH - LOW) - 1
    return features.float(), price.float()


def fit(steps: int, batch_size: int = 256, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Train on fresh generated contracts each step; return the test MSE and the targets' variance."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    test_x, test_y = generate(4096, generator)
    model = BackpropMLP([4, 64, 64, 1], activation="softplus")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for step in range(steps):
        x, y = generate(batch_size, generator)
        optimizer.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)  # Q(h^(L) - y), the slides' loss form
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  train MSE {loss.item():.3e}")
    with torch.no_grad():
        test_mse = torch.mean((model(test_x) - test_y) ** 2).item()
        at_the_money = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # centre of the box
        raw = LOW + (HIGH - LOW) * (at_the_money.double() + 1) / 2
        predicted, exact = model(at_the_money).item(), call_price(*raw.unbind(1)).item()
    return {
        "test_mse": test_mse,
        "target_variance": test_y.var().item(),
        "centre_predicted": predicted,
        "centre_exact": exact,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/black_scholes.py", __doc__)
    count = options.number(int, low=1)
    parser.add_argument("--steps", type=count, default=3000, help="training steps, fresh contracts each")
    parser.add_argument("--batch-size", type=count, default=256, help="contracts per step")
    parser.add_argument(
        "--lr", type=options.number(float, low=0, low_open=True), default=3e-3, help="Adam's initial lr"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the contracts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = fit(args.steps, args.batch_size, args.lr, args.seed)
    rmse, spread = math.sqrt(result["test_mse"]), math.sqrt(result["target_variance"])
    print(f"test RMSE {rmse:.2e} of K (targets' std {spread:.2e})")
    print(
        f"centre of the box: predicted C/K {result['centre_predicted']:.4f}, "
        f"Black-Scholes {result['centre_exact']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
