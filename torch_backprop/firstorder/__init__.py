"""First-order extras of the one backward: per-sample gradients, their norms, clipping, DP-SGD.

What it holds, bottom-up:

* ``sample_terms``: each sample's gradient, norm and clipped share from h^(l) and δ^(l+1)
  (PS1-PS4, and BackPACK's BL, SGS, VAR); ``clipping``: the clipping styles (CL1-CL4);
* ``noise``: ``GaussianNoise``, the noise of DP-SGD: seeded and reproducible however it is drawn
  (in parallel chunks, ahead of time), or from the operating system's CSPRNG (NZ1-NZ4);
* ``dp_sgd``: ``dp_sgd_step``, the noise on the clipped sum (DP1-DP2), and the records that keep it
  exact;
* ``per_sample``: the ``per_sample`` block, which replaces a ``BackpropMLP``'s backward phase.

Import rule: ``torch_backprop.firstorder`` imports ``torch_backprop.core`` only (never
``secondorder`` or ``cli``). Its public names are exported by ``torch_backprop`` itself.
"""
