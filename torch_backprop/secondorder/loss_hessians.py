r"""The losses the curvature recursion supports, seen from the output h^(L): gradient and Hessian factor.

:mod:`torch_backprop.secondorder.recursion` starts its recursion from a factor S of the loss's Hessian in the
network output, as the δ recursion starts from the loss's gradient there (BP1). This file holds the
loss side, for ``nn.CrossEntropyLoss`` and ``nn.MSELoss`` with reduction ``"mean"`` or ``"sum"``,
with BackPACK's scaling (``backpack/core/derivatives/{crossentropyloss,mseloss}.py``).

Notation as in :mod:`torch_backprop.core.phases`, plus C = n_L (classes or outputs),
rows n = 1, ..., N of the loss input seen as (N, C), ℓ_n the loss of row n, and the reduction's
scale s: Q = s Σ_n ℓ_n with
    s = 1 ("sum"),  1/N (cross-entropy "mean"),  1/(N C) (MSE "mean", which averages every entry).

    cross-entropy, p_n = softmax(h_n^(L)), y_n a class:
        ℓ_n = -log p_{n,y_n}           ∂Q/∂h_n = s (p_n - e_{y_n})      ∂²Q/∂h_n² = s (diag p_n - p_n p_nᵀ)
    MSE, y_n ∈ R^C:
        ℓ_n = ‖h_n - y_n‖²             ∂Q/∂h_n = 2 s (h_n - y_n)        ∂²Q/∂h_n² = 2 s I

    LS1  exact factor, ∂²Q/∂h_n² = S_n S_nᵀ with C columns (k = 1, ..., C):
             cross-entropy  S_n[:, k] = √(s p_{n,k}) (e_k - p_n)     (the gradient for label k, weighted)
             MSE            S_n[:, k] = √(2 s) e_k
    LS2  Monte Carlo factor, M columns: ŷ_{n,m} drawn from the model's predictive,
             cross-entropy ŷ ~ Categorical(p_n), MSE ŷ ~ N(h_n, I/2) (so E[SSᵀ] is LS1's S Sᵀ),
             S_n[:, m] = √(s / M) ∂ℓ(h_n, ŷ_{n,m})/∂h_n
    LS3  Hessian-vector product per row: cross-entropy s (p ⊙ u - p (pᵀu)),  MSE 2 s u

The draws of LS2 use ``torch.multinomial`` / ``torch.normal`` exactly as BackPACK's
``torch.distributions`` calls do, so with the same global random state both draw the same labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossSpec", "loss_rows"]

_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class LossSpec:
    """A supported loss: ``kind`` (``"cross_entropy"`` or ``"mse"``) and ``reduction``."""

    kind: str
    reduction: str

    @classmethod
    def from_module(cls, loss_function: nn.Module, caller: str = "curvature") -> LossSpec:
        """The spec of ``nn.CrossEntropyLoss`` / ``nn.MSELoss``; anything else raises.

        Raises:
            TypeError: another loss (or not a module).
            ValueError: a reduction other than ``"mean"``/``"sum"``, a class weight or label smoothing.
        """
        if isinstance(loss_function, nn.CrossEntropyLoss):
            kind = "cross_entropy"
            if loss_function.weight is not None:
                raise ValueError(f"{caller} supports nn.CrossEntropyLoss without class weights, got weights")
            if loss_function.label_smoothing != 0.0:
                raise ValueError(
                    f"{caller} supports nn.CrossEntropyLoss with label_smoothing=0, "
                    f"got {loss_function.label_smoothing}"
                )
        elif isinstance(loss_function, nn.MSELoss):
            kind = "mse"
        else:
            raise TypeError(
                f"{caller} supports the losses nn.CrossEntropyLoss and nn.MSELoss (a module instance, "
                f"called inside the block), got {type(loss_function).__name__}"
            )
        if loss_function.reduction not in _REDUCTIONS:
            raise ValueError(
                f"{caller} expects the loss's reduction 'mean' or 'sum', got {loss_function.reduction!r}"
            )
        return cls(kind, loss_function.reduction)

    def scale(self, rows: int, classes: int) -> float:
        """s: 1 for ``"sum"``, 1/N for cross-entropy ``"mean"``, 1/(N C) for MSE ``"mean"``."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (rows if self.kind == "cross_entropy" else rows * classes)

    def gradient(self, output: Tensor, target: Tensor) -> Tensor:
        """∂Q/∂h^(L), (N, C), from the rows of the output and their targets."""
        s = self.scale(*output.shape)
        if self.kind == "cross_entropy":
            return s * (torch.softmax(output, dim=1) - F.one_hot(target, output.shape[1]).to(output.dtype))
        return 2 * s * (output - target)

    def sqrt_hessian(self, output: Tensor) -> Tensor:
        """LS1: S, (C, N, C), column k of row n at ``S[k, n]``."""
        rows, classes = output.shape
        s = self.scale(rows, classes)
        if self.kind == "mse":
            eye = torch.eye(classes, dtype=output.dtype, device=output.device)
            return (math.sqrt(2 * s) * eye).unsqueeze(1).expand(classes, rows, classes).contiguous()
        p = torch.softmax(output, dim=1)  # (N, C)
        root = (s * p).sqrt().t()  # √(s p_{n,k}), (C, N)
        S = -root.unsqueeze(2) * p  # -√(s p_k) p, (C, N, C)
        S.diagonal(dim1=0, dim2=2).add_(root.t())  # + √(s p_k) e_k
        return S

    def sqrt_hessian_sampled(
        self, output: Tensor, mc_samples: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """LS2: (S (M, N, C), the drawn targets: classes (M, N) or values (M, N, C))."""
        rows, classes = output.shape
        root = math.sqrt(self.scale(rows, classes) / mc_samples)
        if self.kind == "cross_entropy":
            p = torch.softmax(output, dim=1)
            # Categorical(p).sample((M,)) is exactly this call (with generator=None)
            labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator).t()
            S = p.unsqueeze(0) - F.one_hot(labels, classes).to(p.dtype)  # ∂ℓ/∂h = p - e_ŷ
            return S.mul_(root), labels
        shape = (mc_samples, rows, classes)
        std = torch.full((), math.sqrt(0.5), dtype=output.dtype, device=output.device)
        # Normal(h, √½).sample((M,)) is exactly this call (with generator=None)
        values = torch.normal(output.expand(shape), std.expand(shape), generator=generator)
        return (2 * root) * (output - values), values  # √(s/M) ∂ℓ/∂h = √(s/M) 2 (h - ŷ)

    def hessian_product(self, output: Tensor, u: Tensor) -> Tensor:
        """LS3: ∂²Q/∂h_n² u_n for every row, u (N, C)."""
        s = self.scale(*output.shape)
        if self.kind == "mse":
            return (2 * s) * u
        p = torch.softmax(output, dim=1)
        return s * (p * u - p * (p * u).sum(1, keepdim=True))


def loss_rows(
    spec: LossSpec, loss_input: Tensor, target: Tensor, output: Tensor
) -> tuple[Tensor, Tensor] | None:
    """The loss input and target as rows, (N, C) and (N,) or (N, C), when the loss input is ``output``.

    ``output`` is the model's output (detached); the loss input counts as it when it is the same
    tensor or a reshape of it over the same memory (``out.flatten(0, -2)``, ``out.view(-1, C)``),
    or, for cross-entropy, its classes moved to dimension 1 (``out.permute(0, 2, 1)``), as the
    loss's own (N, C, d...) layout wants. Returns ``None`` when the loss input is something else.

    Raises:
        ValueError: a target the curvature cannot use (class probabilities, an ignored class, a
            shape that does not match).
    """
    classes = output.shape[-1]
    if loss_input.data_ptr() != output.data_ptr() or loss_input.numel() != output.numel():
        return None
    if spec.kind == "cross_entropy" and loss_input.dim() > 2 and loss_input.shape[1] == classes:
        rows_view = loss_input.movedim(1, -1)
        target = target.reshape(-1)
    else:
        rows_view = loss_input
    if not rows_view.is_contiguous() or rows_view.shape[-1] != classes:
        return None
    rows = rows_view.detach().reshape(-1, classes)
    if spec.kind == "cross_entropy":
        if target.is_floating_point():
            raise ValueError(
                "curvature supports class-index targets for cross-entropy, got class probabilities"
            )
        target = target.reshape(-1)
        if (target < 0).any() or (target >= classes).any():
            raise ValueError(
                f"curvature expects class targets in [0, {classes}) (an ignored index has no curvature), "
                f"got values in [{int(target.min())}, {int(target.max())}]"
            )
        return rows, target
    if target.shape != loss_input.shape:
        raise ValueError(
            f"curvature expects the MSE target in the shape of the loss input {tuple(loss_input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return rows, target.detach().reshape(-1, classes)
