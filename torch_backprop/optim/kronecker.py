r"""The inverse of a sum of (at most) two Kronecker products, by generalised eigendecompositions.

KFAC for a PDE loss approximates each layer's Gauss–Newton block by one Kronecker product per kind of
term (KF1-KF3, :meth:`~torch_backprop.pde.residual.ResidualTape.kronecker_factors`): B_Ω ⊗ A_Ω for
the interior, B_∂Ω ⊗ A_∂Ω for the boundary, over the layer's W̃ = [W, b] (out × in) flattened row
by row, where (B ⊗ A) vec(X) = vec(B X A). A sum of two Kronecker products is not one, but it is
inverted exactly by two generalised symmetric eigenproblems (Martens & Grosse 2015, App. B;
Dangel, Müller & Zeinhofer 2024), one per side:

    KF6  A_Ω V_A = A_∂Ω V_A diag(α),  V_Aᵀ A_∂Ω V_A = I;   B_Ω V_B = B_∂Ω V_B diag(β),  V_Bᵀ B_∂Ω V_B = I
         ⇒ V_Bᵀ ⊗ V_Aᵀ (B_Ω ⊗ A_Ω + B_∂Ω ⊗ A_∂Ω) V_B ⊗ V_A = diag(β) ⊗ diag(α) + I
    KF7  (B_Ω ⊗ A_Ω + B_∂Ω ⊗ A_∂Ω)⁻¹ vec(X) = vec(V_B [(V_Bᵀ X V_A) ⊘ (β αᵀ + 1)] V_Aᵀ)

each side by a Cholesky factorisation of the boundary factor, A_∂Ω = L Lᵀ, and one ``eigh`` of
L⁻¹ A_Ω L⁻ᵀ (V_A = L⁻ᵀ U), in float64. With one kind of term only, V and the eigenvalues are the
factors' own (``eigh``) and the 1 in KF7 is 0. Everything is O(n³) in the layer's widths, never in
the number of parameters. The factors must be symmetric positive definite (damped), else the
basis is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["KroneckerBasis", "apply_inverse", "kronecker_sum_basis"]

KroneckerBasis = tuple[Tensor, Tensor, Tensor, Tensor, float]
"""``(V_A, α, V_B, β, shift)`` of KF6: the inverse is KF7 with ``shift`` 1 (two products) or 0 (one)."""


def _generalised_eigh(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(λ, V)`` with a V = b V diag(λ) and Vᵀ b V = I; ``None`` when b is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(b)
    if int(info) != 0:
        return None
    inner = torch.linalg.solve_triangular(factor, a, upper=False)  # L⁻¹ a
    inner = torch.linalg.solve_triangular(factor, inner.t(), upper=False)  # L⁻¹ a L⁻ᵀ (a symmetric)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (inner + inner.t()))
    return eigenvalues, torch.linalg.solve_triangular(factor.t(), vectors, upper=True)  # V = L⁻ᵀ U


def _eigh(a: Tensor) -> tuple[Tensor, Tensor] | None:
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (a + a.t()))
    if not bool((eigenvalues > 0).all()):
        return None
    return eigenvalues, vectors


def kronecker_sum_basis(pairs: Sequence[tuple[Tensor, Tensor]]) -> KroneckerBasis | None:
    """The basis of KF6 for Σ_κ B_κ ⊗ A_κ over one or two pairs ``(A_κ, B_κ)`` (the first: interior).

    Computed in the factors' dtype (give float64). ``None`` when a factor is not positive definite
    or a decomposition fails or is not finite: the caller keeps its previous basis or skips the step.
    """
    if len(pairs) not in (1, 2):
        raise ValueError(f"kronecker_sum_basis expects one or two (A, B) pairs, got {len(pairs)}")
    try:
        if len(pairs) == 1:
            (a, b), shift = pairs[0], 0.0
            sides = (_eigh(a), _eigh(b))
        else:
            (a, b), (a0, b0) = pairs
            shift = 1.0
            sides = (_generalised_eigh(a, a0), _generalised_eigh(b, b0))
    except (RuntimeError, torch.linalg.LinAlgError):  # eigh did not converge
        return None
    if sides[0] is None or sides[1] is None:
        return None
    (alpha, v_a), (beta, v_b) = sides
    basis = (v_a, alpha, v_b, beta, shift)
    if not all(bool(torch.isfinite(t).all()) for t in basis[:4]):
        return None
    return basis


def apply_inverse(basis: KroneckerBasis, x: Tensor) -> Tensor:
    """(Σ_κ B_κ ⊗ A_κ)⁻¹ vec(X) as an (out, in) matrix, by KF7; ``x`` is X (out, in)."""
    v_a, alpha, v_b, beta, shift = basis
    inner = v_b.t().mm(x).mm(v_a)  # (V_B ⊗ V_A)ᵀ vec(X)
    inner = inner / (beta.unsqueeze(1) * alpha.unsqueeze(0) + shift)
    return v_b.mm(inner).mm(v_a.t())
