"""The functional form of the stack, ``mlp(input, ...)``, and its loss in one node, ``mlp_loss``.

Each checks its arguments (every error before any work, :mod:`torch_backprop.core.checks`) and
calls the autograd node: :class:`~torch_backprop.core.function.MLPFunction`, the slides' forward and
backward phases, or, with the loss inside the stack (the slides' BP1),
:class:`~torch_backprop.core.loss_function.FusedLossFunction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .activations import ActivationLike, resolve_activations
from .checks import check_input, check_parameters
from .function import checked_mlp
from .loss_function import fusable, stack_loss
from .losses import check_target, resolve_loss

__all__ = ["mlp", "mlp_loss"]


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
        backward_phase: replaces :func:`torch_backprop.core.phases.backward_phase` (used by
            :func:`torch_backprop.per_sample`); ``None`` for the ordinary one.

    Returns:
        ``(*, n_L)``.

    Raises:
        TypeError, ValueError: see :func:`~torch_backprop.core.checks.check_input`; also for
            inconsistent weights, biases, activations or dropout.

    Example:
        >>> w = [torch.randn(5, 3), torch.randn(2, 5)]
        >>> mlp(torch.randn(4, 3), w, None, ["tanh", None]).shape
        torch.Size([4, 2])
    """
    if biases is None:
        biases = [None] * len(weights)
    check_parameters(weights, biases, dropout)
    acts = resolve_activations(activations, len(weights))
    check_input(input, weights[0])
    return checked_mlp(input, weights, biases, acts, dropout, training, recompute, backward_phase)


def mlp_loss(
    input: Tensor,
    target: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activations: ActivationLike | Sequence[ActivationLike] = "relu",
    loss: str | nn.Module | Callable[..., Tensor] = "cross_entropy",
    reduction: str | None = None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    pos_weight: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The loss of :func:`mlp`'s output in one autograd node (FL1-FL3, then BP1-BP5).

    Equals ``F.<loss>(mlp(input, weights, biases, activations), target, ...)`` (for cross-entropy, on
    the output's rows: ``F.cross_entropy(out.reshape(-1, C), target.reshape(-1))``), value and
    gradients; see :meth:`torch_backprop.BackpropMLP.loss` for the arguments.
    """
    if biases is None:
        biases = [None] * len(weights)
    check_parameters(weights, biases, dropout, "mlp_loss")
    acts = resolve_activations(activations, len(weights))
    spec, weight, pos_weight = resolve_loss(
        loss,
        reduction,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        pos_weight=pos_weight,
        caller="mlp_loss",
    )
    check_input(input, weights[0], "mlp_loss")
    check_target(spec, input, target, weights[-1].dtype, weights[-1].shape[0], weight, pos_weight, "mlp_loss")
    if not fusable(input, target, weight, pos_weight):
        output = checked_mlp(input, weights, biases, acts, dropout, training, False, None)
        return spec.native(output, target, weight, pos_weight)
    return stack_loss(input, target, weight, pos_weight, weights, biases, acts, dropout, training, None, spec)
