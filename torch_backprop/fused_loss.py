"""Deprecated path: ``mlp_loss`` now lives in :mod:`torch_backprop.functional`.

The loss math is in :mod:`torch_backprop.core.losses`, its autograd node in
:mod:`torch_backprop.core.loss_function`.
"""

from __future__ import annotations

import warnings

from .functional import mlp_loss

warnings.warn(
    "torch_backprop.fused_loss is deprecated; import mlp_loss from torch_backprop.functional",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["mlp_loss"]
