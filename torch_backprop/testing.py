"""The public path of the gradient checks: ``compare_gradients`` and ``assert_gradients_match``.

The code is :mod:`torch_backprop.core.testing`; this module re-exports its public names.
"""

from __future__ import annotations

from .core.testing import (
    GradientError,
    assert_gradients_match,
    compare_gradients,
    error_table,
    format_table,
    seeded_loss,
    tolerances,
)

__all__ = [
    "GradientError",
    "assert_gradients_match",
    "compare_gradients",
    "error_table",
    "format_table",
    "seeded_loss",
    "tolerances",
]
