"""Optimisers for least-squares PDE losses, built on the residual Jacobian of one Taylor pass.

What it holds, bottom-up:

* ``least_squares``: the terms a closure returns, their stacked system (LS1-LS2) and the grid line
  search (LS3);
* ``engd``: ``ENGD``, energy natural gradient descent (EN1-EN3), solved in the smaller space;
* ``kronecker``: the exact inverse of a sum of two Kronecker products (KF6-KF7);
* ``kfac``: ``KFAC``, Kronecker-factored curvature of the Taylor pass (KF4-KF10), for networks too
  large for ENGD.

Import rule: ``torch_backprop.optim`` imports ``torch_backprop.core``, ``torch_backprop.pde`` and
``torch_backprop.secondorder`` (never ``firstorder`` or ``cli``); it is the room above ``pde`` and
``secondorder``, for what needs both. Its public names are exported here and by ``torch_backprop``.
"""

from .engd import ENGD
from .kfac import KFAC

__all__ = ["ENGD", "KFAC"]
