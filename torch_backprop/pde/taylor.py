r"""Input derivatives of the stack in one forward pass: u, ∂u/∂x and a linear operator D u.

The slides' forward phase (slide 3) carries h^(l) up the stack. Carrying, beside it, the derivatives
of h^(l) in the input (Taylor mode to second order: the "forward Laplacian" of Li et al. 2023,
generalised to any linear second-order operator with constant or per-point coefficients) gives u,
its gradient and D u in the same pass, with no nested backward. This module holds the math as plain
functions, top-down: the operator's coefficients, the forward phase with derivatives (TY1-TY4) and
its backward phase (TA1-TA5), which :mod:`torch_backprop.pde.function` connects to autograd.

Notation (that of :mod:`torch_backprop.core.phases`, plus):
    d = n_0: input dimension;  i_1, ..., i_K: the K coordinates of the second derivatives.
    C: the symmetric K×K coefficient matrix (or one per point, (N, K, K)), given by its diagonal
       (K,) / (N, K) when diagonal; b: the first-order coefficients over all d coordinates, (d,) or
       (N, d) ("drift"; none by default).
    D := Σ_jk C_jk ∂²/∂x_{i_j}∂x_{i_k} + Σ_i b_i ∂/∂x_i  (C = I, b = 0: the Laplacian Δ).
    For every layer l, beside h^(l):
        ∂h^(l)   (K, N, n_l): ∂_k h^(l) := ∂h^(l)/∂x_{i_k}, k = 1, ..., K
        Dh^(l)   (N, n_l)
    Adjoints (gradients of a loss Q of the outputs) carry a bar: z̄ := ∂Q/∂z, ∂z̄ := ∂Q/∂(∂z), ...

Forward phase with derivatives, l = 0, ..., L-1, from h^(0) = x, ∂_k h^(0) = e_{i_k}, Dh^(0) = b:
    TY1  [z; ∂z; Dz]^(l+1) = [h; ∂h; Dh]^(l) W^(l), and + b^(l) on z only   (one product, (K+2)N rows)
    TY2  h^(l+1) = σ(z^(l+1))
    TY3  ∂h^(l+1) = σ'(z^(l+1)) ⊙ ∂z^(l+1)
    TY4  Dh^(l+1) = σ'(z^(l+1)) ⊙ Dz^(l+1) + σ''(z^(l+1)) ⊙ q^(l+1),  q := Σ_jk C_jk ∂_j z ⊙ ∂_k z
At l = 0 TY1 is z^(1) = x W^(0) + b^(0), ∂_k z^(1) = row i_k of W^(0) (the same for every point) and
Dz^(1) = b W^(0) (x is linear: its second derivatives vanish, so only the first-order term of D
reaches the first layer; it costs no row of its own). The outputs are u = h^(L), ∂u = ∂h^(L),
Du = Dh^(L).

Backward phase, l = L-1, ..., 0, from the outputs' adjoints h̄^(L), ∂h̄^(L), Dh̄^(L):
    TA1  Dz̄ = σ' ⊙ Dh̄                                                   (through TY4)
    TA2  ∂z̄ = σ' ⊙ ∂h̄ + 2 σ'' ⊙ Dh̄ ⊙ (C ∂z)                              (TY3, TY4; C symmetric)
    TA3  z̄ = σ' ⊙ h̄ + σ'' ⊙ (Σ_k ∂h̄_k ⊙ ∂_k z + Dh̄ ⊙ Dz) + σ''' ⊙ Dh̄ ⊙ q   (TY2-TY4)
    TA4  W̄^(l) = [h; ∂h; Dh]^(l)ᵀ [z̄; ∂z̄; Dz̄]   b̄^(l) = Σ_N z̄            (nn.Linear layout: transposed)
    TA5  [h̄; ∂h̄; Dh̄]^(l) = [z̄; ∂z̄; Dz̄] W^(l)ᵀ
At l = 0, TA4 reads h^(0) = x, ∂_k h^(0) = e_{i_k} and Dh^(0) = b: W̄^(0) = xᵀ z̄ + bᵀ Dz̄, plus
Σ_N ∂_k z̄ in row i_k, and TA5 is x̄ = z̄ W^(0)ᵀ. σ', σ'', σ''' are the activation's
(:mod:`torch_backprop.core.activations`), read from h where the math allows, as the δ recursion does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.activations import Activation, zero_second_derivative

__all__ = [
    "Coefficients",
    "LayerTape",
    "activation_adjoints",
    "layer_outputs",
    "quadratic_form",
    "taylor_backward",
    "taylor_forward",
]


# ---------------------------------------------------------------------------------------------
# The operator's coefficients, and the quadratic form q = Σ_jk C_jk ∂_j z ⊙ ∂_k z.


class Coefficients(NamedTuple):
    """D = Σ_jk C_jk ∂²/∂x_{i_j}∂x_{i_k} + Σ_i b_i ∂/∂x_i, over the coordinates i_1, ..., i_K.

    Attributes:
        coordinates: i_1, ..., i_K, a 1-D int64 tensor on the input's device.
        diagonal: C's diagonal when C is diagonal: (K,) for all points or (N, K) per point; ``None``
            with ``matrix`` ``None`` too means C = I.
        matrix: the symmetric C, (K, K) or (N, K, K) per point, when it is not diagonal.
        drift: b, (d,) or (N, d); ``None`` for none.
    """

    coordinates: Tensor
    diagonal: Tensor | None = None
    matrix: Tensor | None = None
    drift: Tensor | None = None


def quadratic_form(dz: Tensor, c: Coefficients, lean: bool) -> tuple[Tensor, Tensor]:
    """``(q, C ∂z)``: q = Σ_jk C_jk ∂_j z ⊙ ∂_k z (N or 1, n) and C ∂z (K, N or 1, n), for TY4 and TA2."""
    if c.matrix is not None:
        if c.matrix.dim() == 2:
            c_dz = (c.matrix @ dz.flatten(1)).view(dz.shape)  # Σ_k C_jk ∂_k z
        else:  # per point: (N, K, K) @ (N, K, n)
            c_dz = torch.bmm(c.matrix, dz.expand(-1, c.matrix.shape[0], -1).transpose(0, 1)).transpose(0, 1)
    elif c.diagonal is not None:
        weight = c.diagonal.view(-1, 1, 1) if c.diagonal.dim() == 1 else c.diagonal.t().unsqueeze(-1)
        c_dz = weight * dz  # C_kk ∂_k z
    else:
        c_dz = dz  # C = I
    return sum_of_products(dz, c_dz, lean), c_dz


def sum_of_products(a: Tensor, b: Tensor, lean: bool) -> Tensor:
    """Σ_k a_k ⊙ b_k over the first dimension.

    ``lean`` (no autograd): a loop of fused multiply-adds, which never materialises the K products
    (for large K that temporary is as big as the whole derivative stack); else ``(a * b).sum(0)``,
    one autograd node.
    """
    if not lean:
        return (a * b).sum(0)
    total = a[0] * b[0]  # every a_k ⊙ b_k has this shape
    for k in range(1, a.shape[0]):
        total.addcmul_(a[k], b[k])
    return total


# ---------------------------------------------------------------------------------------------
# The forward phase with derivatives (TY1-TY4).


class LayerTape(NamedTuple):
    """What the backward phase reads of layer l+1 (TA1-TA4), kept by the forward phase.

    Attributes:
        h: h^(l+1) = σ(z^(l+1)), (N, n_{l+1}).
        dz, Dz: ∂z^(l+1) (K, N or 1, n_{l+1}) and Dz^(l+1) (N or 1, n_{l+1}; ``None`` when zero).
        stacked: [z; ∂z; Dz]^(l+1) as the product TY1 made it, (K+2, N, n_{l+1}); ``None`` at l = 0.
        sigma_from: the tensor σ', σ'', σ''' are read from (h^(l+1) or z^(l+1)); ``None`` for identity.
        sigma_prime, sigma_second: σ'(z^(l+1)) and σ''(z^(l+1)) (``None`` when zero).
        q, c_dz: q^(l+1) and C ∂z^(l+1) (``None`` when σ'' is zero).
    """

    h: Tensor
    dz: Tensor
    Dz: Tensor | None
    stacked: Tensor | None
    sigma_from: Tensor | None
    sigma_prime: Tensor | None
    sigma_second: Tensor | None
    q: Tensor | None
    c_dz: Tensor | None


def activation_factors(
    act: Activation,
    z: Tensor,
    dz: Tensor,
    Dz: Tensor | None,
    stacked: Tensor | None,
    c: Coefficients,
    lean: bool,
) -> LayerTape:
    """TY2 and the factors of TY3-TY4 at one layer: h = σ(z), σ', σ'', q and C ∂z."""
    if act.derivative_from == "none":  # σ = identity: h = z, ∂h = ∂z, Dh = Dz
        return LayerTape(z, dz, Dz, stacked, None, None, None, None, None)
    h = act.fn(z)  # TY2, (N, n_{l+1})
    sigma_from = h if act.derivative_from == "h" else z
    sigma_prime = act.derivative(sigma_from)
    sigma_second = q = c_dz = None
    if act.second_derivative is not zero_second_derivative:
        sigma_second = act.second_derivative(sigma_from)
        q, c_dz = quadratic_form(dz, c, lean)  # q = Σ_jk C_jk ∂_j z ⊙ ∂_k z
    return LayerTape(h, dz, Dz, stacked, sigma_from, sigma_prime, sigma_second, q, c_dz)


def layer_outputs(layer: LayerTape, rows: int, lean: bool) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """[h; ∂h; Dh] of one layer by TY3-TY4 from its factors: for the next product, and again in TA4.

    With ``lean``, one fresh (K+2, N, n) tensor written in place; else ``(h, ∂h, Dh)`` in
    differentiable ops.
    """
    width = layer.h.shape[-1]
    identity = layer.sigma_prime is None
    if not lean:
        dh, Dh = layer.dz, layer.Dz
        if not identity:
            dh = layer.sigma_prime * layer.dz  # TY3, (K, N, n)
            Dh = None if layer.Dz is None else layer.sigma_prime * layer.Dz  # TY4: σ' ⊙ Dz
            if layer.sigma_second is not None:  # TY4: + σ'' ⊙ q
                Dh = layer.sigma_second * layer.q if Dh is None else Dh + layer.sigma_second * layer.q
        Dh = layer.h.new_zeros(rows, width) if Dh is None else Dh.expand(rows, width)
        return layer.h, dh.expand(-1, rows, -1), Dh
    out = layer.h.new_empty(layer.dz.shape[0] + 2, rows, width)
    out[0].copy_(layer.h)
    if identity:
        out[1:-1].copy_(layer.dz)
    elif layer.stacked is not None:
        torch.mul(layer.sigma_prime, layer.stacked[1:], out=out[1:])  # TY3, TY4's σ' ⊙ Dz: [∂z; Dz] adjacent
    else:
        torch.mul(layer.sigma_prime, layer.dz, out=out[1:-1])  # TY3
    if identity or layer.stacked is None:
        if layer.Dz is None:
            out[-1].zero_()
        elif identity:
            out[-1].copy_(layer.Dz)
        else:
            torch.mul(layer.sigma_prime, layer.Dz, out=out[-1])  # TY4: σ' ⊙ Dz
    if layer.sigma_second is not None:
        out[-1].addcmul_(layer.sigma_second, layer.q)  # TY4: + σ'' ⊙ q
    return out


def taylor_forward(
    x: Tensor,
    activations: Sequence[Activation],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    c: Coefficients,
    *,
    lean: bool = False,
) -> tuple[tuple[Tensor, Tensor, Tensor], list[LayerTape]]:
    """``((u, ∂u, Du), tape)``: u (N, n_L), ∂u (K, N, n_L), Du (N, n_L), and each layer's :class:`LayerTape`.

    By default in differentiable, out-of-place ops, so that autograd (double backward, torch.func,
    torch.compile) can differentiate it where the backward phase below is not used. With ``lean``
    (no autograd: the node's forward, or inference) [h; ∂h; Dh] is written in place into the
    buffer the next product reads, and the tape does not keep it (the backward makes it again).
    """
    depth, rows = len(activations), x.shape[0]
    tape = []
    z = F.linear(x, weights[0], biases[0])  # TY1 at l = 0: z^(1) = x W^(0) + b^(0), (N, n_1)
    dz = weights[0].t()[c.coordinates].unsqueeze(1)  # TY1: ∂_k z^(1) = row i_k of W^(0), (K, 1, n_1)
    Dz = None if c.drift is None else F.linear(c.drift, weights[0])  # TY1: Dz^(1) = b W^(0)
    stacked = None  # [z; ∂z; Dz]^(k+1) as one tensor, from the second layer on
    for k in range(depth):
        layer = activation_factors(activations[k], z, dz, Dz, stacked, c, lean)  # TY2
        tape.append(layer)
        if k == depth - 1:
            return layer_outputs(layer, rows, lean=False), tape  # type: ignore[return-value]
        if lean:
            inputs = layer_outputs(layer, rows, lean)  # [h; ∂h; Dh]^(k+1), TY3-TY4
        else:
            h, dh, Dh = layer_outputs(layer, rows, lean)  # type: ignore[misc]
            inputs = torch.cat([h.unsqueeze(0), dh, Dh.unsqueeze(0)])
        weight = weights[k + 1]
        stacked = inputs.flatten(0, 1).mm(weight.t()).view(*inputs.shape[:2], weight.shape[0])  # TY1
        z, dz, Dz = stacked[0], stacked[1:-1], stacked[-1]
        if biases[k + 1] is not None:
            z = z.add_(biases[k + 1]) if lean else z + biases[k + 1]  # TY1: + b^(k+1) on z only
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The backward phase (TA1-TA5): the adjoint recursion of the forward phase above.


def activation_adjoints(act: Activation, layer: LayerTape, bar: Tensor) -> None:
    """TA1-TA3 at one layer, in place: ``bar`` [h̄; ∂h̄; Dh̄] (K+2, N, n) becomes [z̄; ∂z̄; Dz̄].

    Each point's column of ``bar`` depends on that point's column alone (σ', σ'', σ''' and C ∂z
    are per point), which makes the per-point residual Jacobian of
    :mod:`torch_backprop.pde.residual` a by-product of this recursion.
    """
    if layer.sigma_from is None:  # σ = identity leaves [z̄; ∂z̄; Dz̄] = [h̄; ∂h̄; Dh̄]
        return
    h_bar, dh_bar, Dh_bar = bar[0], bar[1:-1], bar[-1]
    if layer.sigma_second is not None:  # the σ'' and σ''' terms read Dh̄ and ∂h̄ before TA1-TA3
        a1_bar = sum_of_products(dh_bar, layer.dz, lean=True)  # Σ_k ∂h̄_k ⊙ ∂_k z, (N, n)
        if layer.Dz is not None:
            a1_bar.addcmul_(Dh_bar, layer.Dz)  # + Dh̄ ⊙ Dz
        third_bar = (act.third_derivative(layer.sigma_from) * layer.q).mul_(Dh_bar)  # σ''' ⊙ q ⊙ Dh̄
        second_bar = layer.sigma_second * Dh_bar  # σ'' ⊙ Dh̄
    bar.mul_(layer.sigma_prime)  # TA1-TA3: σ' ⊙ [h̄; ∂h̄; Dh̄]
    if layer.sigma_second is not None:
        h_bar.addcmul_(layer.sigma_second, a1_bar).add_(third_bar)  # TA3
        dh_bar.addcmul_(second_bar, layer.c_dz, value=2)  # TA2


def taylor_backward(
    x: Tensor,
    activations: Sequence[Activation],
    weights: Sequence[Tensor],
    c: Coefficients,
    tape: Sequence[LayerTape],
    output_bars: tuple[Tensor, Tensor, Tensor],
    *,
    needs_x: bool,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """``(x̄, [W̄^(l)], [b̄^(l)])`` from the outputs' adjoints ``(h̄^(L), ∂h̄^(L), Dh̄^(L))`` (TA1-TA5).

    The adjoints travel as one stacked tensor [h̄; ∂h̄; Dh̄] (K+2, N, n), which TA1-TA3 turn into
    [z̄; ∂z̄; Dz̄] in place (it is fresh: made here or by the last TA5). Not differentiable: a double
    backward differentiates :func:`taylor_forward` instead. Every activation must have σ'''
    (``third_derivative``) where its σ'' is not zero.
    """
    depth = len(activations)
    grad_weights: list[Tensor] = [None] * depth  # type: ignore[list-item]
    grad_biases: list[Tensor] = [None] * depth  # type: ignore[list-item]
    h_bar, dh_bar, Dh_bar = output_bars
    bar = torch.cat([h_bar.unsqueeze(0), dh_bar, Dh_bar.unsqueeze(0)])  # [h̄; ∂h̄; Dh̄]^(L)
    for k in reversed(range(depth)):
        activation_adjoints(activations[k], tape[k], bar)  # TA1-TA3: bar is now [z̄; ∂z̄; Dz̄]
        z_bar = bar[0]  # z̄, (N, n_{k+1})
        grad_biases[k] = z_bar.sum(0)  # TA4
        if k > 0:
            inputs = layer_outputs(tape[k - 1], bar.shape[1], lean=True)  # [h; ∂h; Dh]^(k) again (TY3-TY4)
            flat = bar.view(-1, bar.shape[-1])
            grad_weights[k] = flat.t().mm(inputs.view(-1, inputs.shape[-1]))  # TA4
            bar = flat.mm(weights[k]).view(*bar.shape[:2], weights[k].shape[1])  # TA5
        else:
            grad = z_bar.t().mm(x)  # TA4 at l = 0: xᵀ z̄ (+ bᵀ Dz̄), then Σ_N ∂_k z̄ in row i_k
            if c.drift is not None:
                Dz_bar = bar[-1]
                grad += Dz_bar.t().mm(c.drift) if c.drift.dim() == 2 else torch.outer(Dz_bar.sum(0), c.drift)
            grad_weights[0] = grad.index_add_(1, c.coordinates, bar[1:-1].sum(1).t())
    grad_x = z_bar.mm(weights[0]) if needs_x else None  # TA5 at l = 0
    return grad_x, grad_weights, grad_biases
