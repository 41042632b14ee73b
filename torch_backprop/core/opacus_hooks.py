"""Opacus's per-sample hooks on a BackpropMLP's layers, served by the fused stack.

Opacus (``GradSampleModule``, ``PrivacyEngine.make_private``, in its ``hooks``, ``functorch`` and
``ghost`` modes) attaches two hooks to every trainable ``nn.Linear``: a forward hook that keeps the
layer input h^(l) and a full backward hook that receives ∂Q/∂z^(l+1) = δ^(l+1) and computes the
per-sample gradients (or norms) with the grad sampler Opacus has registered for ``nn.Linear``.
The fused stack never calls ``nn.Linear.forward``, so by themselves these hooks would never fire.

When every hook on the layers is one of those two, belonging to one Opacus hooks object,
:class:`~torch_backprop.BackpropMLP` runs the fused stack and calls Opacus's own hook functions
itself, with the tensors they would see on the native twin:

* in the forward, each layer's forward hook, with a stand-in of the layer input's shape (Opacus
  decides there, by its own rules, whether the call counts, and keeps what it stores);
* in the backward, after the δ recursion, each layer's backward hook with δ^(l+1), once the real
  h^(l) has replaced the stand-in in what the forward hook stored.

Everything Opacus does with them (loss-reduction scaling, ``batch_first``, accumulation over calls,
ghost norms, its accountant and optimizer) is then Opacus's own code. Any other hook, on any layer,
makes the stack run layer by layer instead (see :meth:`BackpropMLP.forward`), which is exact for
every hook by construction.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .phases import Tape, backward_phase

__all__ = ["OpacusPhase", "opacus_owner"]


def opacus_owner(layers: Sequence[nn.Module]) -> Any | None:
    """The Opacus hooks object whose two capture hooks are the only hooks on ``layers``, else ``None``.

    Opacus hooks only layers with trainable parameters; layers without hooks are allowed.
    """
    gsm = sys.modules.get("opacus.grad_sample.grad_sample_module")
    if gsm is None:
        return None
    owner = None
    for layer in layers:
        forward, backward = list(layer._forward_hooks.values()), list(layer._backward_hooks.values())
        if layer._forward_pre_hooks or layer._backward_pre_hooks:
            return None
        if not forward and not backward:
            continue
        if len(forward) != 1 or len(backward) != 1 or not layer._is_full_backward_hook:
            return None
        capture, backprop = forward[0], backward[0]
        hooks = getattr(capture, "__self__", None)
        if not isinstance(hooks, gsm.GradSampleHooks) or (owner is not None and hooks is not owner):
            return None
        if getattr(capture, "__func__", None) is not type(hooks).capture_activations_hook:
            return None
        if not isinstance(backprop, functools.partial):
            return None
        method = backprop.func
        if getattr(method, "__self__", None) is not hooks:
            return None
        if getattr(method, "__func__", None) is not type(hooks).capture_backprops_hook:
            return None
        owner = hooks
    return owner


class OpacusPhase:
    """The backward phase of one forward call whose layers carry Opacus's capture hooks.

    Built in the forward (it calls the forward hooks then), called by the backward.
    """

    name = "Opacus's grad-sample hooks"

    def __init__(self, owner: Any, layers: Sequence[nn.Linear], input: Tensor) -> None:
        self.layers = list(layers)
        self.lead = tuple(input.shape[:-1])
        self.entries: list[list[Tensor] | None] = []  # what each forward hook stored, to fill in
        self.backward_hooks: list[Any] = []  # as autograd does, the hooks present at forward time
        for k, layer in enumerate(self.layers):
            if not layer._forward_hooks:
                self.entries.append(None)
                self.backward_hooks.append(None)
                continue
            (capture,) = layer._forward_hooks.values()
            stored = layer.__dict__.get("activations")
            count = len(stored) if stored is not None else 0
            # h^(0) is the input itself; deeper inputs do not exist yet: a stand-in of their shape.
            stand_in = input if k == 0 else input.new_zeros(()).expand(*self.lead, layer.in_features)
            capture(layer, (stand_in,), None)
            stored = layer.__dict__.get("activations")
            self.entries.append(stored[-1] if stored is not None and len(stored) > count else None)
            self.backward_hooks.append(next(iter(layer._backward_hooks.values())))

    def __call__(
        self, tape: Tape, *, needs_x: bool, needs_weight: Sequence[bool], needs_bias: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "BackpropMLP under Opacus: a double backward (create_graph=True) through layers that "
                "carry Opacus's grad-sample hooks is not supported"
            )
        delta: dict[int, Tensor] = {}
        grads = backward_phase(
            tape,
            needs_x=needs_x,
            needs_weight=needs_weight,
            needs_bias=needs_bias,
            on_delta=delta.__setitem__,
        )
        for k in reversed(range(len(self.layers))):  # the order autograd runs the layers' hooks in
            entry, hook = self.entries[k], self.backward_hooks[k]
            if entry is None or hook is None:
                continue
            if k > 0:
                entry[0] = tape.h[k].detach().reshape(*self.lead, -1)  # the real h^(k) for the stand-in
            hook(self.layers[k], (None,), (delta[k].reshape(*self.lead, -1),))  # δ^(k+1) = ∂Q/∂z^(k+1)
        return grads
