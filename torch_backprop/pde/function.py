r"""The forward phase with derivatives (:mod:`torch_backprop.pde.taylor`) as one autograd node.

:class:`TaylorFunction` runs TY1-TY4 and, as its backward, the hand-written adjoint recursion
TA1-TA5: one node for the whole stack, as :class:`~torch_backprop.MLPFunction` is for the slides'
phases. :func:`taylor_derivatives` chooses between it and autograd over the same differentiable
forward, which serves where the node cannot: inside torch.func transforms and torch.compile, for
coefficients that require grad, and for activations registered without σ'''. A double backward
(``create_graph=True``) through the node reruns the forward under autograd, so it is exact there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.activations import Activation, zero_second_derivative
from .taylor import Coefficients, LayerTape, taylor_backward, taylor_forward

__all__ = ["TaylorFunction", "taylor_derivatives"]

_TAPE_FIELDS = len(LayerTape._fields)
_COEFFICIENT_FIELDS = len(Coefficients._fields)


class TaylorFunction(torch.autograd.Function):
    """``(x, W, b) -> (u, ∂u, Du)`` with the adjoint recursion TA1-TA5 as its backward.

    Call as ``TaylorFunction.apply(x, activations, coefficients, *weights, *biases)``; x is (N, d),
    the outputs are u (N, n_L), ∂u (K, N, n_L) and Du (N, n_L). The coefficients are constants
    (their tensors must not require grad). Notation and equations: :mod:`torch_backprop.pde.taylor`.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, activations: tuple[Activation, ...], c: Coefficients, *params: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        depth = len(activations)
        outputs, tape = taylor_forward(x, activations, params[:depth], params[depth:], c, lean=True)
        ctx.activations = activations
        flat_tape = [t for layer in tape for t in layer]
        ctx.save_for_backward(x, *params, *c, *flat_tape)
        return outputs

    @staticmethod
    def backward(ctx: Any, u_bar: Tensor, du_bar: Tensor, Du_bar: Tensor) -> tuple[Tensor | None, ...]:
        activations = ctx.activations
        depth = len(activations)
        x, *saved = ctx.saved_tensors
        weights, biases = saved[:depth], saved[depth : 2 * depth]
        c = Coefficients(*saved[2 * depth : 2 * depth + _COEFFICIENT_FIELDS])
        needs = ctx.needs_input_grad
        needs_params = needs[3:]
        if torch.is_grad_enabled():
            # create_graph=True: the recursion's own products are not differentiable in x, W, b
            # (the tape holds them as constants), so the forward reruns under autograd instead.
            with torch.enable_grad():
                outputs, _ = taylor_forward(x, activations, weights, biases, c)
            inputs = [
                t for t, need in zip((x, *weights, *biases), (needs[0], *needs_params), strict=True) if need
            ]
            grads = iter(
                torch.autograd.grad(
                    outputs, inputs, (u_bar, du_bar, Du_bar), create_graph=True, allow_unused=True
                )
            )
            return (
                next(grads) if needs[0] else None,
                None,
                None,
                *(next(grads) if n else None for n in needs_params),
            )
        flat = saved[2 * depth + _COEFFICIENT_FIELDS :]
        tape = [LayerTape(*flat[k * _TAPE_FIELDS : (k + 1) * _TAPE_FIELDS]) for k in range(depth)]
        grad_x, grad_weights, grad_biases = taylor_backward(
            x, activations, weights, c, tape, (u_bar, du_bar, Du_bar), needs_x=needs[0]
        )
        grads = [
            g if need else None for g, need in zip((*grad_weights, *grad_biases), needs_params, strict=True)
        ]
        return (grad_x, None, None, *grads)


def taylor_derivatives(
    x: Tensor,
    activations: Sequence[Activation],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    c: Coefficients,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, ∂u, Du)`` of the stack at ``x`` (N, d): by :class:`TaylorFunction` where it can serve.

    Elsewhere (torch.func, torch.compile, coefficients that require grad, an activation without σ''')
    autograd differentiates :func:`~torch_backprop.pde.taylor.taylor_forward` itself.
    """
    params = (*weights, *biases)
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    if not tracked:
        return taylor_forward(x, activations, weights, biases, c, lean=not torch.is_grad_enabled())[0]
    node = (
        not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
        and not any(t is not None and t.requires_grad for t in c)
        and all(_has_third_derivative(act) for act in activations)
    )
    if not node:
        return taylor_forward(x, activations, weights, biases, c)[0]
    return TaylorFunction.apply(x, tuple(activations), c, *params)


def _has_third_derivative(act: Activation) -> bool:
    """Whether TA3 can be computed for ``act``: σ''' is known, or σ'' (and so σ''' too) is zero."""
    return (
        act.derivative_from == "none"
        or act.second_derivative is zero_second_derivative
        or act.third_derivative is not None
    )
