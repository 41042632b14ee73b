r"""The losses' math for the slides' own BP1: Q and Q' = ∂Q/∂h^(L), for δ^(L) = Q' ⊙ σ'_L.

:class:`~torch_backprop.core.function.MLPFunction` takes ∂Q/∂h^(L) from autograd, so any loss works,
at the cost of the loss's own autograd nodes. The slides instead start the recursion from the loss
itself (slide 10): δ^(L) = Q'(h^(L) - y) ⊙ σ'_L(z^(L)). This file holds that start for the losses MLPs
are trained with: their names and options, the checks of their targets, Q and Q' in closed form
(and by PyTorch's loss-backward kernels). The autograd node that runs forward phase, loss and
backward phase as one is :class:`~torch_backprop.core.loss_function.FusedLossFunction`.

Notation as in :mod:`torch_backprop.core.phases`, plus C = n_L, rows n = 1, ..., N of h^(L) (leading
input dimensions flattened), y_n the target of row n, and the reduction's scale s (as
``torch.nn.functional`` defines each loss and reduction):

    FL1  mean squared error, y_n ∈ R^C, ℓ_n = ‖h_n - y_n‖²,  s = 1/(N C) ("mean") or 1 ("sum"):
             Q' = 2 s (h^(L) - y)
    FL2  softmax cross-entropy, y_n a class, p_n = softmax(h_n), class weights w (default 1),
         label smoothing ε, m_n = [y_n ≠ ignore_index]; target distribution
         t_n = (1 - ε) w_{y_n} e_{y_n} + (ε / C) w and T_n = Σ_c t_{n,c}, ℓ_n = -m_n Σ_c t_{n,c} log p_{n,c}:
             Q'_n = s m_n (T_n p_n - t_n),   s = 1 / Σ_n m_n w_{y_n} ("mean") or 1 ("sum")
         (no weights, no smoothing, nothing ignored: Q' = (softmax(h^(L)) - onehot(y)) / N, the slides' start)
    FL3  binary cross-entropy with logits, y ∈ [0, 1]^{N×C}, pos_weight π, weight v (default 1):
             Q' = s v ⊙ (σ(h^(L)) ⊙ (π y + 1 - y) - π y),   s = 1/(N C) ("mean") or 1 ("sum")
    BP1  δ^(L) = Q' ⊙ σ'_L(z^(L))   (the recursion, BP2-BP5, is :func:`torch_backprop.core.phases.deltas`)

The loss value itself is the ``torch.nn.functional`` call on h^(L) (log-softmax then NLL, as
``F.cross_entropy`` runs it), so it is PyTorch's to the last bit. In eager mode Q' of FL1 and FL2
(without label smoothing) is made in the backward by the kernels PyTorch's own loss backward runs
(``mse_loss_backward``; ``nll_loss_backward`` then ``_log_softmax_backward_data``, which is
s m (p - e_y) for unit weights), one or two kernels and no autograd node; label smoothing, FL3 and
every traced or differentiable path (``create_graph=True``, torch.func, torch.compile) use the
closed forms above, :func:`loss_and_gradient`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten

__all__ = [
    "LOSSES",
    "FusedLoss",
    "check_target",
    "loss_and_gradient",
    "loss_backward",
    "loss_forward",
    "resolve_loss",
]

# The names accepted for each loss: torch.nn.functional's, and the short forms.
LOSSES = {
    "cross_entropy": "cross_entropy",
    "mse_loss": "mse",
    "mse": "mse",
    "binary_cross_entropy_with_logits": "binary_cross_entropy_with_logits",
    "bce_with_logits": "binary_cross_entropy_with_logits",
}
_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.cross_entropy: "cross_entropy",
    F.mse_loss: "mse",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
}
_REDUCTIONS = ("mean", "sum")
_REDUCTION_ENUM = {"mean": 1, "sum": 2}  # torch.nn._reduction.get_enum
_PLAIN_SPECS: dict[tuple[str, str | None], FusedLoss] = {}  # (name, reduction) -> spec, default options


@dataclass(frozen=True)
class FusedLoss:
    """A loss inside the stack: its ``kind``, ``reduction`` and the options that are not tensors.

    ``kind`` is ``"cross_entropy"``, ``"mse"`` or ``"binary_cross_entropy_with_logits"``.
    """

    kind: str
    reduction: str
    ignore_index: int = -100
    label_smoothing: float = 0.0

    def native(
        self, output: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None
    ) -> Tensor:
        """The same loss by ``torch.nn.functional`` on the model's output (classes last)."""
        if self.kind == "cross_entropy":
            return F.cross_entropy(
                output.reshape(-1, output.shape[-1]),
                target.reshape(-1),
                weight=weight,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
        if self.kind == "mse":
            return F.mse_loss(output, target, reduction=self.reduction)
        return F.binary_cross_entropy_with_logits(
            output, target, weight=weight, reduction=self.reduction, pos_weight=pos_weight
        )


def resolve_loss(
    loss: str | nn.Module | Callable[..., Tensor],
    reduction: str | None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    pos_weight: Tensor | None = None,
    caller: str = "BackpropMLP.loss",
) -> tuple[FusedLoss, Tensor | None, Tensor | None]:
    """``(spec, weight, pos_weight)`` from a loss name, F function or loss module, checked.

    A module (``nn.CrossEntropyLoss(label_smoothing=0.1)``, ``nn.MSELoss()``, ``nn.BCEWithLogitsLoss()``)
    brings its own options; ``reduction=None`` means the module's, or ``"mean"``.

    Raises:
        ValueError: an unknown loss name, a reduction other than ``"mean"``/``"sum"``, an option the
            loss does not take, a label smoothing outside [0, 1].
        TypeError: a loss that is neither a name nor a supported function or module; a weight that
            is not a floating-point tensor.
    """
    if (
        type(loss) is str
        and weight is None
        and pos_weight is None
        and ignore_index == -100
        and label_smoothing == 0.0
        and (loss, reduction) in _PLAIN_SPECS
    ):
        return _PLAIN_SPECS[loss, reduction], None, None  # the common call, checked once below
    if isinstance(loss, nn.CrossEntropyLoss):
        kind, weight, ignore_index = "cross_entropy", loss.weight, loss.ignore_index
        label_smoothing, reduction = loss.label_smoothing, reduction or loss.reduction
    elif isinstance(loss, nn.MSELoss):
        kind, reduction = "mse", reduction or loss.reduction
    elif isinstance(loss, nn.BCEWithLogitsLoss):
        kind, weight, pos_weight = "binary_cross_entropy_with_logits", loss.weight, loss.pos_weight
        reduction = reduction or loss.reduction
    elif isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"{caller} expects a loss among {', '.join(LOSSES)}, got {loss!r}")
        kind = LOSSES[loss]
    elif callable(loss) and loss in _FUNCTIONS:
        kind = _FUNCTIONS[loss]
    else:
        raise TypeError(
            f"{caller} expects a loss name ({', '.join(LOSSES)}), F.cross_entropy, F.mse_loss, "
            "F.binary_cross_entropy_with_logits or their nn modules, got "
            f"{getattr(loss, '__name__', type(loss).__name__)}; for any other loss use loss_fn(model(x), y)"
        )
    reduction = reduction or "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{caller} expects reduction 'mean' or 'sum', got {reduction!r}")
    if kind != "cross_entropy" and (ignore_index != -100 or label_smoothing != 0.0):
        raise ValueError(f"{caller}: ignore_index and label_smoothing are cross_entropy's, not {kind}'s")
    if kind == "mse" and weight is not None:
        raise ValueError(f"{caller}: mse takes no weight")
    if kind != "binary_cross_entropy_with_logits" and pos_weight is not None:
        raise ValueError(f"{caller}: pos_weight is binary_cross_entropy_with_logits's, not {kind}'s")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{caller} expects label_smoothing to be a number, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{caller} expects label_smoothing in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{caller} expects ignore_index to be an int, got {ignore_index!r}")
    for name, tensor in (("weight", weight), ("pos_weight", pos_weight)):
        if tensor is not None and (not isinstance(tensor, Tensor) or not tensor.is_floating_point()):
            raise TypeError(f"{caller} expects {name} to be a floating-point tensor, got {tensor!r:.60}")
    return FusedLoss(kind, reduction, ignore_index, float(label_smoothing)), weight, pos_weight


def check_target(
    spec: FusedLoss,
    input: Tensor,
    target: Tensor,
    output_dtype: torch.dtype,
    classes: int,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    caller: str = "BackpropMLP.loss",
) -> None:
    """Raise a clear error unless ``target`` (and the weights) suit ``spec`` for ``input`` (*, n_0).

    Raises:
        TypeError: a target that is not a tensor, or of the wrong dtype.
        ValueError: a target, weight or pos_weight of the wrong shape or device.
    """
    lead = tuple(input.shape[:-1])
    if not isinstance(target, Tensor):
        raise TypeError(f"{caller} expects a torch.Tensor target, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"{caller} expects the target on {input.device} (the input's), got {target.device}")
    if spec.kind == "cross_entropy":
        if target.dtype != torch.int64:
            hint = (
                "; class probabilities are not fused: use F.cross_entropy(model(x), target)"
                if target.is_floating_point()
                else "; convert with target.long()"
            )
            raise TypeError(
                f"{caller}: cross_entropy expects class indices of dtype int64, got {target.dtype}{hint}"
            )
        if tuple(target.shape) != lead:
            raise ValueError(
                f"{caller}: cross_entropy expects a target of shape {lead} (the input's leading dimensions), "
                f"got {tuple(target.shape)}"
            )
    else:
        expected = (*lead, classes)
        if target.dtype != output_dtype:
            raise TypeError(
                f"{caller}: {spec.kind} expects a target of dtype {output_dtype}, got {target.dtype}"
            )
        if tuple(target.shape) != expected:
            raise ValueError(
                f"{caller}: {spec.kind} expects a target of the output's shape {expected}, "
                f"got {tuple(target.shape)}"
            )
    for name, tensor in (("weight", weight), ("pos_weight", pos_weight)):
        if tensor is None:
            continue
        allowed = [(classes,)] + (
            [(*lead, classes)] if name == "weight" and spec.kind != "cross_entropy" else []
        )
        if tuple(tensor.shape) not in allowed:
            raise ValueError(
                f"{caller} expects {name} of shape {' or '.join(map(str, allowed))}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != input.device:
            raise ValueError(f"{caller} expects {name} on {input.device}, got {tensor.device}")


# ---------------------------------------------------------------------------------------------
# The loss and its Q' (FL1-FL3), on rows: h (N, C), target (N,) or (N, C).


def loss_and_gradient(
    spec: FusedLoss, h: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(Q, Q')``: the loss and ∂Q/∂h^(L), (N, C). Differentiable ops only when grad is enabled."""
    rows, classes = h.shape
    differentiable = torch.is_grad_enabled()
    reduction = _REDUCTION_ENUM[spec.reduction]
    # s of FL1/FL3; an empty batch has an empty Q' whatever s is (Q itself is F's nan for a mean)
    s = 1.0 / max(rows * classes, 1) if spec.reduction == "mean" else 1.0
    if spec.kind == "mse":
        diff = h - target
        grad = diff.mul(2 * s) if differentiable else diff.mul_(2 * s)
        return torch._C._nn.mse_loss(h, target, reduction), grad  # FL1
    if spec.kind == "binary_cross_entropy_with_logits":
        loss = torch.binary_cross_entropy_with_logits(h, target, weight, pos_weight, reduction)
        p = torch.sigmoid(h)
        if pos_weight is None:
            grad = p - target
        else:
            py = pos_weight * target
            grad = p * (py + 1 - target) - py
        if weight is not None:
            grad = grad * weight
        return loss, grad.mul(s) if differentiable else grad.mul_(s)  # FL3
    # FL2: log-softmax then NLL, as F.cross_entropy runs it
    eps, ignore = spec.label_smoothing, spec.ignore_index
    logp = torch.log_softmax(h, 1)
    nll = torch._C._nn.nll_loss_nd(logp, target, weight, reduction, ignore)
    p = logp.exp()
    kept = target != ignore  # m_n
    safe = target.masked_fill(~kept, 0)
    mask = kept.to(p.dtype)
    onehot = (safe.unsqueeze(1) == torch.arange(classes, device=p.device)).to(p.dtype)  # e_{y_n}
    if weight is None:
        w_y = mask
        t = (1 - eps) * onehot + eps / classes
        total = torch.ones_like(mask)  # T_n
    else:
        w_y = weight[safe] * mask
        t = (1 - eps) * onehot * weight[safe].unsqueeze(1) + (eps / classes) * weight
        total = (1 - eps) * weight[safe] + (eps / classes) * weight.sum()
    grad = (total.unsqueeze(1) * p - t) * mask.unsqueeze(1)
    loss = nll
    if eps:
        smooth = -(logp * weight).sum(1) if weight is not None else -logp.sum(1)
        smooth = (smooth * mask).sum()
        if spec.reduction == "mean":
            smooth = smooth / w_y.sum()
        loss = (1 - eps) * nll + smooth * (eps / classes)
    if spec.reduction == "mean":
        grad = grad / w_y.sum()
    return loss, grad


def loss_forward(
    spec: FusedLoss, h: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None
) -> tuple[Tensor, str, tuple[Tensor, ...]]:
    """``(Q, how, state)``: the loss, and what the eager backward reads to make Q' (:func:`loss_backward`).

    MSE and cross-entropy without label smoothing keep what PyTorch's own loss-backward kernels read
    (one or two kernels, no autograd node: FL1 and FL2 exactly); the others keep Q' itself.
    """
    reduction = _REDUCTION_ENUM[spec.reduction]
    if spec.kind == "mse":
        return torch._C._nn.mse_loss(h, target, reduction), "mse", (h,)
    if spec.kind == "cross_entropy" and spec.label_smoothing == 0.0:
        logp = torch.log_softmax(h, 1)
        loss, total_weight = aten.nll_loss_forward(logp, target, weight, reduction, spec.ignore_index)
        return loss, "nll", (logp, total_weight)
    loss, q_prime = loss_and_gradient(spec, h, target, weight, pos_weight)
    return loss, "q", (q_prime,)


def loss_backward(
    spec: FusedLoss,
    how: str,
    state: Sequence[Tensor],
    grad_loss: Tensor,
    target: Tensor,
    weight: Tensor | None,
) -> Tensor:
    """∂Q/∂h^(L) times the upstream gradient: Q' of FL1-FL3 from :func:`loss_forward`'s state."""
    reduction = _REDUCTION_ENUM[spec.reduction]
    if how == "mse":
        return aten.mse_loss_backward(grad_loss, state[0], target, reduction)  # FL1: 2 s (h - y)
    if how == "nll":
        logp, total_weight = state  # FL2: s m (T p - t), as -∂NLL/∂log p through log-softmax
        grad = aten.nll_loss_backward(
            grad_loss, logp, target, weight, reduction, spec.ignore_index, total_weight
        )
        return aten._log_softmax_backward_data(grad, logp, 1, logp.dtype)
    return state[0] * grad_loss


_PLAIN_SPECS.update(
    {
        (name, reduction): resolve_loss(name, reduction)[0]
        for name in LOSSES
        for reduction in (*_REDUCTIONS, None)
    }
)
