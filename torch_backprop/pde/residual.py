r"""The Jacobian of a PDE residual in the parameters, from one Taylor pass and one adjoint pass.

A physics-informed loss is a sum of least-squares terms ½ mean_n w_n r_n², each over its own points:
an interior residual r_n = ρ(x_n, u, ∂u, Du) (−Δu − f, ∂_t u − κΔu, Black–Scholes, ...) or a
boundary/data residual r_n = u(x_n) − g(x_n). Gauss–Newton and energy natural gradient methods need
the Jacobian J = ∂r/∂θ (one row per point), not only the gradient Jᵀ w r / N that a backward pass
gives. It is a by-product of the recursion the gradient runs: TA1-TA3 and TA5
(:mod:`torch_backprop.pde.taylor`) keep each point's adjoints in that point's own column, and only
TA4 sums over the points. So seeding the adjoint pass with each point's own ∂r_n/∂(u, ∂u, Du) and
stopping before that sum leaves, per layer l and point n, the S rows z_{n,s} of the layer's input
and the S adjoints g_{n,s} of its output, whose outer products sum to the point's Jacobian row:

Notation (that of :mod:`torch_backprop.pde.taylor`, plus):
    S: rows per point, K + 2 for an interior term ([h; ∂h; Dh]), 1 for a boundary term ([h]).
    Z^(l) (S, N, n_l): the layer's input rows, [h; ∂h; Dh]^(l) (the bias's input is 1 in the h row
        and 0 in the others: ∂b enters z alone, TY1).
    G^(l) (S, N, n_{l+1}): the adjoints [z̄; ∂z̄; Dz̄]^(l+1) seeded on r_n alone:
        [h̄; ∂h̄; Dh̄]^(L)_n = ∂r_n/∂(u_n, ∂u_n, Du_n)   (from autograd of the residual function)
    J^(l) (N, n_{l+1}, n_l): the rows of J for W^(l) (nn.Linear layout), J_b^(l) (N, n_{l+1}) for b^(l).

Equations (RJ1-RJ5), l = 0, ..., L-1:
    RJ1  G^(l) = TA1-TA3 of [h̄; ∂h̄; Dh̄]^(l+1), and [h̄; ∂h̄; Dh̄]^(l) = G^(l) W^(l)ᵀ (TA5), per point
    RJ2  J^(l)_n = Σ_s g_{n,s} z_{n,s}ᵀ,   J_b^(l)_n = g_{n,h}                   (TA4 before its sum)
    RJ3  (J v)_n = Σ_l Σ_s g_{n,s} · (V^(l) z_{n,s}) + g_{n,h} · v_b^(l)         (one product per layer)
    RJ4  Jᵀ u = Σ_n u_n J_n:  W̄^(l) = (u ⊙ G^(l))ᵀ Z^(l),  b̄^(l) = (u ⊙ G_h^(l))ᵀ 1    (TA4 with row weights)
    RJ5  J Jᵀ = Σ_l J^(l) J^(l)ᵀ + J_b^(l) J_b^(l)ᵀ (the N×N kernel),  JᵀJ (the D×D Gramian)
At l = 0 the rows are Z^(0) = [x; e_{i_k}; b]: the input, the unit vectors of the K coordinates
(the same at every point) and the first-order coefficients b of D (zero without a drift).

A boundary term (``order=0``) runs the slides' δ recursion (:func:`~torch_backprop.core.phases.deltas`):
S = 1, Z^(l) = h^(l), G^(l) = δ^(l+1) seeded on r_n alone.

The residual function must be pointwise: r_n may depend on point n's values alone (any torch
function of them, linear or not, and of x_n); RJ1 seeds each point with its own derivative.

Kronecker factors (KF1-KF3, KFAC-expand for the weight-shared Taylor pass: Dangel, Müller &
Zeinhofer, NeurIPS 2024; Eschenhagen et al., NeurIPS 2023). The term's Gauss–Newton block of layer
l, over W̃^(l) = [W^(l), b^(l)] flattened row by row (vec(g z̃ᵀ) = g ⊗ z̃), is
(1/N) Σ_n w_n vec(J̃_n) vec(J̃_n)ᵀ with J̃_n = Σ_s g_{n,s} z̃_{n,s}ᵀ (RJ2). KFAC-expand takes the
N·S rows as independent (it drops the cross terms s ≠ s′) and factorises their sum as
Σ_r a_r ⊗ b_r ≈ (Σ_r a_r) ⊗ (Σ_r b_r) / R over the R = N·S rows, giving B^(l) ⊗ A^(l) with:
    KF1  Z̃^(l) = [Z^(l), e] (S, N, n_l + 1),  e_s = 1 in the h row, 0 in the others (the bias's input)
    KF2  A^(l) = Σ_{n,s} z̃_{n,s} z̃_{n,s}ᵀ / (N S)                        ((n_l + 1)², the inputs)
    KF3  B^(l) = Σ_{n,s} w_n g_{n,s} g_{n,s}ᵀ / N                          (n_{l+1}², the adjoints)
KF3 is the paper's N·ĜᵀĜ with Ĝ = √w G / N, the adjoints seeded on ∂ℓ/∂r_n = w_n r_n / N of the
term's loss ℓ = ½ mean w r² with the residual replaced by 1 (the Gauss–Newton seed). Columns follow
the layer's trainable parameters: W's n_l and b's one, either left out when frozen. A boundary term
(S = 1) gives ordinary KFAC; for one point (N = S = 1) B ⊗ A is the Gauss–Newton block exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..core.module import BackpropMLP
from ..core.phases import Stack, deltas, forward_phase, make_tape
from .operators import InputDerivatives, checked_operator
from .taylor import Coefficients, activation_adjoints, layer_outputs, taylor_forward

__all__ = ["Residual", "ResidualTape", "residual_jacobian"]

Residual = Callable[[Tensor, InputDerivatives], Tensor]
"""A residual function ``residual(x, d) -> r``: the points (N, d) and their :class:`InputDerivatives`
to the residuals (N,). With ``order=0`` only ``d.value`` is set (``gradient`` and ``operator`` are
``None``)."""


class ResidualTape:
    """One least-squares term ½ mean_n w_n r_n² and its Jacobian ∂r/∂θ, kept as per-layer factors.

    Made by :func:`residual_jacobian`. The Jacobian's columns are the model's parameters that require
    grad, in ``model.parameters()`` order (:attr:`parameters`); each layer holds Z^(l) and G^(l) (RJ2),
    so J v, Jᵀ u and the kernel J Jᵀ never need the whole N×D matrix, and :meth:`jacobian` makes it
    only when asked.

    Attributes:
        residual: r, ``(N,)``, at the parameters the tape was made at (detached).
        weight: w, a float or ``(N,)``: the term's loss is ½ mean_n w_n r_n².
        parameters: the Jacobian's columns, in order.
        points: the points x, ``(N, d)``.
    """

    def __init__(
        self,
        model: BackpropMLP,
        points: Tensor,
        function: Residual,
        order: int,
        coefficients: Coefficients | None,
        weight: float | Tensor,
        residual: Tensor,
        factors: list[tuple[Tensor, Tensor]],
    ) -> None:
        self.model, self.points, self.function, self.order = model, points, function, order
        self.coefficients, self.weight, self.residual = coefficients, weight, residual
        self._factors = factors  # per layer: (Z^(l) (S, N, n_l), G^(l) (S, N, n_{l+1}))
        self._columns = [
            (k, name, p)
            for k, layer in enumerate(model.layers)
            for name, p in (("weight", layer.weight), ("bias", layer.bias))
            if p is not None and p.requires_grad
        ]
        self.parameters = [p for _, _, p in self._columns]

    @property
    def columns(self) -> list[tuple[int, str, Tensor]]:
        """The Jacobian's column blocks in order: ``(layer index, "weight" or "bias", parameter)``."""
        return list(self._columns)

    def __len__(self) -> int:
        return self.residual.shape[0]

    def loss(self, residual: Tensor | None = None) -> Tensor:
        """½ mean_n w_n r_n², of the tape's residual or of a given one (0 for no points)."""
        r = self.residual if residual is None else residual
        if r.numel() == 0:
            return r.new_zeros(())
        return 0.5 * (self.weight * r.square()).mean()

    @torch.no_grad()
    def evaluate(self) -> Tensor:
        """The residuals at the model's current parameters and the tape's points (a forward pass only)."""
        return _residual_values(self.model, self.points, self.function, self.order, self.coefficients)[0]

    # -- J, column blocks ----------------------------------------------------------------------

    def _weight_rows(self, k: int) -> Tensor:
        """J^(l)_n = Σ_s g_{n,s} z_{n,s}ᵀ (RJ2): ``(N, n_{l+1}, n_l)``."""
        Z, G = self._factors[k]
        return torch.einsum("sno,sni->noi", G, Z)

    def jacobian(self, out: Tensor | None = None) -> Tensor:
        """J, ``(N, D)``: row n is ∂r_n/∂θ, the parameters flattened in :attr:`parameters` order.

        Written into ``out`` (N, D) when given (for example a slice of a stacked system).
        """
        columns = sum(p.numel() for p in self.parameters)
        if out is None:
            out = self.residual.new_empty(len(self), columns)
        elif tuple(out.shape) != (len(self), columns):
            raise ValueError(
                f"ResidualTape.jacobian expects out of shape {(len(self), columns)}, got {tuple(out.shape)}"
            )
        start = 0
        for k, name, p in self._columns:
            block = out[:, start : start + p.numel()]
            if name == "weight":
                block.view(len(self), *p.shape).copy_(self._weight_rows(k))  # RJ2
            else:
                block.copy_(self._factors[k][1][0])  # RJ2: g_{n,h}
            start += p.numel()
        return out

    def jvp(self, tangents: Sequence[Tensor]) -> Tensor:
        """J v, ``(N,)``, for v given as one tensor per parameter (RJ3)."""
        _check_like(tangents, self.parameters, "ResidualTape.jvp")
        out = self.residual.new_zeros(len(self))
        for (k, name, _), v in zip(self._columns, tangents, strict=True):
            Z, G = self._factors[k]
            if name == "weight":
                out += (Z.flatten(0, 1).mm(v.t()).view_as(G) * G).sum((0, 2))  # Σ_s g · (V z)
            else:
                out += G[0].mv(v)  # g_h · v_b
        return out

    def vjp(self, u: Tensor) -> list[Tensor]:
        """Jᵀ u, one tensor per parameter (RJ4); u is ``(N,)``."""
        if not isinstance(u, Tensor) or tuple(u.shape) != (len(self),):
            given = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"ResidualTape.vjp expects u of shape ({len(self)},), got {given}")
        out = []
        for k, name, _ in self._columns:
            Z, G = self._factors[k]
            if name == "weight":
                weighted = (G * u.view(1, -1, 1)).flatten(0, 1)
                out.append(weighted.t().mm(Z.flatten(0, 1)))  # (u ⊙ G)ᵀ Z, (n_{l+1}, n_l)
            else:
                out.append(G[0].t().mv(u))  # (u ⊙ g_h)ᵀ 1
        return out

    def kernel(self) -> Tensor:
        """J Jᵀ, ``(N, N)`` (RJ5), accumulated layer by layer."""
        out = self.residual.new_zeros(len(self), len(self))
        for k, name, _ in self._columns:
            rows = self._weight_rows(k).flatten(1) if name == "weight" else self._factors[k][1][0]
            out.addmm_(rows, rows.t())
        return out

    def gramian(self) -> Tensor:
        """JᵀJ, ``(D, D)`` (RJ5)."""
        jacobian = self.jacobian()
        return jacobian.t().mm(jacobian)

    # -- Kronecker factors -----------------------------------------------------------------------

    def kronecker_factors(self, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor] | None]:
        """Per layer, the KFAC-expand factors ``(A, B)`` of this term (KF1-KF3), in ``dtype``.

        ``A`` is ``(m, m)`` over the layer's trainable input columns (n_l for W, one more for b, in the
        order ``[W, b]``), ``B`` is ``(n_{l+1}, n_{l+1})``; ``None`` for a layer with nothing trainable.
        For a term with no points both are zero. B ⊗ A approximates the term's Gauss–Newton block of
        the layer, ``[W, b]`` flattened row by row.

        Shape:
            A: ``(n_l + 1, n_l + 1)`` with a trainable weight and bias (``n_l`` or 1 with one of them);
            B: ``(n_{l+1}, n_{l+1})``.
        """
        trainable: dict[int, set[str]] = {}
        for k, name, _ in self._columns:
            trainable.setdefault(k, set()).add(name)
        rows = max(len(self), 1)
        weight = self.weight
        out: list[tuple[Tensor, Tensor] | None] = []
        for k, (Z, G) in enumerate(self._factors):
            if k not in trainable:
                out.append(None)
                continue
            S = Z.shape[0]
            Z, G = Z.to(dtype).flatten(0, 1), G.to(dtype)
            if isinstance(weight, Tensor):
                G = G * weight.to(dtype).sqrt().view(1, -1, 1)
            else:
                G = G * math.sqrt(weight)
            G = G.flatten(0, 1)
            B = G.t().mm(G).div_(rows)  # KF3
            parts = trainable[k]
            if "weight" in parts:
                A = Z.t().mm(Z)  # KF2, the W block
                if "bias" in parts:
                    h_sum = Z[: len(self)].sum(0)  # Z̃ᵀe: the h rows come first (KF1)
                    corner = Z.new_full((1, 1), float(len(self)))
                    top = torch.cat([A, h_sum.unsqueeze(1)], 1)
                    A = torch.cat([top, torch.cat([h_sum.unsqueeze(0), corner], 1)])
            else:
                A = Z.new_full((1, 1), float(len(self)))  # eᵀe = N
            out.append((A.div_(rows * S), B))
        return out


def residual_jacobian(
    model: BackpropMLP,
    points: Tensor,
    residual: Residual,
    *,
    order: int = 2,
    coordinates: Sequence[int] | Tensor | None = None,
    diagonal: Tensor | None = None,
    matrix: Tensor | None = None,
    drift: Tensor | None = None,
    weight: float | Tensor = 1.0,
) -> ResidualTape:
    r"""The residuals of one loss term at ``points`` and their Jacobian in the parameters, as a tape.

    One Taylor forward pass gives u, ∂u and D u (as :func:`~torch_backprop.input_derivatives` does,
    with the same ``coordinates``, ``diagonal``, ``matrix`` and ``drift``), ``residual(points, d)``
    turns them into r (N,), and one adjoint pass seeded on each point's own ∂r_n/∂(u, ∂u, Du) keeps the
    per-layer factors of J (RJ1-RJ2 of :mod:`torch_backprop.pde.residual`). No nested autograd, and
    the N×D Jacobian is made only if asked for. With ``order=0`` (a boundary or data term, a
    function of u alone) the forward is the slides' and the adjoint their δ recursion.

    Neither reads nor writes ``.grad``; the model is not changed.

    Args:
        model: a :class:`~torch_backprop.BackpropMLP` with one output or more.
        points: ``(N, d)``.
        residual: ``residual(points, d) -> r`` of shape ``(N,)``, pointwise (r_n depends on point n
            alone), differentiable in ``d``'s tensors; ``d`` is an :class:`InputDerivatives`
            (``value`` (N, n_L), ``gradient`` (N, n_L, K), ``operator`` (N, n_L); with ``order=0``
            only ``value``).
        order: 2 (value, gradient and operator: an interior term) or 0 (the value alone).
        coordinates: the K coordinates of D's second derivatives, as for ``input_derivatives``.
        diagonal: C's diagonal, as for ``input_derivatives`` (``order=2`` only, as the others).
        matrix: C, as for ``input_derivatives``.
        drift: D's first-order coefficients b, as for ``input_derivatives``.
        weight: w in the term's loss ½ mean_n w_n r_n²: a positive float or a non-negative ``(N,)``
            tensor.

    Returns:
        The :class:`ResidualTape`.

    Raises:
        TypeError: ``model`` is not a BackpropMLP, ``residual`` not callable or not returning a
            tensor, a bad ``points`` dtype or coefficient type.
        ValueError: ``points`` not (N, d), ``order`` not 0 or 2, operator arguments with
            ``order=0``, a residual of another shape than (N,), a bad ``weight``; and every refusal
            of ``input_derivatives``.

    Example:
        >>> model = BackpropMLP([2, 16, 1], "tanh", dtype=torch.float64)
        >>> x = torch.rand(100, 2, dtype=torch.float64)
        >>> tape = residual_jacobian(model, x, lambda x, d: -d.operator[:, 0] - 1.0)  # −Δu = 1
        >>> tape.jacobian().shape, tape.kernel().shape
        (torch.Size([100, 65]), torch.Size([100, 100]))
    """
    caller = "residual_jacobian"
    if order not in (0, 2):
        raise ValueError(
            f"{caller} expects order 0 (the value) or 2 (value, gradient, operator), got {order!r}"
        )
    if not callable(residual):
        raise TypeError(
            f"{caller} expects residual to be a function (points, d) -> r, got {type(residual).__name__}"
        )
    if isinstance(points, Tensor) and points.dim() != 2:
        raise ValueError(f"{caller} expects points of shape (N, d), got {tuple(points.shape)}")
    if order == 0:
        given = [
            n
            for n, a in zip(
                ("coordinates", "diagonal", "matrix", "drift"),
                (coordinates, diagonal, matrix, drift),
                strict=True,
            )
            if a is not None
        ]
        if given:
            raise ValueError(f"{caller} with order=0 takes no operator, got {', '.join(given)}")
    weights, biases, c = checked_operator(
        model, points, caller, coordinates, diagonal, matrix, drift, warn_stacklevel=3 if order == 2 else None
    )
    if order == 0:
        c = None
    weight = _checked_weight(weight, points, caller)
    r, seeds, forward = _residual_values(model, points, residual, order, c, seeds=True)
    if order == 0:
        factors = _boundary_factors(model, points, weights, forward, seeds)
    else:
        factors = _interior_factors(model, points, weights, c, forward, seeds)
    return ResidualTape(model, points, residual, order, c, weight, r, factors)


# ---------------------------------------------------------------------------------------------
# The residual and its seeds, and the factors Z^(l), G^(l) of both kinds of term (RJ1-RJ2).


def _residual_values(
    model: BackpropMLP,
    points: Tensor,
    function: Residual,
    order: int,
    c: Coefficients | None,
    *,
    seeds: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...] | None, object]:
    """``(r, seeds, forward)``: r (N,) at the current parameters and, with ``seeds``, ∂r_n/∂(u, ∂u, Du).

    ``forward`` is what the adjoint pass reads: the Taylor pass's tape, or the slides' forward phase.
    """
    activations, weights = model.activations, [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    with torch.no_grad():
        if order == 0:
            forward = forward_phase(points, activations, Stack(weights, biases, [None] * (len(weights) - 1)))
            outputs = (forward[0],)
        else:
            (u, du, Du), forward = taylor_forward(points, activations, weights, biases, c, lean=True)
            outputs = (u, du.permute(1, 2, 0), Du)  # the public layout: gradient (N, n_L, K)
    leaves = [t.detach().requires_grad_(seeds) for t in outputs]
    d = InputDerivatives(leaves[0], None, None) if order == 0 else InputDerivatives(*leaves)  # type: ignore[arg-type]
    with torch.enable_grad() if seeds else torch.no_grad():
        r = function(points, d)
    if not isinstance(r, Tensor):
        raise TypeError(f"the residual function must return a tensor of shape (N,), got {type(r).__name__}")
    if tuple(r.shape) != (points.shape[0],):
        raise ValueError(
            f"the residual function must return one residual per point, shape ({points.shape[0]},), "
            f"got {tuple(r.shape)}"
        )
    if not seeds:
        return r.detach(), None, forward
    if not r.requires_grad:
        zero = tuple(torch.zeros_like(t) for t in leaves)
        return r.detach(), zero, forward
    grads = torch.autograd.grad(r, leaves, torch.ones_like(r), allow_unused=True)
    bars = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True))
    return r.detach(), bars, forward


def _interior_factors(
    model: BackpropMLP,
    x: Tensor,
    weights: Sequence[Tensor],
    c: Coefficients,
    tape: list,
    seeds: tuple[Tensor, ...],
) -> list[tuple[Tensor, Tensor]]:
    """Z^(l), G^(l) of an interior term: TA1-TA3 and TA5 seeded per point, TA4 left out (RJ1-RJ2)."""
    depth, rows = len(weights), x.shape[0]
    u_bar, du_bar, Du_bar = seeds
    bar = torch.cat([u_bar.unsqueeze(0), du_bar.permute(2, 0, 1), Du_bar.unsqueeze(0)])  # [h̄; ∂h̄; Dh̄]^(L)
    factors: list[tuple[Tensor, Tensor]] = [None] * depth  # type: ignore[list-item]
    for k in reversed(range(depth)):
        activation_adjoints(model.activations[k], tape[k], bar)  # RJ1: G^(k) = [z̄; ∂z̄; Dz̄]^(k+1)
        if k > 0:
            Z = layer_outputs(tape[k - 1], rows, lean=True)  # [h; ∂h; Dh]^(k), (S, N, n_k)
            factors[k] = (Z, bar)
            bar = bar.flatten(0, 1).mm(weights[k]).view(*bar.shape[:2], weights[k].shape[1])  # RJ1 (TA5)
        else:
            factors[0] = (_first_rows(x, c), bar)
    return factors


def _first_rows(x: Tensor, c: Coefficients) -> Tensor:
    """Z^(0) = [x; e_{i_k}; b], ``(K+2, N, d)``."""
    count, (rows, dim) = c.coordinates.numel(), x.shape
    Z = x.new_zeros(count + 2, rows, dim)
    Z[0] = x
    Z[1 + torch.arange(count, device=x.device), :, c.coordinates] = 1.0  # ∂_k h^(0) = e_{i_k}
    if c.drift is not None:
        Z[-1] = c.drift  # Dh^(0) = b
    return Z


def _boundary_factors(
    model: BackpropMLP,
    x: Tensor,
    weights: Sequence[Tensor],
    forward: object,
    seeds: tuple[Tensor, ...],
) -> list[tuple[Tensor, Tensor]]:
    """Z^(l) = h^(l), G^(l) = δ^(l+1) of a boundary term, the δ recursion seeded per point (S = 1)."""
    (u_bar,) = seeds
    stack = Stack(weights, [layer.bias for layer in model.layers], [None] * (len(weights) - 1))
    tape = make_tape(u_bar, x, model.activations, stack, forward, weights[0].dtype, cast=False)
    factors: list[tuple[Tensor, Tensor]] = [None] * len(weights)  # type: ignore[list-item]
    for k, delta in deltas(tape):
        factors[k] = (tape.h[k].unsqueeze(0), delta.unsqueeze(0))  # (1, N, n_k), (1, N, n_{k+1})
    return factors


def _checked_weight(weight: float | Tensor, points: Tensor, caller: str) -> float | Tensor:
    if isinstance(weight, Tensor):
        if tuple(weight.shape) != (points.shape[0],) or weight.dtype != points.dtype:
            raise ValueError(
                f"{caller} expects weight as a float or a tensor of shape ({points.shape[0]},) and dtype "
                f"{points.dtype}, got shape {tuple(weight.shape)} and dtype {weight.dtype}"
            )
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError(f"{caller} expects finite, non-negative weights")
        return weight.detach()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise ValueError(f"{caller} expects weight to be a finite number > 0, got {weight!r}")
    return float(weight)


def _check_like(tensors: Sequence[Tensor], like: Sequence[Tensor], caller: str) -> None:
    shapes = [tuple(t.shape) for t in like]
    given = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in tensors]
    if len(given) != len(shapes) or given != shapes:
        raise ValueError(f"{caller} expects one tensor per parameter of shapes {shapes}, got {given}")
