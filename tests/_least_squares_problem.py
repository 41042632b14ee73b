"""The small Poisson problem the optimiser tests share: −Δu = f on [0, 1]², u* = Π sin(π x_i)."""

from __future__ import annotations

import math

import torch

from torch_backprop import BackpropMLP, residual_jacobian

EYE2 = torch.eye(2, dtype=torch.float64)


def interior(x, d):  # −Δu = f for u* = Π sin(π x_i)
    return -d.operator[:, 0] - 2 * math.pi**2 * torch.sin(math.pi * x).prod(-1)


def boundary(x, d):
    return d.value[:, 0] - torch.sin(math.pi * x).prod(-1)


def problem(n_interior, n_boundary, hidden, dtype=torch.float64, seed=0):
    """A 2-hidden-1 tanh model, interior points and points on the edges of [0, 1]²."""
    torch.manual_seed(seed)
    model = BackpropMLP([2, hidden, 1], "tanh", dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x_in = torch.rand(n_interior, 2, generator=g, dtype=dtype)
    x_bd = torch.rand(n_boundary, 2, generator=g, dtype=dtype)  # on the edges of [0, 1]²
    x_bd[torch.arange(n_boundary), torch.randint(2, (n_boundary,), generator=g)] = torch.randint(
        2, (n_boundary,), generator=g
    ).to(dtype)
    return model, x_in, x_bd


def closure_of(model, x_in, x_bd, weights=(1.0, 1.0)):
    return lambda: [
        residual_jacobian(model, x_in, interior, weight=weights[0]),
        residual_jacobian(model, x_bd, boundary, order=0, weight=weights[1]),
    ]


def flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])
