"""The public path of the functional form: ``mlp(input, weights, ...)`` and ``mlp_loss(input, target, ...)``.

The code is :mod:`torch_backprop.core.functional`; this module re-exports its public names.
"""

from __future__ import annotations

from .core.functional import mlp, mlp_loss

__all__ = ["mlp", "mlp_loss"]
