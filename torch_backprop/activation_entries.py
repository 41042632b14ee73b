"""The registry's built-in entries: each σ with σ' (and σ'') in closed form, and the fused kernels.

Slide 9's activations and the ones MLPs are trained with today. Each entry is a factory that
returns an :class:`~torch_backprop.activations.Activation`; σ' sits next to its σ, written in h
where the math allows (ReLU: 1[h > 0]; tanh: 1 - h²; sigmoid: h(1 - h)), and the fused kernel,
where PyTorch has one, is the ``torch.ops.aten.*_backward`` kernel native autograd uses, computing
the same product grad ⊙ σ'. They are registered when :mod:`torch_backprop.activations` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, register_activation

__all__ = ["zero_second_derivative"]

aten = torch.ops.aten

def zero_second_derivative(saved: Tensor) -> Tensor:
    """σ'' = 0: the entry for piecewise-linear activations (identity, ReLU, leaky ReLU).

    :mod:`torch_backprop.curvature` recognises this function and skips the σ'' terms it would add.
    """
    return torch.zeros_like(saved)


def _kernel(op: Any, *args: Any, **kwargs: Any) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """``fused`` and ``fused_into`` for the aten kernel ``op(grad, saved, *args, **kwargs)``.

    ``fused`` is the kernel native autograd uses; ``fused_into`` is its ``grad_input=`` form, which
    writes into ``grad``.
    """
    into = op.grad_input
    return {
        "fused": lambda grad, saved: op(grad, saved, *args, **kwargs),
        "fused_into": lambda grad, saved: into(grad, saved, *args, **kwargs, grad_input=grad),
    }


def _identity() -> Activation:
    return Activation(
        "identity",
        lambda z: z,
        torch.ones_like,
        "none",
        module=nn.Identity,
        second_derivative=zero_second_derivative,
    )


def _relu() -> Activation:
    # σ'(z) = 1[z > 0] = 1[h > 0]
    return Activation(
        "relu",
        F.relu,
        lambda h: (h > 0).to(h.dtype),
        "h",
        **_kernel(aten.threshold_backward, 0),
        inplace=torch.relu_,
        module=nn.ReLU,
        second_derivative=zero_second_derivative,  # σ'' = 0 (almost everywhere)
    )


def _leaky_relu(negative_slope: float = 0.01) -> Activation:
    # σ'(z) = 1 if z > 0 else slope; for slope >= 0, z > 0 exactly when h > 0.
    slope = float(negative_slope)
    from_output = slope >= 0
    return Activation(
        "leaky_relu",
        lambda z: F.leaky_relu(z, slope),
        lambda s: torch.where(s > 0, s.new_ones(()), s.new_full((), slope)),
        "h" if from_output else "z",
        **_kernel(aten.leaky_relu_backward, slope, from_output),
        inplace=lambda z: F.leaky_relu_(z, slope),
        module=lambda: nn.LeakyReLU(slope),
        params={"negative_slope": slope},
        second_derivative=zero_second_derivative,  # σ'' = 0 (almost everywhere)
    )


def _elu(alpha: float = 1.0) -> Activation:
    # σ'(z) = 1 if z > 0 else α e^z = h + α; for α > 0, z > 0 exactly when h > 0.
    alpha = float(alpha)
    from_output = alpha > 0
    # σ''(z) = 0 if z > 0 else α e^z = h + α
    if from_output:
        derivative = lambda h: torch.where(h > 0, 1.0, h + alpha).to(h.dtype)  # noqa: E731
        second = lambda h: torch.where(h > 0, 0.0, h + alpha).to(h.dtype)  # noqa: E731
    else:
        derivative = lambda z: torch.where(z > 0, 1.0, alpha * torch.exp(z)).to(z.dtype)  # noqa: E731
        second = lambda z: torch.where(z > 0, 0.0, alpha * torch.exp(z)).to(z.dtype)  # noqa: E731
    return Activation(
        "elu",
        lambda z: F.elu(z, alpha),
        derivative,
        "h" if from_output else "z",
        fused=lambda grad, s: aten.elu_backward(grad, alpha, 1, 1, from_output, s),
        fused_into=lambda grad, s: aten.elu_backward.grad_input(
            grad, alpha, 1, 1, from_output, s, grad_input=grad
        ),
        inplace=lambda z: F.elu_(z, alpha),
        module=lambda: nn.ELU(alpha),
        params={"alpha": alpha},
        second_derivative=second,
    )


def _gelu_derivative(z: Tensor) -> Tensor:
    # σ(z) = z Φ(z)  =>  σ'(z) = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _gelu_tanh_derivative(z: Tensor) -> Tensor:
    # σ(z) = z/2 (1 + tanh u), u = √(2/π)(z + 0.044715 z³)
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


def _gelu_second_derivative(z: Tensor) -> Tensor:
    # σ'(z) = Φ(z) + z φ(z), φ'(z) = -z φ(z)  =>  σ''(z) = φ(z) (2 - z²)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return pdf * (2 - z * z)


def _gelu_tanh_second_derivative(z: Tensor) -> Tensor:
    # With u' = k(1 + 3·0.044715 z²), u'' = 6·0.044715 k z:
    # σ''(z) = (1 - t²) (u' + z/2 (u'' - 2 t u'²))
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    du = k * (1 + 3 * 0.044715 * z * z)
    return (1 - t * t) * (du + 0.5 * z * (6 * 0.044715 * k * z - 2 * t * du * du))


def _gelu() -> Activation:
    return Activation(
        "gelu",
        F.gelu,
        _gelu_derivative,
        "z",
        **_kernel(aten.gelu_backward),
        module=nn.GELU,
        second_derivative=_gelu_second_derivative,
    )


def _gelu_tanh() -> Activation:
    return Activation(
        "gelu_tanh",
        lambda z: F.gelu(z, approximate="tanh"),
        _gelu_tanh_derivative,
        "z",
        **_kernel(aten.gelu_backward, approximate="tanh"),
        module=lambda: nn.GELU(approximate="tanh"),
        second_derivative=_gelu_tanh_second_derivative,
    )


def _silu() -> Activation:
    # σ(z) = z s(z), s = sigmoid  =>  σ'(z) = s (1 + z (1 - s))
    def derivative(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))

    # σ''(z) = s (1 - s) (2 + z (1 - 2s))
    def second_derivative(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))

    return Activation(
        "silu",
        F.silu,
        derivative,
        "z",
        **_kernel(aten.silu_backward),
        fused_differentiable=False,  # aten has no derivative for silu_backward
        module=nn.SiLU,
        second_derivative=second_derivative,
    )


def _sigmoid() -> Activation:
    # σ'(z) = σ(z)(1 - σ(z)) = h (1 - h),  σ''(z) = h (1 - h)(1 - 2h)
    return Activation(
        "sigmoid",
        torch.sigmoid,
        lambda h: h * (1 - h),
        "h",
        **_kernel(aten.sigmoid_backward),
        inplace=torch.sigmoid_,
        module=nn.Sigmoid,
        second_derivative=lambda h: h * (1 - h) * (1 - 2 * h),
    )


def _tanh() -> Activation:
    # σ'(z) = 1 - tanh²(z) = 1 - h²,  σ''(z) = -2 h (1 - h²)
    return Activation(
        "tanh",
        torch.tanh,
        lambda h: 1 - h * h,
        "h",
        **_kernel(aten.tanh_backward),
        inplace=torch.tanh_,
        module=nn.Tanh,
        second_derivative=lambda h: -2 * h * (1 - h * h),
    )


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    # σ(z) = log(1 + e^{βz})/β (z where βz > threshold)  =>  σ'(z) = sigmoid(βz) (1 there),
    # σ''(z) = β s (1 - s) with s = sigmoid(βz) (0 there)
    beta, threshold = float(beta), float(threshold)
    return Activation(
        "softplus",
        lambda z: F.softplus(z, beta, threshold),
        lambda z: torch.where(z * beta > threshold, 1.0, torch.sigmoid(z * beta)).to(z.dtype),
        "z",
        **_kernel(aten.softplus_backward, beta, threshold),
        module=lambda: nn.Softplus(beta, threshold),
        params={"beta": beta, "threshold": threshold},
        second_derivative=lambda z: torch.where(
            z * beta > threshold, 0.0, beta * torch.sigmoid(z * beta) * (1 - torch.sigmoid(z * beta))
        ).to(z.dtype),
    )


for _name, _factory in [
    ("identity", _identity),
    ("relu", _relu),
    ("leaky_relu", _leaky_relu),
    ("elu", _elu),
    ("gelu", _gelu),
    ("gelu_tanh", _gelu_tanh),
    ("silu", _silu),
    ("sigmoid", _sigmoid),
    ("tanh", _tanh),
    ("softplus", _softplus),
]:
    register_activation(_name, _factory)
