r"""The per-sample algebra of the backward phase: each sample's gradient, norm and clipped share.

The slides compute ∇Q_θ(x, y) for one sample: layer l's gradient is the outer product
h^(l) ⊗ δ^(l+1) (BP3). The backward phase holds every h^(l) and δ^(l) of the batch at once, so each
sample's gradient, its norm and its clipped contribution come from the same tensors the ordinary
backward uses. Notation as in :mod:`torch_backprop.core.phases`, plus
    B: samples, T: rows per sample (all input dimensions but the sample's and the features'),
    N = B T rows, b: sample, t: row within a sample, s = B for ``"mean"``, 1 for ``"sum"``.

    PS1  g_b^(l) = s Σ_t δ_bt^(l+1) ⊗ h_bt^(l)                 per-sample ∂W^(l), (n_{l+1}, n_l)
         g_b^(l), bias = s Σ_t δ_bt^(l+1)                     per-sample ∂b^(l), (n_{l+1},)
    PS2  ‖g_b‖² = s² Σ_l (‖h_b^(l)‖² ‖δ_b^(l+1)‖² + ‖δ_b^(l+1)‖²)        for T = 1
         ‖Σ_t δ_t ⊗ h_t‖² = Σ_{t,t'} (δ_t · δ_t')(h_t · h_t')        for T > 1 (Gram, "ghost" form)
    PS3  c_b = min(1, C / ‖g_b‖)              (flat clipping; other styles: firstorder.clipping)
    PS4  ∂W^(l) = (c ⊙ δ^(l+1))ᵀ h^(l),   ∂b^(l) = Σ_N c ⊙ δ^(l+1)      (c repeated over t)

PS4 is BP3-BP4 with every row of δ^(l+1) scaled by its sample's c_b, so it equals Σ_b c_b g_b for
``"sum"`` and Σ_b c_b g_b / B for ``"mean"`` (the factor s of PS1 cancels the mean's 1/B).

BackPACK's first-order quantities use BackPACK's scaling: the per-sample gradient as it enters the
loss, γ_b = g_b / s (BackPACK's ``grad_batch``), so that Σ_b γ_b = ``.grad``:
    BL   ``batch_l2``[b] = ‖γ_b‖²                       (B,) per parameter; PS2 without s²
    SGS  ``sum_grad_squared`` = Σ_b γ_b ⊙ γ_b           = (δ ⊙ δ)ᵀ (h ⊙ h) for T = 1, no γ_b built
    VAR  ``variance`` = SGS / B - (Σ_b γ_b / B)²        (BackPACK's ``Variance``)

Cost, over a plain backward (BP1-BP5):
    * norms and clipping, T = 1: all δ^(l) kept at once (the memory of one more activation stack),
      plus O(N Σ_l (n_l + n_{l+1})) for the norms and the scaling: no (B, n_{l+1}, n_l) tensor is built.
    * norms and clipping, T > 1: per layer, the cheaper of the Gram form, O(B T² (n_l + n_{l+1})) time
      and O(B T²) memory, and materialising g_b^(l) one layer at a time, O(B T n_l n_{l+1}) time and
      O(B n_l n_{l+1}) memory; the Gram form is used when T (n_l + n_{l+1}) ≤ n_l n_{l+1}.
    * ``grad_sample`` / ``grad_batch``: the (B, *p.shape) tensors themselves; ``sum_grad_squared``
      and ``variance``: one product per layer for T = 1, one layer's γ_b at a time for T > 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Layout", "SampleTerms", "bias_terms", "unclipped_gradient", "weight_gradient", "weight_terms"]


class Layout(NamedTuple):
    """Where the samples are among the N = prod(lead) rows of a forward call's input."""

    lead: tuple[int, ...]  # input.shape[:-1]
    batch_dim: int  # 0 (batch_first) or 1

    @property
    def batch(self) -> int:
        return self.lead[self.batch_dim]

    @property
    def steps(self) -> int:
        return math.prod(n for d, n in enumerate(self.lead) if d != self.batch_dim)

    def by_sample(self, rows: Tensor) -> Tensor:
        """(N, n) rows -> (B, T, n), sample b's T rows together."""
        if self.batch_dim == 0:
            return rows.reshape(self.batch, self.steps, rows.shape[1])
        return rows.reshape(*self.lead, rows.shape[1]).movedim(1, 0).reshape(self.batch, self.steps, -1)

    def each_row(self, values: Tensor) -> Tensor:
        """(B,) per-sample values -> (N,): each row gets its sample's value."""
        if self.steps == 1:
            return values
        shape = [1] * len(self.lead)
        shape[self.batch_dim] = self.batch
        return values.view(shape).expand(self.lead).reshape(-1)


class SampleTerms(NamedTuple):
    """One trainable parameter's per-sample terms in one backward, unscaled (γ_b, not g_b)."""

    squared_norms: Tensor  # ‖γ_b‖², (B,), float32 at least
    samples: Tensor | None  # γ_b, (B, *p.shape), where asked for
    sum_squared: Tensor | None  # Σ_b γ_b ⊙ γ_b, p.shape, where asked for


def weight_terms(delta: Tensor, h: Tensor, layout: Layout, samples: bool, sum_squared: bool) -> SampleTerms:
    """PS1-PS2 and SGS for ∂W^(l) from δ^(l+1) (N, n_{l+1}) and h^(l) (N, n_l), without s."""
    dtype = torch.promote_types(delta.dtype, torch.float32)
    if layout.steps == 1 and layout.batch_dim == 0:
        delta_squared = torch.linalg.vector_norm(delta, dim=1, dtype=dtype).square()  # ‖δ_b‖², (B,)
        h_squared = torch.linalg.vector_norm(h, dim=1, dtype=dtype).square()  # ‖h_b‖², (B,)
        gamma = delta[:, :, None] * h[:, None, :] if samples else None  # δ_b ⊗ h_b, (B, n_{l+1}, n_l)
        sgs = delta.square().t().mm(h.square()) if sum_squared else None  # SGS, (n_{l+1}, n_l)
        return SampleTerms(delta_squared * h_squared, gamma, sgs)
    delta_b, h_b = layout.by_sample(delta), layout.by_sample(h)  # (B, T, n_{l+1}), (B, T, n_l)
    n_out, n_in = delta.shape[1], h.shape[1]
    if samples or sum_squared or layout.steps * (n_in + n_out) > n_in * n_out:
        gamma = torch.bmm(delta_b.transpose(1, 2), h_b)  # Σ_t δ_bt ⊗ h_bt, (B, n_{l+1}, n_l)
        squared = gamma.to(dtype).square().sum((1, 2))
        sgs = gamma.square().sum(0) if sum_squared else None
        return SampleTerms(squared, gamma if samples else None, sgs)
    delta_b, h_b = delta_b.to(dtype), h_b.to(dtype)
    gram = torch.bmm(delta_b, delta_b.transpose(1, 2)) * torch.bmm(h_b, h_b.transpose(1, 2))  # (B, T, T)
    return SampleTerms(gram.sum((1, 2)), None, None)  # PS2, ghost form


def bias_terms(delta: Tensor, layout: Layout, samples: bool, sum_squared: bool) -> SampleTerms:
    """PS1-PS2 and SGS for ∂b^(l) from δ^(l+1) (N, n_{l+1}), without s."""
    dtype = torch.promote_types(delta.dtype, torch.float32)
    gamma = delta if layout.steps == 1 and layout.batch_dim == 0 else layout.by_sample(delta).sum(1)  # (B, n)
    squared = torch.linalg.vector_norm(gamma, dim=1, dtype=dtype).square()
    sgs = gamma.square().sum(0) if sum_squared else None
    return SampleTerms(squared, gamma if samples else None, sgs)


def weight_gradient(delta: Tensor, h: Tensor, rows: Tensor | None) -> Tensor:
    """BP3, δ^(l+1)ᵀ h^(l); with per-row clipping factors ``rows`` (N, 1), PS4: (c ⊙ δ)ᵀ h = δᵀ (c ⊙ h)."""
    if rows is None:
        return delta.t().mm(h)  # BP3
    if delta.shape[1] <= h.shape[1]:  # scale whichever of the two is narrower
        return (delta * rows).t().mm(h)  # PS4
    return delta.t().mm(h * rows)  # PS4


def unclipped_gradient(delta: Tensor, h: Tensor, kind: str) -> Tensor:
    """This backward's unclipped gradient Σ_b γ_b of a weight (BP3) or a bias (BP4)."""
    return delta.t().mm(h) if kind == "weight" else delta.sum(0)
