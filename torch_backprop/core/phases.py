r"""The slides' forward and backward phases for a whole fully connected stack, as plain functions.

Implements "Backpropagation of Deep Neural Network" (A. Tse, UCL, 2022) top-down, in the order of
slide 10: the forward phase (slide 3) and beside it its forward-mode derivative (the tangent phase,
T1-T2), the tape they leave for the backward phase, the δ recursion (BP1-BP2, slides 8-10), the
backward phase (BP3-BP5). :mod:`torch_backprop.core.function` connects them to autograd
(:class:`~torch_backprop.core.function.MLPFunction`).

Notation, used everywhere in this package (BackPACK's manner):
    N: batch (rows), L: number of layers, n_l: width of layer l, n_0 = in_features.
    h^(0) = x                                  (N, n_0)
    z^(l+1) = h^(l) W^(l) + b^(l)              (N, n_{l+1}),  l = 0, ..., L-1
    h^(l+1) = σ_{l+1}(z^(l+1)) [⊙ m^(l+1)]     (N, n_{l+1}),  m ∈ {0, 1/(1-p)}: optional dropout
                                               mask of the hidden layers, as nn.Dropout draws it
    δ^(l) := ∂Q/∂z^(l)                          (N, n_l)
    W^(l) = ``layers[l].weight.T``             (n_l, n_{l+1}); the code holds nn.Linear's
                                               ``weight`` (n_{l+1}, n_l), so h W^(l) = h @ weight.T

The slides treat one sample as a row vector; the code carries a batch of rows, so every δ^(l)
is (N, n_l) and the products over the batch below sum the per-sample gradients.

Equations (slide 10, corrected):
    BP1  δ^(L) = ∂Q/∂h^(L) ⊙ σ'_L(z^(L))
    BP2  δ^(l) = σ'_l(z^(l)) ⊙ m^(l) ⊙ (δ^(l+1) W^(l)ᵀ),    l = L-1, ..., 1
    BP3  ∂W^(l) = h^(l)ᵀ δ^(l+1)        (nn.Linear layout: δ^(l+1)ᵀ h^(l), (n_{l+1}, n_l))
    BP4  ∂b^(l) = Σ_N δ^(l+1)
    BP5  ∂x = δ^(1) W^(0)ᵀ

Where this differs from the slides, and why:
    * The forward loop runs l = 0, ..., L-1 (slide 10 says "l ∈ {1, ..., L-1}", which would skip
      the first layer; slide 3 has it right).
    * ∂z_j^(l+1)/∂b_i^(l) = 1 only when i = j, so ∂b^(l) = δ^(l+1), not a sum over j.
    * The δ recursion sums over j, the index of layer l+1: δ_i^(l) = σ'_l(z_i^(l)) Σ_j W_ij^(l) δ_j^(l+1),
      i.e. the row vector δ^(l+1) W^(l)ᵀ (slide 8 writes Σ_i and "W^(l) δ^(l+1)").
    * BP1 takes ∂Q/∂h^(L) from autograd (``grad_output``) instead of Q'(h^(L) - y), so any loss
      that is a function of h^(L) works; for Q(h - y) it is exactly the slides' Q'(h^(L) - y).
    * σ' is computed from h = σ(z) where the math allows (ReLU, leaky ReLU, ELU, sigmoid, tanh), so
      z is kept only for GELU, SiLU and softplus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import Activation, out_kernels_allowed

__all__ = [
    "Stack",
    "Tape",
    "backward_phase",
    "deltas",
    "dropout_masks",
    "forward_phase",
    "lowest_layer",
    "make_tape",
    "tangent_phase",
]

# ---------------------------------------------------------------------------------------------
# The parameters, and the dropout masks m^(l).


class Stack(NamedTuple):
    """The parameters of a stack, as MLPFunction takes them flat: ``(*weights, *biases, *masks)``.

    Attributes:
        weights: W^(0)ᵀ, ..., W^(L-1)ᵀ in nn.Linear's layout, ``weights[l]`` (n_{l+1}, n_l).
        biases: b^(0), ..., b^(L-1), each (n_{l+1},) or ``None``.
        masks: dropout masks m^(1), ..., m^(L-1), each (N, n_l) or ``None``.
    """

    weights: Sequence[Tensor]
    biases: Sequence[Tensor | None]
    masks: Sequence[Tensor | None]

    @classmethod
    def unflatten(cls, params: Sequence[Any], depth: int) -> Stack:
        """The stack from the flat list of L weights, L biases and L - 1 masks."""
        return cls(params[:depth], params[depth : 2 * depth], params[2 * depth : 3 * depth - 1])


def dropout_masks(
    rows: int, widths: Sequence[int], p: float, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """Masks m^(l) ∈ {0, 1/(1-p)} for the hidden layers, drawn as ``nn.Dropout`` draws them.

    Under torch.func transforms they are drawn out of place (``torch.bernoulli``), so that
    ``vmap(..., randomness="different")`` draws one mask per vmapped call, as it does for
    ``nn.Dropout`` (an in-place draw into an unbatched tensor is refused there).
    """
    if torch._C._are_functorch_transforms_active():
        return [
            torch.bernoulli(torch.full((rows, width), 1 - p, dtype=dtype, device=device)) / (1 - p)
            for width in widths
        ]
    return [
        torch.empty(rows, width, dtype=dtype, device=device).bernoulli_(1 - p).div_(1 - p) for width in widths
    ]


# ---------------------------------------------------------------------------------------------
# Forward phase (slide 3).


def forward_phase(
    x: Tensor,
    activations: Sequence[Activation],
    stack: Stack,
    *,
    output: bool = True,
    in_place: bool = True,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """The slides' forward phase: ``(h^(L), hidden, pre_activations)``.

    ``hidden`` is h^(1), ..., h^(L-1) before dropout (σ' and ∂W read them); ``pre_activations`` is
    z^(l) for the layers whose σ' reads z, in layer order. With ``output=False`` (a rerun for the
    backward phase, when σ'_L is 1) the last layer's product is skipped and h^(L) is ``None``.
    With ``in_place=False`` σ is never applied in place (for a rerun that a tracer may const-fold,
    as ``torch.func.linearize`` does).
    """
    weights, biases, masks = stack
    depth = len(activations)
    hidden, pre_activations = [], []
    h = x
    for k in range(depth if output else depth - 1):
        z = F.linear(h, weights[k], biases[k])  # z^(k+1) = h^(k) W^(k) + b^(k), (N, n_{k+1})
        act = activations[k]
        if act.derivative_from == "z":
            pre_activations.append(z)
        h = act.forward(z) if in_place else act.fn(z)  # h^(k+1) = σ(z^(k+1))
        if k < depth - 1:
            hidden.append(h)
            if masks[k] is not None:
                h = h * masks[k]  # h^(k+1) ⊙ m^(k+1)
    return (h if output else None), hidden, pre_activations


# ---------------------------------------------------------------------------------------------
# The tangent phase: the forward phase's forward-mode derivative (jvp), beside it.
#
# Given tangents ẋ, Ẇ^(l), ḃ^(l) of the inputs (``None`` for zero), the product rule on slide 3's
# two lines gives, for l = 0, ..., L-1,
#     T1  ż^(l+1) = ḣ^(l) W^(l) + h^(l) Ẇ^(l) + ḃ^(l)        (N, n_{l+1}),  ḣ^(0) = ẋ
#     T2  ḣ^(l+1) = σ'_{l+1}(z^(l+1)) ⊙ ż^(l+1) [⊙ m^(l+1)]  (N, n_{l+1}),  the same mask
# It reads the same tensors as the backward phase (h^(l) after dropout, and what σ' is computed
# from), so it takes the :class:`Tape` (its ``grad_output`` unused). T2 is BP2's product σ' ⊙ (·)
# with ż in place of δ W^(l)ᵀ: ``Activation.tangent``, the same fused kernel where it is differentiable.


def tangent_phase(
    tape: Tape,
    x_dot: Tensor | None,
    weights_dot: Sequence[Tensor | None],
    biases_dot: Sequence[Tensor | None],
) -> Tensor | None:
    """ḣ^(L), the tangent of the output (T1-T2), or ``None`` when every tangent is ``None``.

    Written in differentiable ops only (never in place), so that reverse mode can differentiate it
    in turn (reverse-over-forward).
    """
    depth = len(tape.activations)
    h_dot = _cast(x_dot, tape.dtype)
    for k in range(depth):
        z_dot = None
        if h_dot is not None:
            z_dot = F.linear(h_dot, tape.weights[k])  # T1: ḣ^(k) W^(k), (N, n_{k+1})
        if weights_dot[k] is not None:
            term = F.linear(tape.h[k], _cast(weights_dot[k], tape.dtype))  # T1: h^(k) Ẇ^(k)
            z_dot = term if z_dot is None else z_dot + term
        if biases_dot[k] is not None:
            b_dot = _cast(biases_dot[k], tape.dtype)  # T1: + ḃ^(k)
            z_dot = b_dot.expand(*tape.h[k].shape[:-1], b_dot.shape[-1]) if z_dot is None else z_dot + b_dot
        if z_dot is None:
            h_dot = None
            continue
        h_dot = tape.activations[k].tangent(z_dot, tape.sigma_prime_from[k])  # T2, (N, n_{k+1})
        if k < depth - 1 and tape.masks[k] is not None:
            h_dot = h_dot * tape.masks[k]  # T2: ⊙ m^(k+1)
    return h_dot


# ---------------------------------------------------------------------------------------------
# The tape: what the backward phase reads.


class Tape(NamedTuple):
    """What the backward phase reads: ∂Q/∂h^(L) and the forward phase's tensors.

    Attributes:
        grad_output: ∂Q/∂h^(L), (N, n_L).
        h: h^(0), ..., h^(L-1), the layer inputs (dropout applied); h[l] is (N, n_l).
        sigma_prime_from: for l = 1, ..., L (at index l - 1), the tensor σ'_l is computed from, as
            its activation's ``derivative_from`` says: h^(l) (before dropout), z^(l), or ``None``.
        weights: W^(0)ᵀ, ..., W^(L-1)ᵀ (nn.Linear layout).
        masks: dropout masks m^(1), ..., m^(L-1) (or None).
        activations: σ_1, ..., σ_L.
        dtype: the dtype the products run in (autocast's, or the weights'): ``h`` and ``weights``
            are in it, and so are the gradients the backward phase returns.
    """

    grad_output: Tensor
    h: Sequence[Tensor]
    sigma_prime_from: Sequence[Tensor | None]
    weights: Sequence[Tensor]
    masks: Sequence[Tensor | None]
    activations: Sequence[Activation]
    dtype: torch.dtype


def make_tape(
    grad_output: Tensor,
    x: Tensor,
    activations: Sequence[Activation],
    stack: Stack,
    forward: tuple[Tensor | None, Sequence[Tensor], Sequence[Tensor]],
    dtype: torch.dtype,
    cast: bool,
) -> Tape:
    """The :class:`Tape` from the forward phase's ``(h^(L), hidden, pre_activations)``.

    With ``cast`` (under autocast), h^(l) and the weights are cast into the compute ``dtype``.
    """
    h_last, hidden, pre_activations = forward
    pre_activations = iter(pre_activations)
    sigma_prime_from = []
    for act, h in zip(activations, (*hidden, h_last), strict=True):
        reads = act.derivative_from
        sigma_prime_from.append(next(pre_activations) if reads == "z" else h if reads == "h" else None)
    h = [x, *hidden]
    for k, mask in enumerate(stack.masks, start=1):
        if mask is not None:
            h[k] = h[k] * mask  # h^(k) ⊙ m^(k)
    weights = stack.weights
    if cast:
        h, weights = [_cast(t, dtype) for t in h], [_cast(t, dtype) for t in weights]
    return Tape(grad_output, h, sigma_prime_from, weights, stack.masks, activations, dtype)


# ---------------------------------------------------------------------------------------------
# The δ recursion (BP1-BP2) and the backward phase (BP3-BP5), slides 8-10.


def deltas(tape: Tape, lowest: int = 0) -> Iterator[tuple[int, Tensor]]:
    """The δ recursion: yields ``(l, δ^(l+1))`` for l = L-1 down to ``lowest`` (BP1, then BP2).

    A generator, so a caller can use each δ^(l+1) (for ∂W^(l), ∂b^(l)) before the next is made.
    """
    depth = len(tape.activations)
    fresh = out_kernels_allowed(tape.grad_output)  # BP2 may write into its fresh products
    delta = tape.activations[-1].backprop(tape.grad_output, tape.sigma_prime_from[-1])  # BP1, (N, n_L)
    if delta.dtype != tape.dtype:
        delta = delta.to(tape.dtype)
    for k in reversed(range(lowest, depth)):
        yield k, delta  # δ^(k+1), (N, n_{k+1})
        if k == lowest:
            return
        back = delta.mm(tape.weights[k])  # δ^(k+1) W^(k)ᵀ, (N, n_k)
        if tape.masks[k - 1] is not None:
            back = back * tape.masks[k - 1]
        # BP2, δ^(k): (N, n_k), written into the fresh product
        delta = tape.activations[k - 1].backprop(back, tape.sigma_prime_from[k - 1], overwrite=fresh)


def lowest_layer(needs_x: bool, needs_weight: Sequence[bool], needs_bias: Sequence[bool]) -> int:
    """The lowest layer the recursion must reach: 0 when ∂x is needed, L when nothing is."""
    if needs_x:
        return 0
    for k, (weight, bias) in enumerate(zip(needs_weight, needs_bias, strict=True)):
        if weight or bias:
            return k
    return len(needs_weight)


def backward_phase(
    tape: Tape,
    *,
    needs_x: bool,
    needs_weight: Sequence[bool],
    needs_bias: Sequence[bool],
    on_delta: Callable[[int, Tensor], Any] | None = None,
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
    """The slides' backward phase, BP1-BP5: (∂x, [∂W^(l)], [∂b^(l)]), ``None`` where not needed.

    ``on_delta(l, δ^(l+1))``, if given, sees every δ the recursion makes (it must not modify it).
    """
    depth = len(tape.activations)
    grad_x, grad_weights, grad_biases = None, [None] * depth, [None] * depth
    lowest = lowest_layer(needs_x, needs_weight, needs_bias)
    if lowest == depth:
        return grad_x, grad_weights, grad_biases
    for k, delta in deltas(tape, lowest):
        if on_delta is not None:
            on_delta(k, delta)
        if needs_weight[k]:
            grad_weights[k] = delta.t().mm(tape.h[k])  # BP3, (n_{k+1}, n_k)
        if needs_bias[k]:
            grad_biases[k] = delta.sum(0)  # BP4, (n_{k+1},)
        if k == 0 and needs_x:
            grad_x = delta.mm(tape.weights[0])  # BP5, (N, n_0)
    return grad_x, grad_weights, grad_biases


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)
