r"""Second-order quantities from the δ recursion carried with K columns (the math behind ``curvature``).

The backward phase (slides 8-10) carries one row δ_n^(l) per sample. Carried with K columns instead,
S_n^(l) (each column a δ), the same recursion gives curvature, as BackPACK computes it module by
module (Dangel, Kunstner and Hennig, 2020), here over the whole stack at once. Notation as in
:mod:`torch_backprop.core.phases` and :mod:`torch_backprop.secondorder.loss_hessians` (the loss's scale s
and Hessian factor S, ∂²Q/∂h_n^(L)² = S_n S_nᵀ: C exact columns, LS1, or M sampled ones, LS2), plus
    k: column, K columns;  S^(l): (K, N, n_l), the factor carried down to z^(l);
    B samples of T rows each (input (B, T, n_0); T = 1 for (B, n_0)), N = B T rows;
    q^(l) := Σ_k (S_k^(l))², (N, n_l): the diagonal of S^(l) S^(l)ᵀ row by row.

    CV1  S^(L) = σ'_L(z^(L)) ⊙ S                                        (BP1, per column)
    CV2  S^(l) = σ'_l(z^(l)) ⊙ m^(l) ⊙ (S^(l+1) W^(l)ᵀ)                 (BP2, per column)
    CV3  diag_ggn(W^(l)) = Σ_n q_n^(l+1) ⊗ (h_n^(l))² = q^(l+1)ᵀ (h^(l))²   (nn.Linear layout)
         diag_ggn(b^(l)) = Σ_n q_n^(l+1)
    CV4  per sample b: CV3's sums over the rows t of sample b only          ((B, *p.shape))
    CV5  G^(l) = Σ_{n,k} S_{k,n}^(l+1) S_{k,n}^(l+1)ᵀ,  A^(l) = (1/N) Σ_n h_n^(l) h_n^(l)ᵀ;
         weight [G, A] (its GGN block ≈ G ⊗ A), bias [G]

With the exact S (LS1), CV3 is ``diag_ggn_exact`` and CV5 ``kflr``; with M sampled columns (LS2),
``diag_ggn_mc`` and ``kfac``. CV3 holds because Q is a sum of row terms and row n's z^(l+1) is
linear in W^(l): ∂z_{n,j}^(l+1)/∂W_ji^(l) = h_{n,i}^(l), so the GGN diagonal entry is
Σ_n (h_{n,i})² (S_n^(l+1) S_n^(l+1)ᵀ)_jj. The Hessian diagonal (``diag_h``) keeps the σ'' terms the
GGN drops. With g^(l) = m^(l) ⊙ (δ^(l+1) W^(l)ᵀ), the gradient in h^(l) (g^(L) = ∂Q/∂h^(L)), and
M_n^(l) = ∂²Q/∂z_n^(l)², per row:

    HD1  M^(L) = diag(σ'_L) S Sᵀ diag(σ'_L) + diag(σ''_L ⊙ g^(L))
    HD2  M^(l) = diag(σ'_l ⊙ m) W^(l) M^(l+1) W^(l)ᵀ diag(σ'_l ⊙ m) + diag(σ''_l ⊙ g^(l))
    HD3  M^(l) = Σ_k w_k F_k F_kᵀ: the columns of S^(l) (weights 1) and, for every σ'' term
         r^(j) = σ''_j ⊙ g^(j) (j > l), the n_j columns of the identity at z^(j) with weights r^(j),
         carried down by CV2;  d^(l) = Σ_k w_k F_k² + r^(l) = diag M^(l) row by row;
         diag_h(W^(l)) = d^(l+1)ᵀ (h^(l))²,  diag_h(b^(l)) = Σ_n d^(l+1)

(BackPACK splits each r^(j) into √max(r, 0) and √max(-r, 0) columns; the weights w_k do the same
without square roots.) The same pieces without a backward (the GGN-vector product, the Jacobians)
are :mod:`torch_backprop.secondorder.products`.

Cost over a plain backward: the diagonals carry K columns through every BP2 product (K = C exact,
M sampled) plus one BP3-sized product per layer; the Kronecker factors add N n_{l+1}² and N n_l²
per layer; ``diag_h`` also carries n_j columns from every layer j with σ'' ≠ 0 (none for ReLU,
where it equals ``diag_ggn_exact``), which costs N n_j n_l n_{l+1} per layer l below j.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..core.activations import out_kernels_allowed, zero_second_derivative
from ..core.phases import Tape, deltas

__all__ = ["Results", "Trainable", "factors", "ggn_quantities", "hessian_diagonal", "trainable_layers"]

Trainable = list[tuple[int, bool, bool]]  # (l, weight trainable, bias trainable), lowest l first
Results = dict[tuple[int, str, str], "Tensor | list[Tensor]"]  # (l, "weight"/"bias", quantity) -> value


def trainable_layers(needs_weight: Sequence[bool], needs_bias: Sequence[bool]) -> Trainable:
    """``(l, weight, bias)`` for every layer with a trainable parameter, lowest first."""
    return [(k, w, b) for k, (w, b) in enumerate(zip(needs_weight, needs_bias, strict=True)) if w or b]


# ---------------------------------------------------------------------------------------------
# The recursion on K columns (CV1-CV2) and what each layer reads from it (CV3-CV5).


def factors(tape: Tape, S: Tensor, lowest: int) -> Iterator[tuple[int, Tensor]]:
    """The δ recursion on K columns: yields ``(l, S^(l+1))`` for l = L-1 down to ``lowest``.

    ``S`` (K, N, n_L) is the loss's factor; it is overwritten, as each S^(l+1) is by the next.
    """
    depth = len(tape.activations)
    S = _times_sigma_prime(tape, depth - 1, S, fresh=True)  # CV1, (K, N, n_L)
    for k in reversed(range(lowest, depth)):
        yield k, S  # S^(k+1), (K, N, n_{k+1})
        if k == lowest:
            return
        S = _carry(tape, k, S.matmul(tape.weights[k]), fresh=True)  # CV2, (K, N, n_k)


def _carry(tape: Tape, k: int, back: Tensor, fresh: bool) -> Tensor:
    """CV2 from ``back`` = F W^(k)ᵀ (K, N, n_k): σ'_k ⊙ m^(k) ⊙ back, written into ``back`` if ``fresh``.

    ``fresh`` says the caller has just made ``back`` and owns it; a view of the weights is not.
    """
    if tape.masks[k - 1] is not None:
        back, fresh = back * tape.masks[k - 1], True
    return _times_sigma_prime(tape, k - 1, back, fresh)


def _times_sigma_prime(tape: Tape, layer: int, F: Tensor, fresh: bool) -> Tensor:
    """σ'_{layer+1} ⊙ F for K columns F (K, N, n), by the activation's own (fused) kernel.

    The saved h or z (N, n) is expanded to F's shape as a view: some fused kernels (oneDNN's GELU
    backward in float32) do not broadcast.
    """
    saved = tape.sigma_prime_from[layer]
    if saved is not None:
        saved = saved.expand_as(F)
    return tape.activations[layer].backprop(F, saved, overwrite=fresh and out_kernels_allowed(F))


def _sum_of_squares(F: Tensor) -> Tensor:
    """Σ_k F_k² over the columns of F (K, N, n), accumulated in place (no (K, N, n) temporary)."""
    total = F[0] * F[0]
    for column in F[1:]:
        total.addcmul_(column, column)
    return total


def _diagonal(d: Tensor, h: Tensor, batch: int, weight: bool, bias: bool, per_sample: bool) -> dict:
    """CV3 (CV4 with ``per_sample``) from d (N, n_{l+1}), a diagonal per row, and h^(l) (N, n_l)."""
    out = {}
    if not per_sample:
        if weight:
            out["weight"] = d.t().mm(h * h)  # CV3, (n_{l+1}, n_l)
        if bias:
            out["bias"] = d.sum(0)  # CV3, (n_{l+1},)
        return out
    d_b = d.reshape(batch, -1, d.shape[1])  # (B, T, n_{l+1})
    if weight:
        h_b = (h * h).reshape(batch, -1, h.shape[1])  # (B, T, n_l)
        out["weight"] = torch.bmm(d_b.transpose(1, 2), h_b)  # CV4, (B, n_{l+1}, n_l)
    if bias:
        out["bias"] = d_b.sum(1)  # CV4, (B, n_{l+1})
    return out


def _kronecker(S: Tensor, h: Tensor, weight: bool, bias: bool) -> dict:
    """CV5: ``{"weight": [G, A], "bias": [G]}`` from S^(l+1) (K, N, n_{l+1}) and h^(l) (N, n_l)."""
    columns = S.reshape(-1, S.shape[2])  # (K N, n_{l+1})
    G = columns.t().mm(columns)  # CV5, (n_{l+1}, n_{l+1})
    out = {"bias": [G]} if bias else {}
    if weight:
        out["weight"] = [G, h.t().mm(h).div_(h.shape[0])]  # CV5, A: (n_l, n_l)
    return out


def ggn_quantities(tape: Tape, S: Tensor, names: Sequence[str], trainable: Trainable, batch: int) -> Results:
    """CV1-CV5 for ``names`` (``diag_ggn_*``, ``*_batch``, ``kflr``/``kfac``) from one loss factor S."""
    results: Results = {}
    wanted = {k: (w, b) for k, w, b in trainable}
    diagonals = [name for name in names if name.startswith("diag")]
    for k, S_k in factors(tape, S, trainable[0][0]):
        if k not in wanted:
            continue
        q = _sum_of_squares(S_k) if diagonals else None  # q^(k+1), (N, n_{k+1})
        for name in names:
            if name in diagonals:
                value = _diagonal(q, tape.h[k], batch, *wanted[k], per_sample=name.endswith("_batch"))
            else:
                value = _kronecker(S_k, tape.h[k], *wanted[k])
            results.update({(k, kind, name): tensor for kind, tensor in value.items()})
    return results


# ---------------------------------------------------------------------------------------------
# The Hessian diagonal: CV1-CV2 on S and on the σ'' terms' identity columns (HD1-HD3).


def hessian_diagonal(
    tape: Tape, S: Tensor, names: Sequence[str], trainable: Trainable, batch: int
) -> Results:
    """HD1-HD3: ``diag_h`` / ``diag_h_batch`` from the exact S, the δ^(l) and the σ'' terms."""
    results: Results = {}
    wanted = {k: (w, b) for k, w, b in trainable}
    lowest, depth = trainable[0][0], len(tape.activations)
    delta = dict(deltas(tape, lowest))  # δ^(k+1), for g^(k)
    blocks = [(_times_sigma_prime(tape, depth - 1, S, fresh=True), None)]  # HD1
    residual = _sigma_second(tape, depth - 1, tape.grad_output)  # r^(L) = σ''_L ⊙ g^(L), or None
    for k in reversed(range(lowest, depth)):
        d = residual.clone() if residual is not None else 0  # the identity columns of r^(k+1) at z^(k+1)
        for F_k, w in blocks:
            squares = _sum_of_squares(F_k) if w is None else torch.einsum("kn,kni->ni", w, F_k.square())
            d = d + squares  # HD3, d^(k+1)
        if k in wanted:
            for name in names:
                value = _diagonal(d, tape.h[k], batch, *wanted[k], per_sample=name.endswith("_batch"))
                results.update({(k, kind, name): tensor for kind, tensor in value.items()})
        if k == lowest:
            return results
        W = tape.weights[k]  # W^(k)ᵀ, (n_{k+1}, n_k)
        blocks = [(_carry(tape, k, F_k.matmul(W), fresh=True), w) for F_k, w in blocks]  # HD2 via CV2
        if residual is not None:  # I W^(k)ᵀ: W's rows, the same for every row n
            identity_columns = W.unsqueeze(1).expand(-1, residual.shape[0], -1)  # (n_{k+1}, N, n_k)
            blocks.append(
                (_carry(tape, k, identity_columns, fresh=False), residual.t())
            )  # weights r^(k+1), (n_{k+1}, N)
        g = delta[k].mm(W)  # δ^(k+1) W^(k)ᵀ, (N, n_k)
        if tape.masks[k - 1] is not None:
            g = g * tape.masks[k - 1]  # g^(k)
        residual = _sigma_second(tape, k - 1, g)  # HD2, r^(k) = σ''_k ⊙ g^(k)
    return results


def _sigma_second(tape: Tape, layer: int, g: Tensor) -> Tensor | None:
    """σ''_{layer+1}(z) ⊙ g, or ``None`` where σ'' = 0 (identity, ReLU, leaky ReLU)."""
    act = tape.activations[layer]
    if act.derivative_from == "none" or act.second_derivative is zero_second_derivative:
        return None
    return act.second_derivative(tape.sigma_prime_from[layer]) * g
