r"""FusedLossFunction: the loss inside the stack as one autograd node (the slides' BP1 start).

The math (the losses' Q and Q', FL1-FL3, and the checks of names, options and targets) is
:mod:`torch_backprop.core.losses`; this module connects it to autograd, as
:mod:`torch_backprop.core.function` does for the stack alone: one node runs the forward phase and the
loss, and its backward hands Q' to the unchanged recursion (BP1, then BP2-BP5). :func:`stack_loss`
applies the node to checked arguments; the entry points with their checks are
:func:`torch_backprop.functional.mlp_loss` and :meth:`torch_backprop.BackpropMLP.loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .activations import Activation
from .losses import FusedLoss, loss_and_gradient, loss_backward, loss_forward
from .phases import Stack, backward_phase, dropout_masks, forward_phase, make_tape

__all__ = ["FusedLossFunction", "apply_fused_loss", "check_per_sample", "fusable", "stack_loss"]


# ---------------------------------------------------------------------------------------------
# Autograd plumbing: one node for forward phase, loss and backward phase.

# Tensor arguments before the flat Stack, and how many non-tensor ones follow them.
_TENSORS, _OPTIONS = 4, 3  # x, target, weight, pos_weight; activations, spec, backward_phase


class FusedLossFunction(torch.autograd.Function):
    """Q of the whole stack and its loss in one node; its backward starts the recursion from Q' (BP1).

    Call as ``FusedLossFunction.apply(x, target, weight, pos_weight, activations, spec,
    backward_phase, *weights, *biases, *masks)`` with x (N, n_0) rows, the target as rows and the
    :class:`~torch_backprop.core.phases.Stack` flattened as for MLPFunction. Returns
    ``(Q, Q', h^(L), *hidden, *pre_activations)``, of which only Q is differentiable.
    Gradients flow to x and the stack; the target and the weights are constants (the callers take
    the native path when one of them requires grad).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        pos_weight: Tensor | None,
        activations: tuple[Activation, ...],
        spec: FusedLoss,
        backward_phase: Any,
        *params: Tensor | None,
    ) -> tuple[Tensor, ...]:
        h_last, hidden, pre_activations = forward_phase(
            x, activations, Stack.unflatten(params, len(activations))
        )
        loss, q_prime = loss_and_gradient(spec, h_last, target, weight, pos_weight)
        return (loss, q_prime, h_last, *hidden, *pre_activations)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output[1:])
        depth = len(inputs[_TENSORS])
        forward = (output[2], output[3 : 2 + depth], output[2 + depth :])
        _save(ctx, inputs, "q", (output[1],), forward)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        activations = ctx.activations
        depth = len(activations)
        nones = (None,) * (_TENSORS + _OPTIONS - 1)
        if grad_loss is None:
            return (None, *nones, *(None,) * (3 * depth - 1))
        saved = ctx.saved_tensors  # x, target, weight, pos_weight, the flat Stack, state, h^(L), hidden, z
        x, target, weight, pos_weight = saved[:_TENSORS]
        stack = Stack.unflatten(saved[_TENSORS : _TENSORS + 3 * depth - 1], depth)
        state_end = _TENSORS + 3 * depth - 1 + ctx.state_size
        state, kept = saved[_TENSORS + 3 * depth - 1 : state_end], saved[state_end:]
        if torch.is_grad_enabled():
            # create_graph=True (and torch.func): rerun the forward phase and Q' (closed form) under
            # autograd, so that the recursion is differentiable in x, W, b and the upstream gradient
            forward = forward_phase(x, activations, stack)
            q_prime = loss_and_gradient(ctx.spec, forward[0], target, weight, pos_weight)[1]
            grad_output = q_prime * grad_loss
        else:
            forward = (kept[0], kept[1:depth], kept[depth:])
            grad_output = loss_backward(ctx.spec, ctx.how, state, grad_loss, target, weight)
        tape = make_tape(grad_output, x, activations, stack, forward, ctx.compute_dtype, False)
        needs = ctx.needs_input_grad
        first = _TENSORS + _OPTIONS
        grad_x, grad_weights, grad_biases = (ctx.backward_phase or backward_phase)(
            tape,
            needs_x=needs[0],
            needs_weight=needs[first : first + depth],
            needs_bias=needs[first + depth : first + 2 * depth],
        )
        return (grad_x, *nones, *grad_weights, *grad_biases, *(None,) * (depth - 1))


def _save(
    ctx: Any, inputs: Sequence[Any], how: str, state: Sequence[Tensor], forward: tuple[Tensor, Any, Any]
) -> None:
    x, target, weight, pos_weight, activations, spec, phase, *params = inputs
    ctx.set_materialize_grads(False)
    ctx.activations, ctx.spec, ctx.backward_phase = activations, spec, phase
    ctx.how, ctx.state_size = how, len(state)
    ctx.compute_dtype = params[0].dtype
    h_last, hidden, pre_activations = forward
    if activations[-1].derivative_from != "h":
        h_last = None
    ctx.save_for_backward(x, target, weight, pos_weight, *params, *state, h_last, *hidden, *pre_activations)


class _EagerFusedLossFunction(torch.autograd.Function):
    """FusedLossFunction in the classic style, for eager mode (no per-call ``setup_context`` binding)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        x, target, weight, pos_weight, activations, spec, _, *params = inputs
        forward = forward_phase(x, activations, Stack.unflatten(params, len(activations)))
        loss, how, state = loss_forward(spec, forward[0], target, weight, pos_weight)
        _save(ctx, inputs, how, state, forward)
        return loss

    backward = FusedLossFunction.backward


def apply_fused_loss(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    activations: tuple[Activation, ...],
    spec: FusedLoss,
    backward_phase: Any,
    *params: Tensor | None,
) -> Tensor:
    """Q of ``FusedLossFunction.apply`` (same arguments), through the cheaper eager twin where allowed."""
    args = (x, target, weight, pos_weight, activations, spec, backward_phase, *params)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return FusedLossFunction.apply(*args)[0]
    return _EagerFusedLossFunction.apply(*args)


# ---------------------------------------------------------------------------------------------
# On checked arguments: whether the node is exact, per_sample's rule, rows and masks.


def fusable(input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None) -> bool:
    """Whether the fused node gives the exact result.

    Not under autocast, and the target and the weights must be constants (the node has no gradient
    for them).
    """
    if torch.is_autocast_enabled(input.device.type):
        return False
    return not any(t is not None and t.requires_grad for t in (target, weight, pos_weight))


def check_per_sample(spec: FusedLoss, phase: Any, target: Tensor, weight: Tensor | None) -> None:
    """In a ``per_sample`` block (a phase with ``loss_reduction``): the loss is its per-sample sum or mean.

    Raises:
        ValueError: a reduction other than the block's, or a "mean" whose denominator is not the
            number of rows (class weights, ignored targets), which mixes the samples.
    """
    block = getattr(phase, "loss_reduction", None)
    if block is None:
        return
    if spec.reduction != block:
        raise ValueError(
            f"BackpropMLP.loss: reduction {spec.reduction!r} inside a per_sample block with "
            f"loss_reduction={block!r}; use the same reduction"
        )
    if spec.reduction == "mean" and spec.kind == "cross_entropy":
        if weight is not None or bool((target == spec.ignore_index).any()):
            raise ValueError(
                "BackpropMLP.loss: cross_entropy 'mean' with class weights or ignored targets divides by "
                "a sum over the whole batch, so it is no mean of per-sample terms; use reduction='sum' "
                "(and loss_reduction='sum') inside per_sample"
            )


def stack_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: tuple[Activation, ...],
    dropout: float,
    training: bool,
    phase: Any,
    spec: FusedLoss,
) -> Tensor:
    """The fused node on checked arguments: input and target flattened to rows, dropout masks drawn."""
    classes = weights[-1].shape[0]
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    if spec.kind == "cross_entropy":
        y = target.reshape(-1)
    else:
        y = target.reshape(-1, classes)
        if weight is not None and weight.dim() > 1:
            weight = weight.reshape(-1, classes)
    if training and dropout > 0 and len(weights) > 1:
        widths = [w.shape[0] for w in weights[:-1]]
        masks = dropout_masks(x.shape[0], widths, dropout, weights[0].dtype, x.device)
    else:
        masks = [None] * (len(weights) - 1)
    return apply_fused_loss(x, y, weight, pos_weight, activations, spec, phase, *weights, *biases, *masks)
