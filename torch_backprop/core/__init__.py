"""The slides: the δ recursion of a fully connected stack and everything that runs it as PyTorch code.

What it holds, bottom-up (each module imports only those above it in this list):

* ``activations``: σ with σ' (and σ''), the registry and its built-in entries;
  ``losses``: the losses' Q and Q' for the slides' BP1 start (FL1-FL3); ``checks``: the errors for
  bad input; ``testing``: gradient comparison against a reference.
* ``phases``: the forward phase, its tangent (T1-T2), the tape, the δ recursion and the backward phase
  (BP1-BP5), as plain functions.
* ``function``: ``MLPFunction``, the phases as one autograd node; ``loss_function``:
  ``FusedLossFunction``, the stack and its loss as one node; ``opacus_hooks``: Opacus's per-sample
  hooks served by the fused stack.
* ``functional``: ``mlp`` and ``mlp_loss``; ``module``: ``BackpropMLP``.

Import rule: ``torch_backprop.core`` imports nothing else of the package (not ``firstorder``,
``secondorder`` or ``cli``); the rest of the package builds on it. ``tests/test_layout.py`` holds the
rule.
"""
