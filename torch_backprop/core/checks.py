"""The checks every entry point runs on its arguments first: a clear error before any work.

One place for the errors users see about the stack's input and parameters (:func:`check_input`,
:func:`check_parameters`), so that ``mlp``, ``mlp_loss``, ``BackpropMLP`` and ``BackpropMLP.loss``
name the expected and the given in the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_input", "check_parameters"]


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


def check_parameters(
    weights: Sequence[Tensor], biases: Sequence[Tensor | None], dropout: float, caller: str = "mlp"
) -> None:
    """Raise a clear error unless ``weights`` and ``biases`` form a stack and ``dropout`` is in [0, 1).

    Raises:
        ValueError: no weights, a bias list of another length, a weight that is not 2-D or does not
            take the previous layer's width, a bias of the wrong shape, or a dropout outside [0, 1).
    """
    if len(weights) == 0:
        raise ValueError(f"{caller} expects at least one weight matrix, got none")
    if len(biases) != len(weights):
        raise ValueError(
            f"{caller} expects {len(weights)} biases (one per weight, or None), got {len(biases)}"
        )
    for k, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{caller} expects weights[{k}] to be a 2-D tensor (out, in), got {weight!r:.60}"
            )
        if k > 0 and weight.shape[1] != weights[k - 1].shape[0]:
            raise ValueError(
                f"{caller} expects weights[{k}] to take {weights[k - 1].shape[0]} inputs "
                f"(weights[{k - 1}] gives that many), got shape {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{caller} expects biases[{k}] of shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{caller} expects dropout in [0, 1), got {dropout}")
