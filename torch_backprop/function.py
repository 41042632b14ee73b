r"""MLPFunction: the slides' forward and backward phases for a whole fully connected stack.

Implements "Backpropagation of Deep Neural Network" (A. Tse, UCL, 2022) top-down, in the order of
slide 10: the forward phase (slide 3) and beside it its forward-mode derivative (the tangent phase,
T1-T2), the tape they leave for the backward phase, the δ recursion (BP1-BP2, slides 8-10), the
backward phase (BP3-BP5), and last the ``torch.autograd.Function``
plumbing that connects them to autograd (written in the style PyTorch's extending guide asks of
functions that ``torch.func`` transforms: ``forward`` + ``setup_context``, ``generate_vmap_rule``).

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
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from .activations import Activation, out_kernels_allowed

__all__ = [
    "MLPFunction",
    "Stack",
    "Tape",
    "apply_mlp",
    "backward_phase",
    "deltas",
    "forward_phase",
    "tangent_phase",
    "lowest_layer",
]


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


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)
