"""The public path of the laplace-torch backend: ``BackpropGGN`` and ``split_last_layer``.

The code is :mod:`torch_backprop.secondorder.laplace` (it needs laplace-torch, the ``curvature``
extra); this module re-exports its public names.
"""

from __future__ import annotations

from .secondorder.laplace import BackpropGGN, split_last_layer

__all__ = ["BackpropGGN", "split_last_layer"]
