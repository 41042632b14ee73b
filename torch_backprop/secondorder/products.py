r"""Curvature without a backward: the GGN-vector product and the output Jacobians of a BackpropMLP.

The pieces of :mod:`torch_backprop.secondorder.recursion` (the δ recursion on K columns) and of the
slides' phases, run on one forward's tape with no autograd graph. Notation as there, plus a tangent
V^(l), v_b^(l) of every trainable parameter (a vector in parameter space, nn.Linear layout):

    GV1  ż^(l+1) = ḣ^(l) W^(l) + h^(l) V^(l)ᵀ + v_b^(l),  ḣ^(l+1) = σ'_{l+1} ⊙ ż^(l+1),  ḣ^(0) = 0
    GV2  u_n = ∂²Q/∂h_n^(L)² ḣ_n^(L)                                     (LS3)
    GV3  G v = the backward phase BP1-BP4 with ∂Q/∂h^(L) := u            (the GGN-vector product)
    JB1  ∂h_{n,c}^(L)/∂W^(l) = S_{c,n}^(l+1) ⊗ h_n^(l) with S = I (C columns): the Jacobians
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.module import BackpropMLP
from ..core.phases import Stack, Tape, backward_phase, forward_phase, make_tape
from .loss_hessians import LossSpec
from .recursion import factors

__all__ = ["ggn_vector_product", "output_jacobians", "tape_of"]


def tape_of(model: BackpropMLP, input: Tensor) -> tuple[Tensor, Tape]:
    """h^(L) (N, n_L) and the :class:`~torch_backprop.core.phases.Tape` of a forward, without autograd.

    Input (*, n_0) is taken as N rows; the tape's ``grad_output`` is a zero placeholder to replace.

    Raises:
        ValueError: the model is in training mode with dropout (that forward draws a random network).
    """
    if model.training and model.dropout:
        raise ValueError("second-order products need model.eval(): a forward with dropout is random")
    x = input.reshape(-1, input.shape[-1])
    depth = len(model.layers)
    weights = [layer.weight for layer in model.layers]
    stack = Stack(weights, [layer.bias for layer in model.layers], [None] * (depth - 1))
    with torch.no_grad():
        forward = forward_phase(x, model.activations, stack)
        h_last = forward[0]
        placeholder = h_last.new_zeros(()).expand_as(h_last)
        return h_last, make_tape(placeholder, x, model.activations, stack, forward, h_last.dtype, False)


def _trainable_parameters(model: BackpropMLP) -> list[tuple[int, str, nn.Parameter]]:
    return [
        (k, kind, p)
        for k, layer in enumerate(model.layers)
        for kind, p in (("weight", layer.weight), ("bias", layer.bias))
        if p is not None and p.requires_grad
    ]


def ggn_vector_product(
    model: BackpropMLP, loss_function: nn.Module, input: Tensor, vector: Sequence[Tensor]
) -> list[Tensor]:
    """G v (GV1-GV3): the exact GGN of ``loss_function`` on ``input`` times ``vector``, without autograd.

    ``vector`` holds one tensor per trainable parameter, in ``model.parameters()`` order (the layout
    of BackPACK's ``ggn_vector_product``). The GGN of cross-entropy and MSE does not depend on the
    targets, so none are taken; rows and scaling as in :func:`torch_backprop.curvature`
    (input (B, T, n_0) is N = B T rows).

    Returns:
        One tensor per trainable parameter, shaped like it.

    Raises:
        TypeError, ValueError: a model or loss ``curvature`` does not take; a vector whose shapes
            are not the trainable parameters'; a model in training mode with dropout.
    """
    if not isinstance(model, BackpropMLP):
        raise TypeError(
            f"ggn_vector_product expects a torch_backprop.BackpropMLP, got {type(model).__name__}"
        )
    spec = LossSpec.from_module(loss_function, "ggn_vector_product")
    params = _trainable_parameters(model)
    vector = list(vector)
    shapes, given = [tuple(p.shape) for _, _, p in params], [tuple(v.shape) for v in vector]
    if given != shapes:
        raise ValueError(
            f"ggn_vector_product expects one tensor per trainable parameter, shapes {shapes}, got {given}"
        )
    output, tape = tape_of(model, input)
    tangent = {(k, kind): v.to(tape.dtype) for (k, kind, _), v in zip(params, vector, strict=True)}
    with torch.no_grad():
        h_dot = None
        for k, act in enumerate(model.activations):
            z_dot = output.new_zeros(output.shape[0], tape.weights[k].shape[0])
            if h_dot is not None:
                z_dot += h_dot.mm(tape.weights[k].t())  # ḣ^(k) W^(k)
            if (k, "weight") in tangent:
                z_dot += tape.h[k].mm(tangent[k, "weight"].t())  # h^(k) V^(k)ᵀ
            if (k, "bias") in tangent:
                z_dot += tangent[k, "bias"]
            h_dot = act.backprop(z_dot, tape.sigma_prime_from[k])  # GV1, ḣ^(k+1)
        u = spec.hessian_product(output, h_dot)  # GV2, (N, n_L)
        needs_weight = [(k, "weight") in tangent for k in range(len(model.layers))]
        needs_bias = [(k, "bias") in tangent for k in range(len(model.layers))]
        _, grad_weights, grad_biases = backward_phase(
            tape._replace(grad_output=u), needs_x=False, needs_weight=needs_weight, needs_bias=needs_bias
        )  # GV3
    by_kind = {"weight": grad_weights, "bias": grad_biases}
    return [by_kind[kind][k].to(p.dtype) for k, kind, p in params]


def output_jacobians(model: BackpropMLP, input: Tensor) -> tuple[Tensor, Tensor]:
    """JB1: h^(L) (N, C) and ∂h^(L)/∂θ (N, C, P) over the trainable parameters, in ``parameters()`` order.

    One recursion on C columns instead of C backward passes (``torch.func.jacrev``) or C hooked
    backward passes (BackPACK's ``BatchGrad`` per output, as laplace-torch's BackPACK backend does).
    """
    params = _trainable_parameters(model)
    if not params:
        raise ValueError("output_jacobians expects a model with at least one trainable parameter, got none")
    output, tape = tape_of(model, input)
    rows, classes = output.shape
    S = torch.eye(classes, dtype=output.dtype, device=output.device).unsqueeze(1).repeat(1, rows, 1)
    blocks = {}
    with torch.no_grad():
        for k, S_k in factors(tape, S, params[0][0]):  # S^(k+1) = ∂h^(L)/∂z^(k+1), (C, N, n_{k+1})
            blocks[k, "bias"] = S_k.permute(1, 0, 2)  # JB1 for b^(k), (N, C, n_{k+1})
            blocks[k, "weight"] = torch.einsum("cnj,ni->ncji", S_k, tape.h[k]).flatten(2)  # JB1, W^(k)
    jacobian = torch.cat([blocks[k, kind].to(p.dtype) for k, kind, p in params], dim=2)
    return output, jacobian
