"""Input derivatives for physics-informed losses: u, ∂u/∂x and D u = Σ C ∂²u in one forward pass.

What it holds, bottom-up:

* ``taylor``: the forward phase carrying ∂h^(l) and Dh^(l) beside h^(l) (TY1-TY4) and its adjoint
  recursion (TA1-TA5), as plain functions;
* ``function``: ``TaylorFunction``, the two phases as one autograd node, and the choice between it
  and autograd over the same forward;
* ``operators``: ``input_derivatives`` and ``laplacian`` for a ``BackpropMLP``;
* ``residual``: ``residual_jacobian``, a PDE residual's Jacobian in the parameters from one Taylor
  pass and one adjoint pass seeded per point (``ResidualTape``: J, J v, Jᵀ u, J Jᵀ, JᵀJ).

Import rule: ``torch_backprop.pde`` imports ``torch_backprop.core`` only (never ``firstorder``,
``secondorder`` or ``cli``). Its public names are exported here and by ``torch_backprop`` itself.
"""

from .operators import InputDerivatives, input_derivatives, laplacian
from .residual import ResidualTape, residual_jacobian

__all__ = ["InputDerivatives", "ResidualTape", "input_derivatives", "laplacian", "residual_jacobian"]
