r"""MLPFunction: the slides' phases (:mod:`torch_backprop.core.phases`) as one autograd node.

The phases are plain functions; this module connects them to autograd, as PyTorch's extending guide
asks of functions that ``torch.func`` transforms (``forward`` + ``setup_context``,
``generate_vmap_rule``), with a classic-style twin for eager mode and a jvp-less one for
``torch.compile``, and applies the node to checked arguments (:func:`checked_mlp`: rows, dropout
masks). Notation and equations (BP1-BP5, T1-T2): :mod:`torch_backprop.core.phases`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from .activations import Activation
from .phases import (
    Stack,
    Tape,
    _cast,
    backward_phase,
    dropout_masks,
    forward_phase,
    make_tape,
    tangent_phase,
)

__all__ = ["MLPFunction", "apply_mlp", "checked_mlp", "compute_dtype"]


# ---------------------------------------------------------------------------------------------
# Autograd plumbing: MLPFunction connects the phases above to autograd.


class MLPFunction(torch.autograd.Function):
    """The whole stack ``x -> h^(L)`` with the slides' δ recursion as its backward.

    Notation and equations: see this module's docstring (BP1-BP5).

    Forward mode (``jvp``: torch.func.jvp, jacfwd, hessian, dual numbers) is the tangent phase, T1-T2,
    in differentiable ops, so reverse mode over it works, and forward mode over the backward works
    because that backward, inside forward mode, reruns the forward and avoids the ``out=`` kernels.

    Three backward paths, each held to native autograd by the tests:
        * lean (default): forward keeps h^(l) (and z^(l) where σ' needs it); backward is the recursion.
        * recompute (``recompute=True``): forward keeps only its inputs; backward reruns the forward.
        * double backward (``create_graph=True``, and inside torch.func): the forward is rerun
          under autograd, so that the recursion, written in differentiable ops, is itself differentiable
          in x, W, b and ∂Q/∂h^(L).

    Call as ``MLPFunction.apply(x, activations, recompute, backward_phase, *weights, *biases, *masks)``
    with x of shape (N, n_0) and the :class:`Stack` flattened: L weights, L biases (``None`` for none)
    and L - 1 dropout masks m^(l) (``None`` for none); ``backward_phase`` is ``None`` for
    :func:`backward_phase`, or a replacement with the same signature (per-sample gradients use one).
    It returns ``(h^(L), *hidden, *pre_activations)``, of which only h^(L) is differentiable.
    :func:`torch_backprop.functional.mlp` is the friendly entry point.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        activations: tuple[Activation, ...],
        recompute: bool,
        backward_phase: Any,
        *params: Tensor | None,
    ) -> tuple[Tensor, ...]:
        # σ out of place: tracers (torch.func.linearize's const folding) may turn z into a leaf.
        h_last, hidden, pre_activations = forward_phase(
            x, activations, Stack.unflatten(params, len(activations)), in_place=False
        )
        return (h_last, *hidden, *pre_activations)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output[1:])
        x, activations, recompute, backward_phase, *params = inputs
        depth = len(activations)
        forward = (output[0], output[1:depth], output[depth:])
        _save_for_backward(ctx, x, activations, recompute, backward_phase, params, forward)
        ctx.outputs = len(output)

    @staticmethod
    def jvp(ctx: Any, x_dot: Tensor | None, *tangents: Tensor | None) -> tuple[Tensor | None, ...]:
        h_dot = _jvp(ctx, x_dot, tangents[3:])
        return (h_dot, *(None,) * (ctx.outputs - 1))  # the other outputs are not differentiable

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        depth = len(ctx.activations)
        if grad_output is None:
            return (None,) * (3 * depth + 3)
        device_type, mixed, _ = ctx.autocast
        if torch.is_autocast_enabled(device_type):
            # The backward phase casts explicitly, as native autograd's does; a backward called
            # inside an autocast region must not recast it (a rerun of the forward sets its own state).
            with torch.autocast(device_type, enabled=False):
                return MLPFunction.backward(ctx, grad_output)
        needs = ctx.needs_input_grad
        grad_x, grad_weights, grad_biases = (ctx.backward_phase or backward_phase)(
            _tape(ctx, grad_output),
            needs_x=needs[0],
            needs_weight=needs[4 : 4 + depth],
            needs_bias=needs[4 + depth : 4 + 2 * depth],
        )
        if mixed:  # under autocast, cast back from the compute dtype
            x, *params = ctx.saved_tensors[: 3 * depth]
            stack = Stack.unflatten(params, depth)
            grad_x = _cast(grad_x, x.dtype)
            grad_weights = [_cast(g, w.dtype) for g, w in zip(grad_weights, stack.weights, strict=True)]
            grad_biases = [
                _cast(g, b.dtype) if b is not None else None
                for g, b in zip(grad_biases, stack.biases, strict=True)
            ]
        return (grad_x, None, None, None, *grad_weights, *grad_biases, *(None,) * (depth - 1))


def _tape(ctx: Any, grad_output: Tensor | None, rerun: bool | None = None, in_place: bool = True) -> Tape:
    """The :class:`Tape` of a forward call: from its saved tensors, or from a rerun of its forward phase.

    The forward reruns with ``recompute``, and where ``rerun`` says (by default, when grad is
    enabled, i.e. ``create_graph=True``, or when forward AD is active, whose tangents the saved
    tensors do not carry).
    """
    activations = ctx.activations
    depth = len(activations)
    saved = ctx.saved_tensors  # x, the flat Stack (3L - 1), then (h^(L), *hidden, *pre_activations)
    x, stack = saved[0], Stack.unflatten(saved[1 : 3 * depth], depth)
    if rerun is None:
        rerun = torch.is_grad_enabled() or forward_ad._current_level >= 0  # create_graph, or dual numbers
    if ctx.recompute or rerun:
        # Rerun the forward (under autograd when create_graph=True, so the recursion is
        # differentiable in x, W and b), in the autocast state the forward ran in.
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            output = activations[-1].derivative_from != "none"  # else BP1 does not read h^(L)
            forward = forward_phase(x, activations, stack, output=output, in_place=in_place)
    else:
        kept = saved[3 * depth :]
        forward = (kept[0], kept[1:depth], kept[depth:])
    return make_tape(grad_output, x, activations, stack, forward, ctx.compute_dtype, ctx.autocast[1])


class _CompiledMLPFunction(MLPFunction):
    """MLPFunction without its ``jvp``, for torch.compile.

    Dynamo refuses to trace a Function that defines one ("Unsupported custom jvp"), so forward mode
    is not available inside a compiled region.
    """

    jvp = staticmethod(torch.autograd.Function.jvp)


def _jvp(ctx: Any, x_dot: Tensor | None, params_dot: Sequence[Tensor | None]) -> Tensor | None:
    """ḣ^(L) of a forward call, from the tangents of x and of the flat :class:`Stack` (T1-T2).

    The tape comes from the saved tensors, or, when the tangent must be differentiable in x, W and
    b (reverse-over-forward: grad enabled and an input that requires grad; or an outer torch.func
    transform), from a rerun of the forward phase, under autograd as the double backward's.
    """
    if _forward_over_forward():
        raise NotImplementedError(
            "BackpropMLP: forward mode over forward mode (e.g. torch.func.jacfwd(jacfwd(f))) is not "
            "supported: autograd turns forward AD off while a custom Function's jvp runs, so the outer "
            "forward mode cannot see the tangent phase; use forward-over-reverse, "
            "torch.func.hessian(f) = jacfwd(jacrev(f)), or the native twin model.to_sequential()"
        )
    depth = len(ctx.activations)
    dot = Stack.unflatten(params_dot, depth)
    if x_dot is None and all(t is None for t in (*dot.weights, *dot.biases)):
        return None
    # Under an outer torch.func transform (jacrev(jvp(f)), jacfwd(jacfwd(f))) the saved outputs
    # carry none of its derivatives (they are wrapped for it, and do not show as requires_grad),
    # so there the forward reruns too.
    inputs = ctx.saved_tensors[: 3 * depth]
    rerun = torch._C._are_functorch_transforms_active() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    )
    tape = _tape(ctx, None, rerun=rerun, in_place=False)
    return tangent_phase(tape, x_dot, dot.weights, dot.biases)


def _forward_over_forward() -> bool:
    """Whether a jvp runs under a second torch.func forward-mode transform (jacfwd(jacfwd(f)))."""
    interpreters = retrieve_all_functorch_interpreters()
    return sum(i.key() == TransformType.Jvp for i in interpreters) > 1


class _EagerMLPFunction(torch.autograd.Function):
    """MLPFunction in the classic style (``ctx`` in ``forward``), for eager mode outside torch.func.

    The same forward phase, the same saved tensors and the same backward; what it avoids is the
    per-call argument binding (``inspect.signature``) that autograd does for ``setup_context``
    Functions, which costs more than a small network's whole step. It returns h^(L) only.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        activations: tuple[Activation, ...],
        recompute: bool,
        backward_phase: Any,
        *params: Tensor | None,
    ) -> Tensor:
        stack = Stack.unflatten(params, len(activations))
        dual = forward_ad._current_level >= 0  # forward mode (dual numbers) reaches this call
        forward = forward_phase(x, activations, stack, in_place=not dual)  # see MLPFunction
        _save_for_backward(ctx, x, activations, recompute, backward_phase, params, forward, tangents=dual)
        return forward[0]

    backward = MLPFunction.backward

    @staticmethod
    def jvp(ctx: Any, x_dot: Tensor | None, *tangents: Tensor | None) -> Tensor | None:
        return _jvp(ctx, x_dot, tangents[3:])


def apply_mlp(
    x: Tensor,
    activations: tuple[Activation, ...],
    recompute: bool,
    backward_phase: Any,
    *params: Tensor | None,
) -> Tensor:
    """h^(L) of ``MLPFunction.apply`` (same arguments), through the cheaper eager twin where allowed."""
    compiling = torch.compiler.is_compiling()  # torch.compile, and torch.export
    transformed = torch._C._are_functorch_transforms_active()
    if not (compiling or transformed):
        return _EagerMLPFunction.apply(x, activations, recompute, backward_phase, *params)
    if compiling and torch.compiler.is_exporting():
        # torch.export keeps no custom backward; strict export would record the Function's forward
        # under no_grad, so the exported program could not be differentiated. The forward phase
        # itself is exported instead, which native autograd differentiates as it does the twin's.
        return forward_phase(x, activations, Stack.unflatten(params, len(activations)), in_place=False)[0]
    if compiling:
        return _CompiledMLPFunction.apply(x, activations, recompute, backward_phase, *params)[0]
    return MLPFunction.apply(x, _Activations(activations), recompute, backward_phase, *params)[0]


class _Activations(tuple):
    """σ_1, ..., σ_L as one pytree leaf (a tuple subclass), as torch.func passes it to MLPFunction.

    torch.func's generated vmap rule for the jvp pairs the flattened inputs with the tangents, one per
    argument; a plain tuple argument flattens to L leaves and breaks that pairing under nested forward
    mode (``jacfwd(jacfwd(f))``), before :func:`_jvp` can say why that is not supported.
    """

    __slots__ = ()


def _save_for_backward(
    ctx: Any,
    x: Tensor,
    activations: tuple[Activation, ...],
    recompute: bool,
    backward_phase: Any,
    params: Sequence[Tensor | None],
    forward: tuple[Tensor | None, Sequence[Tensor], Sequence[Tensor]],
    tangents: bool = True,
) -> None:
    """Keep what the backward phase reads: x, the parameters and (unless ``recompute``) ``forward``.

    ``forward`` is the forward phase's ``(h^(L), hidden, pre_activations)``; h^(L) is kept only
    where σ'_L reads it. With ``tangents`` the same tensors are kept for the tangent phase (jvp),
    which reads the same tape; an eager call outside forward mode passes ``False``, since no jvp
    can reach it.
    """
    ctx.set_materialize_grads(False)
    ctx.activations, ctx.recompute, ctx.backward_phase = activations, recompute, backward_phase
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        ctx.autocast = (device_type, True, torch.get_autocast_dtype(device_type))
        ctx.compute_dtype = compute_dtype(x, params[0])
    else:
        ctx.autocast = (device_type, False, None)
        ctx.compute_dtype = params[0].dtype
    # Parameters are saved by reference (no copy; they live anyway), so that create_graph=True
    # can rerun the forward phase.
    if recompute:
        ctx.save_for_backward(x, *params)
        if tangents:
            ctx.save_for_forward(x, *params)
        return
    h_last, hidden, pre_activations = forward
    if activations[-1].derivative_from != "h":
        h_last = None
    ctx.save_for_backward(x, *params, h_last, *hidden, *pre_activations)
    if tangents:
        ctx.save_for_forward(x, *params, h_last, *hidden, *pre_activations)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the layer products run in: autocast's where it applies, else the weights'."""
    device_type = x.device.type
    eligible = weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if eligible and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def checked_mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: tuple[Activation, ...],
    dropout: float,
    training: bool,
    recompute: bool,
    backward_phase: Callable[..., Any] | None,
) -> Tensor:
    """h^(L) of the stack for arguments already checked (as BackpropMLP's are): no checks, no conversions.

    Input ``(*, n_0)`` is taken as rows; the dropout masks m^(l) are drawn here when training.
    """
    rows = input.dim() == 2
    x = input if rows else input.reshape(-1, input.shape[-1])
    if training and dropout > 0 and len(weights) > 1:
        widths = [weight.shape[0] for weight in weights[:-1]]
        masks = dropout_masks(x.shape[0], widths, dropout, compute_dtype(x, weights[0]), x.device)
    else:
        masks = [None] * (len(weights) - 1)
    h_last = apply_mlp(x, activations, recompute, backward_phase, *weights, *biases, *masks)
    return h_last if rows else h_last.reshape(*input.shape[:-1], h_last.shape[-1])
