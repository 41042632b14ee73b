"""Second-order quantities from the same recursion: GGN diagonals, Kronecker factors, Laplace.

What it holds, bottom-up:

* ``loss_hessians``: the supported losses seen from h^(L), their gradient and Hessian factor S
  (LS1-LS3);
* ``recursion``: the δ recursion carried with K columns and what each layer reads from it
  (CV1-CV5, the Hessian diagonal HD1-HD3);
* ``products``: without a backward, the GGN-vector product and the output Jacobians (GV1-GV3, JB1);
  ``curvature``: the ``curvature`` block, which fills BackPACK's attributes in the model's one
  backward;
* ``laplace``: ``BackpropGGN``, a laplace-torch backend (needs the ``curvature`` extra).

Import rule: ``torch_backprop.secondorder`` imports ``torch_backprop.core`` only (never
``firstorder`` or ``cli``). Its public names are exported by ``torch_backprop`` itself, and
``BackpropGGN`` by ``torch_backprop.laplace``.
"""
