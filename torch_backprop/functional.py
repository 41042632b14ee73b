"""The functional form of the stack: ``mlp(input, weights, biases, activations)``.

Checks its arguments (every error before any work), flattens ``(*, n_0)`` input to rows, draws
the dropout masks and calls :class:`~torch_backprop.function.MLPFunction`, which implements the
slides' forward and backward phases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .activations import Activation, ActivationLike, resolve_activations
from .function import apply_mlp, compute_dtype

__all__ = ["check_input", "checked_mlp", "dropout_masks", "mlp"]


def check_input(input: Tensor, weight: Tensor, caller: str = "mlp") -> None:
    """Raise a clear error unless ``input`` can enter a stack whose first weight is ``weight``.

    Raises:
        TypeError: not a tensor, not floating point, or a dtype other than the weights'
            (outside autocast).
        ValueError: a 0-d tensor, the wrong last dimension, or another device than the weights.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{caller} expects a torch.Tensor input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"{caller} expects floating-point input (like its parameters, {weight.dtype}), got "
            f"{input.dtype}; convert it first, e.g. input.to({weight.dtype})"
        )
    if input.dim() == 0:
        raise ValueError(f"{caller} expects input of shape (*, {weight.shape[1]}), got a 0-d tensor")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{caller} expects input with last dimension {weight.shape[1]} (sizes[0]), "
            f"got {input.shape[-1]} (input shape {tuple(input.shape)})"
        )
    if input.device != weight.device:
        raise ValueError(
            f"{caller} expects input on {weight.device} (where its parameters are), got input on "
            f"{input.device}; move one of them with .to(device)"
        )
    if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(
            f"{caller} expects input of dtype {weight.dtype} (its parameters' dtype), got "
            f"{input.dtype}; convert with input.to({weight.dtype}) or use torch.autocast"
        )


def _check_parameters(weights: Sequence[Tensor], biases: Sequence[Tensor | None], dropout: float) -> None:
    if len(weights) == 0:
        raise ValueError("mlp expects at least one weight matrix, got none")
    if len(biases) != len(weights):
        raise ValueError(f"mlp expects {len(weights)} biases (one per weight, or None), got {len(biases)}")
    for k, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"mlp expects weights[{k}] to be a 2-D tensor (out, in), got {weight!r:.60}")
        if k > 0 and weight.shape[1] != weights[k - 1].shape[0]:
            raise ValueError(
                f"mlp expects weights[{k}] to take {weights[k - 1].shape[0]} inputs "
                f"(weights[{k - 1}] gives that many), got shape {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"mlp expects biases[{k}] of shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


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


def mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activations: ActivationLike | Sequence[ActivationLike] = "relu",
    *,
    dropout: float = 0.0,
    training: bool = False,
    recompute: bool = False,
    backward_phase: Callable[..., Any] | None = None,
) -> Tensor:
    """A fully connected stack, differentiated by the slides' δ recursion.

    Layer l computes ``h = σ_l(h @ weights[l].T + biases[l])``: ``weights[l]`` is in nn.Linear's
    layout (out, in), so the slides' W^(l) is ``weights[l].T``.

    Args:
        input: ``(*, in_features)``.
        weights: L tensors, ``weights[l]`` of shape ``(n_{l+1}, n_l)``.
        biases: L tensors of shape ``(n_{l+1},)`` or ``None`` entries; ``None`` for no biases.
        activations: one activation for every layer, or a list of L (the last one is the output
            activation; ``"identity"`` or ``None`` for none). Names, :class:`Activation` entries or
            native modules such as ``nn.ReLU()``.
        dropout: probability of zeroing a hidden unit (not the output), as ``nn.Dropout``.
        training: apply dropout (as ``F.dropout``'s ``training``).
        recompute: keep only the input for backward and recompute the rest there (less memory).
        backward_phase: replaces :func:`torch_backprop.function.backward_phase` (used by
            :func:`torch_backprop.per_sample`); ``None`` for the ordinary one.

    Returns:
        ``(*, n_L)``.

    Raises:
        TypeError, ValueError: see :func:`check_input`; also for inconsistent weights, biases,
            activations or dropout.

    Example:
        >>> w = [torch.randn(5, 3), torch.randn(2, 5)]
        >>> mlp(torch.randn(4, 3), w, None, ["tanh", None]).shape
        torch.Size([4, 2])
    """
    if biases is None:
        biases = [None] * len(weights)
    _check_parameters(weights, biases, dropout)
    acts = resolve_activations(activations, len(weights))
    check_input(input, weights[0])
    return checked_mlp(input, weights, biases, acts, dropout, training, recompute, backward_phase)


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
    """:func:`mlp` for arguments already checked (as BackpropMLP's are): no checks, no conversions."""
    rows = input.dim() == 2
    x = input if rows else input.reshape(-1, input.shape[-1])
    if training and dropout > 0 and len(weights) > 1:
        widths = [weight.shape[0] for weight in weights[:-1]]
        masks = dropout_masks(x.shape[0], widths, dropout, compute_dtype(x, weights[0]), x.device)
    else:
        masks = [None] * (len(weights) - 1)
    h_last = apply_mlp(x, activations, recompute, backward_phase, *weights, *biases, *masks)
    return h_last if rows else h_last.reshape(*input.shape[:-1], h_last.shape[-1])
