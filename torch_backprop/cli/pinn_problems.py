r"""The reference PDE problems of the ``pinn`` command, each with its exact solution, sampler and sizes.

The problems, networks and point counts of the energy-natural-gradient and KFAC-for-PINNs
experiments (Müller & Zeinhofer 2023; Dangel, Müller & Zeinhofer 2024), in float64:

* Poisson −Δu = f on [0, 1]^d with u = u* on the boundary, for u* = Π sin(π x_i) (d = 2),
  Σ cos(π x_i) (d = 5), Σ x_{2k-1} x_{2k} (d = 10, harmonic: f = 0) and ‖x‖² / 33.47 (d = 100);
* heat ∂_t u − ¼ Δ_x u = 0 on [0, 1] × [0, 1]^d, u* = exp(−π² d t / 4) Π sin(π x_i), with
  u = u* on the spatial boundary (at random times) and at t = 0 (half the boundary points each).

Interior points are uniform in the domain; boundary points uniform with one random coordinate set
to 0 or 1. The error is measured on 10 N_Ω fresh uniform points (the authors' metric): the absolute
RMS error √mean (u − u*)² and the relative L2 error ‖u − u*‖ / ‖u*‖.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.module import BackpropMLP
from ..pde import InputDerivatives, input_derivatives, residual_jacobian

__all__ = ["PROBLEMS", "Problem", "errors", "loss_terms", "residual_tapes"]


@dataclass(frozen=True)
class Problem:
    """A PDE with a known solution: its residuals, sampler, network and point counts.

    Attributes:
        name: what it is, for printing.
        dim: the input dimension (time first for the heat equation).
        hidden: the hidden widths of the network (tanh, one linear output).
        interior, boundary: N_Ω and N_∂Ω, the points per step.
        resample: draw fresh points every this many steps (0: once, fixed).
        exact: u*(x), (N, dim) -> (N,).
        interior_residual: r_Ω(x, d) from the points and their input derivatives.
        operator: the keyword arguments of ``input_derivatives`` for D (coordinates, diagonal, drift).
        heat: whether the first coordinate is time (boundary points at t = 0 too).
    """

    name: str
    dim: int
    hidden: tuple[int, ...]
    interior: int
    boundary: int
    resample: int
    exact: Callable[[Tensor], Tensor]
    interior_residual: Callable[[Tensor, InputDerivatives], Tensor]
    operator: Callable[[Tensor], dict[str, Any]] = field(default=lambda x: {})
    heat: bool = False

    @property
    def sizes(self) -> list[int]:
        """The network's layer widths."""
        return [self.dim, *self.hidden, 1]

    def boundary_residual(self, x: Tensor, d: InputDerivatives) -> Tensor:
        """r_∂Ω = u − u* (the boundary and, for the heat equation, the initial condition)."""
        return d.value[:, 0] - self.exact(x)

    def sample(self, generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(x_Ω, x_∂Ω)``: N_Ω uniform interior points and N_∂Ω boundary points."""
        x_in = torch.rand(self.interior, self.dim, generator=generator, dtype=dtype)
        if not self.heat:
            return x_in, _on_faces(
                torch.rand(self.boundary, self.dim, generator=generator, dtype=dtype), generator
            )
        half = self.boundary // 2
        sides = torch.rand(half, self.dim, generator=generator, dtype=dtype)
        sides[:, 1:] = _on_faces(sides[:, 1:], generator)  # the spatial boundary at random times
        start = torch.rand(self.boundary - half, self.dim, generator=generator, dtype=dtype)
        start[:, 0] = 0  # t = 0
        return x_in, torch.cat([sides, start])


def _on_faces(x: Tensor, generator: torch.Generator) -> Tensor:
    """One random coordinate of each point set to 0 or 1: uniform on the faces of the unit cube."""
    rows = torch.arange(x.shape[0])
    side = torch.randint(x.shape[1], (x.shape[0],), generator=generator)
    x[rows, side] = torch.randint(2, (x.shape[0],), generator=generator).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------
# The exact solutions and residuals.


def _sin_product(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x).prod(-1)  # Π sin(π x_i); −Δ of it: d π² Π sin(π x_i)


def _cos_sum(x: Tensor) -> Tensor:
    return torch.cos(math.pi * x).sum(-1)  # Σ cos(π x_i); −Δ of it: π² Σ cos(π x_i)


def _pair_products(x: Tensor) -> Tensor:
    return x.unflatten(-1, (-1, 2)).prod(-1).sum(-1)  # Σ x_{2k-1} x_{2k}, harmonic


_NORM_SCALE = 33.47


def _scaled_norm(x: Tensor) -> Tensor:
    return x.square().sum(-1) / _NORM_SCALE  # ‖x‖² / 33.47; −Δ of it: −2d / 33.47


def _norm_source(x: Tensor) -> Tensor:
    return x.new_full(x.shape[:1], -2 * x.shape[1] / _NORM_SCALE)


def _poisson(exact: Callable[[Tensor], Tensor], source: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def residual(x: Tensor, d: InputDerivatives) -> Tensor:
        return -d.operator[:, 0] - source(x)  # r_Ω = −Δu − f

    return residual


def _heat_exact(x: Tensor) -> Tensor:
    dim = x.shape[-1] - 1
    return torch.exp(-(math.pi**2) * dim * x[:, 0] / 4) * torch.sin(math.pi * x[:, 1:]).prod(-1)


def _heat_operator(x: Tensor) -> dict[str, Any]:
    """D = ∂_t − ¼ Δ_x: second derivatives in the spatial coordinates, ∂_t as the first-order term."""
    dim = x.shape[-1]
    drift = torch.zeros(dim, dtype=x.dtype, device=x.device)
    drift[0] = 1
    return {
        "coordinates": list(range(1, dim)),
        "diagonal": torch.full((dim - 1,), -0.25, dtype=x.dtype, device=x.device),
        "drift": drift,
    }


def _heat_residual(x: Tensor, d: InputDerivatives) -> Tensor:
    return d.operator[:, 0]  # r_Ω = ∂_t u − ¼ Δ_x u


PROBLEMS: dict[str, Problem] = {
    "poisson2d": Problem(
        "Poisson on [0, 1]², u* = Π sin(π x_i)", 2, (64,), 900, 120, 0,
        _sin_product, _poisson(_sin_product, lambda x: 2 * math.pi**2 * _sin_product(x)),
    ),
    "poisson5d": Problem(
        "Poisson on [0, 1]⁵, u* = Σ cos(π x_i)", 5, (64,), 3000, 500, 1,
        _cos_sum, _poisson(_cos_sum, lambda x: math.pi**2 * _cos_sum(x)),
    ),
    "poisson5d-deep": Problem(
        "Poisson on [0, 1]⁵, u* = Σ cos(π x_i), 5-64-64-48-48-1", 5, (64, 64, 48, 48), 3000, 500, 1,
        _cos_sum, _poisson(_cos_sum, lambda x: math.pi**2 * _cos_sum(x)),
    ),
    "poisson10d": Problem(
        "Poisson on [0, 1]¹⁰, u* = Σ x_{2k-1} x_{2k}", 10, (256, 256, 128, 128), 3000, 1000, 100,
        _pair_products, _poisson(_pair_products, lambda x: x.new_zeros(x.shape[0])),
    ),
    "poisson100d": Problem(
        "Poisson on [0, 1]¹⁰⁰, u* = ‖x‖² / 33.47", 100, (768, 768, 512, 512), 3000, 1000, 100,
        _scaled_norm, _poisson(_scaled_norm, _norm_source),
    ),
    "heat1d": Problem(
        "heat ∂_t u = ¼ Δu on [0, 1] × [0, 1], u* = exp(−π² t / 4) sin(π x)", 2, (64,), 3000, 500, 1,
        _heat_exact, _heat_residual, _heat_operator, heat=True,
    ),
    "heat4d": Problem(
        "heat ∂_t u = ¼ Δu on [0, 1] × [0, 1]⁴, u* = exp(−π² t) Π sin(π x_i)", 5, (64,), 3000, 500, 1,
        _heat_exact, _heat_residual, _heat_operator, heat=True,
    ),
    "heat4d-deep": Problem(
        "heat on [0, 1] × [0, 1]⁴, 5-64-64-48-48-1", 5, (64, 64, 48, 48), 3000, 500, 1,
        _heat_exact, _heat_residual, _heat_operator, heat=True,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The loss terms of one step, and the error.


def residual_tapes(model: BackpropMLP, problem: Problem, x_in: Tensor, x_bd: Tensor) -> list:
    """The interior and boundary :class:`~torch_backprop.pde.ResidualTape` for ENGD (and KFAC)."""
    return [
        residual_jacobian(model, x_in, problem.interior_residual, **problem.operator(x_in)),
        residual_jacobian(model, x_bd, problem.boundary_residual, order=0),
    ]


def loss_terms(model: BackpropMLP, problem: Problem, x_in: Tensor, x_bd: Tensor) -> list[Tensor]:
    """``[½ mean r_Ω², ½ mean r_∂Ω²]``, differentiable, for the first-order optimisers."""
    d = input_derivatives(model, x_in, **problem.operator(x_in))
    r_in = problem.interior_residual(x_in, d)
    r_bd = problem.boundary_residual(x_bd, InputDerivatives(model(x_bd), None, None))  # type: ignore[arg-type]
    return [0.5 * r_in.square().mean(), 0.5 * r_bd.square().mean()]


@torch.no_grad()
def errors(model: BackpropMLP, problem: Problem, points: Tensor) -> tuple[float, float]:
    """``(absolute RMS error, relative L2 error)`` of u against u* at ``points``."""
    exact = problem.exact(points)
    error = model(points)[:, 0] - exact
    return error.square().mean().sqrt().item(), (error.norm() / exact.norm()).item()
