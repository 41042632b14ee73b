"""The public path of the activation registry: σ with σ' (and σ''), by name.

The code is :mod:`torch_backprop.core.activations`; this module re-exports its public names.
"""

from __future__ import annotations

from .core.activations import (
    Activation,
    ActivationLike,
    activation_from_module,
    available_activations,
    get_activation,
    register_activation,
    resolve_activations,
    zero_second_derivative,
)

__all__ = [
    "Activation",
    "ActivationLike",
    "activation_from_module",
    "available_activations",
    "get_activation",
    "register_activation",
    "resolve_activations",
    "zero_second_derivative",
]
