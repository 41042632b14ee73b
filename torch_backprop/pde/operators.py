r"""u, ∂u/∂x and D u = Σ C_jk ∂²u/∂x_j∂x_k + Σ b_i ∂u/∂x_i of a BackpropMLP in one forward pass.

The public entry points. :func:`input_derivatives` takes the coordinates and the coefficients of
the operator (a Laplacian, a diffusion term such as Black-Scholes' ½σ²S² ∂²/∂S², any symmetric
matrix, constant or per point, and a first-order term) and returns the network's value, its
gradient in those coordinates and the operator applied to it, from :mod:`torch_backprop.pde.taylor`
(TY1-TY4); ``.backward()`` through them runs TA1-TA5. :func:`laplacian` is the common case C = I.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.activations import zero_second_derivative
from ..core.checks import check_input
from ..core.module import BackpropMLP
from .function import taylor_derivatives
from .taylor import Coefficients

__all__ = ["InputDerivatives", "checked_operator", "input_derivatives", "laplacian"]


class InputDerivatives(NamedTuple):
    """The network's value and its input derivatives at each point.

    Attributes:
        value: u, ``(*, H_out)``: the model's output.
        gradient: ∂u/∂x_{i_k}, ``(*, H_out, K)``: the Jacobian's columns for the K coordinates, as
            ``torch.func.vmap(torch.func.jacrev(model))`` lays it out.
        operator: D u = Σ_jk C_jk ∂²u/∂x_{i_j}∂x_{i_k} + Σ_i b_i ∂u/∂x_i, ``(*, H_out)``; the
            Laplacian Δu for C = I and no b.
    """

    value: Tensor
    gradient: Tensor
    operator: Tensor


def input_derivatives(
    model: BackpropMLP,
    input: Tensor,
    coordinates: Sequence[int] | Tensor | None = None,
    *,
    diagonal: Tensor | None = None,
    matrix: Tensor | None = None,
    drift: Tensor | None = None,
) -> InputDerivatives:
    r"""u, its gradient and a linear second-order operator D u of ``model`` at ``input``, in one pass.

    D = Σ_jk C_jk ∂²/∂x_{i_j}∂x_{i_k} + Σ_i b_i ∂/∂x_i: second derivatives over the chosen
    coordinates i_1, ..., i_K, with C given by its ``diagonal`` or as a ``matrix`` (neither: C = I,
    the Laplacian), and an optional first-order term b (``drift``) over all input coordinates, each
    for all points or one per point. The first-order term costs nothing beyond the second-order one
    (it enters D u at the first layer), so a PDE residual such as Black-Scholes'
    u_t + r S u_S + ½σ²S² u_SS needs derivatives carried for S alone. The derivatives are carried up
    the stack beside h^(l) (TY1-TY4 of
    :mod:`torch_backprop.pde.taylor`), so no backward runs to compute them; a loss of them
    (a PDE residual) backpropagates to the parameters (and to ``input``) by the adjoint recursion
    TA1-TA5 as one autograd node. Double backward works (``create_graph=True`` reruns the
    forward under autograd), and so do torch.func transforms and torch.compile, by autograd over
    the same forward. The results equal ``torch.func.jacrev`` / ``torch.func.hessian`` of the
    native twin to round-off (the test suite checks every activation).

    Args:
        model: a :class:`~torch_backprop.BackpropMLP` (every registered activation works; one
            registered without σ'' is refused).
        input: the points, ``(*, H_in)``.
        coordinates: the K input coordinates the derivatives are taken in (indices into the last
            dimension of ``input``); default: all of them.
        diagonal: C's diagonal, ``(K,)`` for every point or ``(*, K)`` per point (e.g.
            ``[0, ½σ²S²]`` for Black-Scholes' diffusion over coordinates ``(t, S)``).
        matrix: C itself, ``(K, K)`` or ``(*, K, K)``; only its symmetric part counts.
        drift: b, the first-order coefficients over all input coordinates, ``(H_in,)`` or
            ``(*, H_in)``; default none.

    Returns:
        :class:`InputDerivatives` ``(value, gradient, operator)``.

    Shape:
        - Input: :math:`(*, H_{in})`.
        - Output: value and operator :math:`(*, H_{out})`, gradient :math:`(*, H_{out}, K)`.

    Raises:
        TypeError: ``model`` is not a BackpropMLP; ``input``, coordinates or coefficients of the
            wrong type or dtype.
        ValueError: a bad input shape, coordinates outside [0, H_in), both ``diagonal`` and
            ``matrix``, coefficients of the wrong shape, an activation without σ'', dropout active
            in training mode.
        RuntimeError: under torch.autocast, inside a ``per_sample`` or ``curvature`` block, or with
            layers that must run their own forward (hooks, parametrizations).

    Example:
        >>> model = BackpropMLP([2, 64, 64, 1], "tanh")
        >>> x = torch.rand(256, 2)
        >>> u, grad, u_ss = input_derivatives(model, x, coordinates=[1], diagonal=torch.ones(1))
        >>> grad.shape, u_ss.shape
        (torch.Size([256, 1, 1]), torch.Size([256, 1]))

    Warns:
        UserWarning: every activation of ``model`` has σ'' ≡ 0 (``identity``, ``relu``,
            ``leaky_relu``), so the operator's second-order part is 0 at every point; shown once
            per calling line (Python's default warning filter).
    """
    return _input_derivatives(model, input, coordinates, diagonal, matrix, drift, "input_derivatives")


def laplacian(model: BackpropMLP, input: Tensor) -> InputDerivatives:
    r"""u, ∇u and the Laplacian Δu = Σ_i ∂²u/∂x_i² of ``model`` at ``input``, in one forward pass.

    :func:`input_derivatives` with every coordinate and C = I (its errors and warning name
    ``laplacian``).

    Example:
        >>> model = BackpropMLP([10, 128, 128, 1], "tanh")
        >>> u, grad, lap = laplacian(model, torch.rand(512, 10))
        >>> lap.shape
        torch.Size([512, 1])
    """
    return _input_derivatives(model, input, None, None, None, None, "laplacian")


def _input_derivatives(
    model: BackpropMLP,
    input: Tensor,
    coordinates: Sequence[int] | Tensor | None,
    diagonal: Tensor | None,
    matrix: Tensor | None,
    drift: Tensor | None,
    caller: str,
) -> InputDerivatives:
    """:func:`input_derivatives`, its errors and warning naming ``caller``, the function the user called."""
    weights, biases, c = checked_operator(
        model, input, caller, coordinates, diagonal, matrix, drift, warn_stacklevel=4
    )
    leading = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1])
    u, du, Du = taylor_derivatives(x, model.activations, weights, biases, c)
    du = du.permute(1, 2, 0)  # (K, N, H_out) -> (N, H_out, K)
    if input.dim() == 2:
        return InputDerivatives(u, du, Du)
    out = u.shape[-1]
    return InputDerivatives(
        u.reshape(*leading, out), du.reshape(*leading, out, du.shape[-1]), Du.reshape(*leading, out)
    )


def checked_operator(
    model: BackpropMLP,
    input: Tensor,
    caller: str,
    coordinates: Sequence[int] | Tensor | None = None,
    diagonal: Tensor | None = None,
    matrix: Tensor | None = None,
    drift: Tensor | None = None,
    *,
    warn_stacklevel: int | None = None,
) -> tuple[list[Tensor], list[Tensor | None], Coefficients]:
    """The model's weights and biases and the checked :class:`Coefficients`, or one clear error.

    Every check :func:`input_derivatives` documents, before anything is computed; ``caller`` names
    the public function in the messages. With ``warn_stacklevel`` (the user's frame, counted from
    here), the warning for a model whose every σ'' is zero.
    """
    if not isinstance(model, BackpropMLP):
        raise TypeError(f"{caller} expects a torch_backprop.BackpropMLP, got {type(model).__name__}")
    weights, biases = _parameters(model, caller)
    check_input(input, weights[0], caller)
    if torch.is_autocast_enabled(input.device.type):
        raise RuntimeError(
            f"{caller} computes in the parameters' dtype ({weights[0].dtype}) and does not run under "
            "torch.autocast; call it outside the autocast region"
        )
    missing = [
        repr(a) for a in model.activations if a.derivative_from != "none" and a.second_derivative is None
    ]
    if missing:
        raise ValueError(
            f"{caller} needs σ'' of every activation; {', '.join(missing)} has none "
            "(register it with second_derivative=...)"
        )
    c = _coefficients(input, coordinates, diagonal, matrix, drift, caller)
    flat = all(a.second_derivative is zero_second_derivative for a in model.activations)
    if warn_stacklevel is not None and flat:
        names = ", ".join(dict.fromkeys(a.name for a in model.activations))
        warnings.warn(
            f"{caller}: every activation of this BackpropMLP ({names}) has σ'' ≡ 0, so the second-order "
            "part of the operator is 0 at every point (Δu ≡ 0), and a PDE loss of it has no second-order "
            "term; for second derivatives use a smooth activation such as tanh, gelu, silu or softplus",
            stacklevel=warn_stacklevel,
        )
    return weights, biases, c


def _parameters(model: BackpropMLP, caller: str) -> tuple[list[Tensor], list[Tensor | None]]:
    """The layers' weights and biases, or a clear error where the stack cannot be read as TY1-TY4."""
    if model.backward_phase is not None:
        raise RuntimeError(
            f"{caller} cannot run inside a per_sample or curvature block (their backward replaces "
            "the slides' one, not the input-derivative one); call it outside the block"
        )
    if model.training and model.dropout > 0:
        raise ValueError(
            f"{caller} evaluates the network without dropout, but the model is in training mode with "
            f"dropout={model.dropout}; call model.eval() (or build it with dropout=0)"
        )
    weights, biases = [], []
    for k, layer in enumerate(model.layers):
        hooks = layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
        if type(layer) is not nn.Linear or hooks or "weight" not in layer._parameters:
            raise RuntimeError(
                f"{caller} reads the layers' weights directly, but layers[{k}] must run its own forward "
                "(hooks, a parametrization or a subclass); remove them or use the native twin "
                "model.to_sequential() with torch.func"
            )
        weights.append(layer.weight)
        biases.append(layer.bias)
    return weights, biases


def _coefficients(
    input: Tensor,
    coordinates: Sequence[int] | Tensor | None,
    diagonal: Tensor | None,
    matrix: Tensor | None,
    drift: Tensor | None,
    caller: str,
) -> Coefficients:
    """The checked :class:`Coefficients`, per-point ones flattened to the N rows of the input."""
    dim = input.shape[-1]
    if coordinates is None:
        index = torch.arange(dim, device=input.device)
    else:
        if isinstance(coordinates, Tensor):
            values = (
                coordinates.tolist()
                if coordinates.dim() == 1 and not coordinates.is_floating_point()
                else None
            )
        else:
            values = list(coordinates) if isinstance(coordinates, (list, tuple, range)) else None
        if not values or any(isinstance(i, bool) or not isinstance(i, int) for i in values):
            raise TypeError(
                f"{caller} expects coordinates as a non-empty list of integers, got {coordinates!r}"
            )
        if any(not 0 <= i < dim for i in values):
            raise ValueError(
                f"{caller} expects coordinates in [0, {dim}) (the input's last dimension), got {values}"
            )
        index = torch.tensor(values, dtype=torch.long, device=input.device)
    count = index.numel()
    if diagonal is not None and matrix is not None:
        raise ValueError(f"{caller} takes the coefficients as diagonal= or as matrix=, not both")
    leading = tuple(input.shape[:-1])
    rows = input.numel() // dim if dim else 0
    second = Coefficients(index)
    if diagonal is not None:
        _check_coefficient_tensor(diagonal, "diagonal", input, caller)
        if tuple(diagonal.shape) == (count,):
            second = Coefficients(index, diagonal=diagonal)
        elif tuple(diagonal.shape) == (*leading, count):
            second = Coefficients(index, diagonal=diagonal.reshape(rows, count))
        else:
            raise ValueError(
                f"{caller} expects diagonal of shape ({count},) or {(*leading, count)} (one per point), "
                f"got {tuple(diagonal.shape)}"
            )
    if matrix is not None:
        _check_coefficient_tensor(matrix, "matrix", input, caller)
        if tuple(matrix.shape) == (count, count):
            second = Coefficients(index, matrix=0.5 * (matrix + matrix.t()))
        elif tuple(matrix.shape) == (*leading, count, count):
            symmetric = 0.5 * (matrix + matrix.transpose(-1, -2))
            second = Coefficients(index, matrix=symmetric.reshape(rows, count, count))
        else:
            raise ValueError(
                f"{caller} expects matrix of shape ({count}, {count}) or {(*leading, count, count)} "
                f"(one per point), got {tuple(matrix.shape)}"
            )
    if drift is None:
        return second
    _check_coefficient_tensor(drift, "drift", input, caller)
    if tuple(drift.shape) == (dim,):
        return second._replace(drift=drift)
    if tuple(drift.shape) == (*leading, dim):
        return second._replace(drift=drift.reshape(rows, dim))
    raise ValueError(
        f"{caller} expects drift of shape ({dim},) or {(*leading, dim)} (one per point), "
        f"got {tuple(drift.shape)}"
    )


def _check_coefficient_tensor(t: Tensor, name: str, input: Tensor, caller: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{caller} expects {name} to be a tensor, got {type(t).__name__}")
    if t.dtype != input.dtype or t.device != input.device:
        raise TypeError(
            f"{caller} expects {name} of dtype {input.dtype} on {input.device} (the input's), "
            f"got {t.dtype} on {t.device}"
        )
