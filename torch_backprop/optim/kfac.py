r"""KFAC for least-squares PDE losses: Kronecker factors of the Taylor pass, inverted exactly per layer.

Dangel, Müller & Zeinhofer, "Kronecker-factored approximate curvature for physics-informed neural
networks" (NeurIPS 2024; their code: f-dangel/kfac-pinns-experiments). Exact ENGD
(:mod:`torch_backprop.optim.engd`) solves with the whole Gauss–Newton matrix of the loss
L = Σ_t ½ mean_n w_t,n r_t,n²; KFAC keeps, per layer and kind of term κ (interior Ω: the tapes of
``order=2``; boundary ∂Ω: ``order=0``), one Kronecker product B_κ ⊗ A_κ of the tape's factors
(KF1-KF3, :meth:`~torch_backprop.pde.residual.ResidualTape.kronecker_factors`) and inverts their
damped sum exactly (KF6-KF7, :mod:`torch_backprop.optim.kronecker`), in float64, O(Σ_l n_l³) a step:

    KF4  A_κ ← β A_κ + (1 − β) Â_κ,   B_κ ← β B_κ + (1 − β) B̂_κ,   from A_κ = I, B_κ = I (or 0)
         (Â_κ, B̂_κ: KF2-KF3 of the step's terms of kind κ; several are pooled over their R_t = N_t S_t
         rows, Â_κ = Σ_t R_t A_t / Σ_t R_t, B̂_κ = Σ_t B_t)
    KF5  C^(l) = Σ_κ (B_κ + λI) ⊗ (A_κ + λI)            (the damping on every factor, as the authors')
    KF8  Δ^(l) = −C^(l)⁻¹ ∇_W̃ L,   ∇L = Σ_t J_tᵀ (w_t ⊙ r_t) / N_t      (RJ4; per layer, KF7)
    KF9  (η, μ) = argmin_{η,μ} m(η Δ + μ δ),  m(v) = ∇Lᵀ v + ½ vᵀ (J̃ᵀ J̃ + λ I) v   (δ: the last update)
         ⇔ [ΔᵀGΔ + λ ΔᵀΔ, ΔᵀGδ + λ Δᵀδ; ΔᵀGδ + λ Δᵀδ, δᵀGδ + λ δᵀδ] (η, μ)ᵀ = −(∇LᵀΔ, ∇Lᵀδ)ᵀ
         with vᵀ G v' = (J̃ v)ᵀ (J̃ v') by the tapes' J v (RJ3, LS1), no second derivative; without δ
         (the first step, or after a skipped one) η = −∇LᵀΔ / (ΔᵀGΔ + λ ΔᵀΔ), μ = 0
    KF10 θ ← θ + u,   u = η Δ + μ δ       (η, μ by KF9; or η by the grid line search LS3, or η = lr)

KF9 is Martens & Grosse's (2015, §7) rule, the paper's KFAC*. Why the damping is on the factors
(KF5) and not λI on their sum: Σ_κ B_κ ⊗ A_κ + λ I is a sum of three Kronecker products, which no
pair of eigenbases diagonalises, so it has no inverse as cheap as KF7; (B + λI) ⊗ (A + λI) damps every
direction by at least λ² and keeps C symmetric positive definite for λ > 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..pde.residual import ResidualTape
from .kronecker import apply_inverse, kronecker_sum_basis
from .least_squares import DEFAULT_GRID, check_number, grid_line_search, terms_from_closure, write_parameters

__all__ = ["KFAC"]

_RULES = ("auto", "grid", None)
_AVERAGES = ("factors", "basis", "basis_step", "basis_kinds")
_KINDS = {2: "interior", 0: "boundary"}


class KFAC(torch.optim.Optimizer):
    r"""KFAC for PDE losses: per layer the exact inverse of two damped Kronecker products (KF4-KF10).

    Called as :class:`~torch_backprop.optim.ENGD` is: ``step(closure)`` calls ``closure()`` once,
    which returns the terms (:func:`~torch_backprop.pde.residual.residual_jacobian` tapes: interior
    terms with ``order=2``, boundary or data terms with ``order=0``, each with its weight). Each step
    folds the terms' Kronecker factors into their moving averages (KF4), recomputes the inverse
    every ``inverse_every`` steps (KF6), and takes the preconditioned step Δ (KF8) with the step size
    and momentum of ``line_search_fn``:

    * ``"auto"`` (the default, the paper's KFAC*): η and μ minimise the quadratic model with the
      exact Gauss–Newton matrix in the plane of Δ and the last update (KF9), from the tapes' J v;
    * ``"grid"``: the grid line search (LS3) along η Δ + μ δ, μ = ``momentum`` (heavy ball);
    * ``None``: η = ``lr``, μ = ``momentum``.

    Factors, inverses and steps are float64 for any model dtype. ``p.grad`` is neither read nor
    written. Nothing non-finite reaches the weights: a step whose residuals, new factors or step are
    not finite is skipped (the parameters, the averages and the inverse as they were), and an inverse
    that fails keeps the previous one (or skips the step if there is none), each with a warning and a
    count.
    All state lives under ``optimizer.state["kfac"]`` (kept uncast by ``load_state_dict``, so a
    resumed run is bitwise the same):

    * ``step``; ``factors``: per kind (``"interior"``, ``"boundary"``), per layer ``[A, B]`` (KF4);
      ``basis``: per layer the KF6 basis ``(V_A, α, V_B, β, shift)``, ``basis_step``: when made;
    * ``update``: the last update u (flat, float64, in the tapes' column order);
    * ``loss``, ``losses``: L before the last step and each term's part; ``lr``, ``momentum``: the
      last step's η and μ (0 for a skipped step);
    * ``skipped``: counts of ``"steps"`` (non-finite residuals or step, no decrease on the grid),
      ``"factors"`` (non-finite factors) and ``"inverses"`` (a failed eigendecomposition).

    Args:
        params: the model's parameters that require grad (exactly the tapes' Jacobian columns).
        lr: η when ``line_search_fn`` is ``None``.
        momentum: μ with ``"grid"`` or ``None`` (``"auto"`` chooses μ itself: give 0).
        damping: λ ≥ 0, added to every Kronecker factor (KF5) and to the Gauss–Newton matrix of KF9.
        ema_factor: β in [0, 1) of the moving averages (KF4; 0: this step's factors alone).
        initialize_to_identity: start the averages from I (else from 0, the authors' default).
        inverse_every: recompute the inverse every this many steps (the authors' T_inv).
        line_search_fn: ``"auto"``, ``"grid"`` or ``None``.
        grid: the step sizes the grid line search tries; default 2⁻³⁰, ..., 2⁻¹, 1.

    Example:
        >>> model = BackpropMLP([2, 32, 1], "tanh", dtype=torch.float64)
        >>> optimizer = KFAC(model.parameters(), damping=1e-8)
        >>> x_in, x_bd = torch.rand(200, 2, dtype=torch.float64), torch.zeros(20, 2, dtype=torch.float64)
        >>> def closure():  # −Δu = 1 inside, u = 0 on the boundary points
        ...     return [
        ...         residual_jacobian(model, x_in, lambda x, d: -d.operator[:, 0] - 1),
        ...         residual_jacobian(model, x_bd, lambda x, d: d.value[:, 0], order=0),
        ...     ]
        >>> loss = optimizer.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        *,
        momentum: float = 0.0,
        damping: float = 1e-10,
        ema_factor: float = 0.95,
        initialize_to_identity: bool = True,
        inverse_every: int = 1,
        line_search_fn: str | None = "auto",
        grid: Sequence[float] | None = None,
    ) -> None:
        check_number("KFAC", "lr", lr, low=0, open_low=True)
        check_number("KFAC", "momentum", momentum, low=0, high=1, open_high=True)
        check_number("KFAC", "damping", damping, low=0)
        check_number("KFAC", "ema_factor", ema_factor, low=0, high=1, open_high=True)
        if not isinstance(initialize_to_identity, bool):
            raise TypeError(
                "KFAC expects initialize_to_identity True or False, "
                f"got {type(initialize_to_identity).__name__}"
            )
        if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
            raise ValueError(f"KFAC expects inverse_every to be an integer >= 1, got {inverse_every!r}")
        if line_search_fn not in _RULES:
            raise ValueError(f"KFAC expects line_search_fn 'auto', 'grid' or None, got {line_search_fn!r}")
        if line_search_fn == "auto" and momentum:
            raise ValueError(
                "KFAC with line_search_fn='auto' chooses the momentum itself (KF9), "
                f"got momentum={momentum!r}"
            )
        grid = DEFAULT_GRID if grid is None else tuple(grid)
        if not grid or not all(isinstance(g, (int, float)) and 0 < g < math.inf for g in grid):
            raise ValueError(f"KFAC expects grid as a non-empty list of finite step sizes > 0, got {grid!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            ema_factor=ema_factor,
            initialize_to_identity=initialize_to_identity,
            inverse_every=inverse_every,
            line_search_fn=line_search_fn,
            grid=grid,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "KFAC preconditions all parameters at once and takes one parameter group, "
                f"got {len(self.param_groups)}"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], object]) -> Tensor:  # type: ignore[override]
        """One KFAC step; returns the loss L before it (a float64 scalar).

        Args:
            closure: returns the loss terms, a :class:`~torch_backprop.pde.residual.ResidualTape` or a
                list of them; called once.

        Raises:
            TypeError: no closure, or one that returns something else (a loss tensor).
            ValueError: terms over other parameters than the optimiser's.
        """
        group = self.param_groups[0]
        with torch.enable_grad():
            terms = terms_from_closure(closure, group["params"], "KFAC")
        state = self.state["kfac"]
        if not state:
            state.update(
                step=0,
                factors={},
                basis=None,
                basis_step=0,
                basis_kinds=[],
                update=None,
                skipped={"steps": 0, "factors": 0, "inverses": 0},
            )
        losses = [_term_loss(t) for t in terms]
        loss = sum(losses)
        state.update(loss=loss, losses=losses)
        state["step"] += 1
        if not math.isfinite(loss):
            return self._skip(state, "steps", "the residuals are not finite")
        fresh = _pooled_factors(terms)  # KF2-KF3 per kind, float64
        if not all(_finite(pair) for layers in fresh.values() for pair in layers if pair is not None):
            return self._skip(state, "factors", "the new Kronecker factors are not finite")
        before = {
            key: state[key] for key in _AVERAGES
        }  # replaced, never changed in place: a skip restores them
        state["factors"] = _average(
            state["factors"], fresh, group["ema_factor"], group["initialize_to_identity"]
        )  # KF4
        if not self._update_basis(state, group):
            return self._skip(
                state, "inverses", "no inverse of the Kronecker factors (not positive definite)", before
            )
        params = terms[0].parameters
        gradient = _gradient(terms)
        step = _natural_step(terms[0].columns, gradient, state["basis"])  # KF8
        if not bool(torch.isfinite(step).all()):
            return self._skip(state, "steps", "the preconditioned step is not finite", before)
        previous = state["update"]
        origin = [p.detach().clone() for p in params]
        rule = group["line_search_fn"]
        if rule == "grid":
            eta, update, _ = grid_line_search(
                terms, params, origin, step, previous, group["momentum"], group["grid"], loss
            )
            mu = group["momentum"] if previous is not None else 0.0
            if eta == 0:
                state["skipped"] = {**state["skipped"], "steps": state["skipped"]["steps"] + 1}
                mu = 0.0
        else:
            if rule == "auto":
                eta, mu = _quadratic_model_step(terms, gradient, step, previous, group["damping"])  # KF9
            else:
                eta, mu = group["lr"], group["momentum"]
            update = step * eta  # KF10
            if previous is not None and mu:
                update.add_(previous, alpha=mu)
            if not bool(torch.isfinite(update).all()):
                return self._skip(state, "steps", "the step size or momentum is not finite", before)
            write_parameters(params, origin, update)
        state.update(lr=eta, momentum=mu if previous is not None else 0.0, update=update)
        return torch.tensor(loss, dtype=torch.float64)

    def _update_basis(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """KF5-KF6 when due; a layer whose decomposition fails keeps its previous basis."""
        kinds = [k for k in ("interior", "boundary") if k in state["factors"]]
        due = (
            state["basis"] is None
            or (state["step"] - state["basis_step"]) >= group["inverse_every"]
            or state["basis_kinds"] != kinds
        )
        if not due:
            return True
        damping, old = group["damping"], state["basis"]
        layers = len(state["factors"][kinds[0]])
        basis, failed = [], False
        for k in range(layers):
            pairs = [state["factors"][kind][k] for kind in kinds]
            if pairs[0] is None:
                basis.append(None)
                continue
            damped = [(_damped(A, damping), _damped(B, damping)) for A, B in pairs]  # KF5
            made = kronecker_sum_basis(damped)
            if made is None:
                failed = True
                made = old[k] if old is not None and state["basis_kinds"] == kinds else None
                if made is None:
                    return False
            basis.append(made)
        if failed:
            state["skipped"] = {**state["skipped"], "inverses": state["skipped"]["inverses"] + 1}
            warnings.warn(
                "KFAC: a Kronecker factor's eigendecomposition failed (not positive definite or not "
                "finite); the previous inverse is kept for that layer",
                RuntimeWarning,
                stacklevel=3,
            )
        state.update(basis=basis, basis_step=state["step"], basis_kinds=kinds)
        return True

    def _skip(
        self, state: dict[str, Any], kind: str, why: str, before: dict[str, Any] | None = None
    ) -> Tensor:
        """Count and warn; the averages and the inverse as they were before this step."""
        if before is not None:
            state.update(before)
        warnings.warn(
            f"KFAC: {why}; the step is skipped and the parameters are unchanged "
            f"(optimizer.state['kfac']['skipped'] counts it)",
            RuntimeWarning,
            stacklevel=3,
        )
        state["skipped"] = {**state["skipped"], kind: state["skipped"][kind] + 1}
        state.update(lr=0.0, momentum=0.0, update=None)
        return torch.tensor(state["loss"], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The pieces of a step: the terms' losses, factors, gradient, KF8 and KF9.


def _term_loss(term: ResidualTape) -> float:
    """½ mean_n w_n r_n² in float64 (the tape's own loss, of its residuals in float64)."""
    return float(term.loss(term.residual.double()))


def _finite(pair: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pair)


def _pooled_factors(terms: Sequence[ResidualTape]) -> dict[str, list[tuple[Tensor, Tensor] | None]]:
    """Â_κ, B̂_κ per kind and layer: KF2-KF3 of each term, pooled over the terms of a kind (KF4)."""
    sums: dict[str, list[Any]] = {}
    rows: dict[str, float] = {}
    for term in terms:
        kind = _KINDS[term.order]
        count = len(term) * (1 if term.order == 0 else term.coefficients.coordinates.numel() + 2)
        factors = term.kronecker_factors(torch.float64)
        if kind not in sums:
            sums[kind], rows[kind] = [None] * len(factors), 0.0
        for k, pair in enumerate(factors):
            if pair is None:
                continue
            A, B = pair
            if sums[kind][k] is None:
                sums[kind][k] = [A * count, B]
            else:
                sums[kind][k][0] = sums[kind][k][0] + A * count
                sums[kind][k][1] = sums[kind][k][1] + B
        rows[kind] += count
    return {
        kind: [None if s is None else (s[0] / max(rows[kind], 1.0), s[1]) for s in layers]
        for kind, layers in sums.items()
    }


def _average(
    averages: dict[str, list[Any]],
    fresh: dict[str, list[tuple[Tensor, Tensor] | None]],
    beta: float,
    identity: bool,
) -> dict[str, list[Any]]:
    """KF4 into new tensors, lists and a new dict (the old ones stay as they were)."""
    out = dict(averages)
    for kind, layers in fresh.items():
        old = averages.get(kind) or [
            None if pair is None else [_start(pair[0], identity), _start(pair[1], identity)]
            for pair in layers
        ]
        out[kind] = [
            None
            if pair is None
            else [beta * avg[0] + (1 - beta) * pair[0], beta * avg[1] + (1 - beta) * pair[1]]
            for avg, pair in zip(old, layers, strict=True)
        ]
    return out


def _start(factor: Tensor, identity: bool) -> Tensor:
    return torch.eye(len(factor), dtype=factor.dtype) if identity else torch.zeros_like(factor)


def _damped(factor: Tensor, damping: float) -> Tensor:
    return factor + damping * torch.eye(len(factor), dtype=factor.dtype)


def _gradient(terms: Sequence[ResidualTape]) -> dict[int, Tensor]:
    """∇L by parameter (``id`` → float64 tensor): Σ_t J_tᵀ (w_t ⊙ r_t) / N_t (RJ4)."""
    total: dict[int, Tensor] = {}
    for term in terms:
        if len(term) == 0:
            continue
        seed = term.residual * term.weight / len(term)
        for p, g in zip(term.parameters, term.vjp(seed), strict=True):
            g = g.double()
            total[id(p)] = total[id(p)] + g if id(p) in total else g
    return total


def _natural_step(
    columns: Sequence[tuple[int, str, Tensor]], gradient: dict[int, Tensor], basis: Sequence[Any]
) -> Tensor:
    """Δ = −C⁻¹ ∇L per layer over [W, b] (KF8), flat in the columns' order."""
    layers: dict[int, dict[str, Tensor]] = {}
    for k, name, p in columns:
        layers.setdefault(k, {})[name] = p
    pieces: dict[int, Tensor] = {}
    for k, parts in layers.items():
        blocks = []
        if "weight" in parts:
            blocks.append(gradient[id(parts["weight"])])
        if "bias" in parts:
            blocks.append(gradient[id(parts["bias"])].unsqueeze(1))
        step = -apply_inverse(basis[k], torch.cat(blocks, 1))  # KF7
        if "weight" in parts:
            pieces[id(parts["weight"])] = step[:, : parts["weight"].shape[1]]
        if "bias" in parts:
            pieces[id(parts["bias"])] = step[:, -1]
    return torch.cat([pieces[id(p)].flatten() for _, _, p in columns])


def _scaled_jvp(term: ResidualTape, vector: Tensor, order: Sequence[Tensor]) -> Tensor:
    """J̃_t v = √(w / N) ⊙ J_t v in float64 (LS1, RJ3); ``vector`` is flat in ``order``."""
    pieces = dict(zip(map(id, order), vector.split([p.numel() for p in order]), strict=True))
    tangents = [pieces[id(p)].view_as(p).to(p.dtype) for p in term.parameters]
    weight = term.weight.double() if isinstance(term.weight, Tensor) else term.weight
    return term.jvp(tangents).double() * (weight / len(term)) ** 0.5


def _quadratic_model_step(
    terms: Sequence[ResidualTape],
    gradient: dict[int, Tensor],
    step: Tensor,
    previous: Tensor | None,
    damping: float,
) -> tuple[float, float]:
    """(η, μ) of KF9: the minimiser of the damped Gauss–Newton model in the plane of Δ and δ."""
    order = terms[0].parameters
    g = torch.cat([gradient[id(p)].flatten() for p in order])
    used = [t for t in terms if len(t)]
    J_step = [_scaled_jvp(t, step, order) for t in used]
    step_step = sum(float(j.square().sum()) for j in J_step) + damping * float(step.dot(step))
    if previous is None:
        return (-float(g.dot(step)) / step_step if step_step > 0 else 0.0), 0.0
    J_prev = [_scaled_jvp(t, previous, order) for t in used]
    prev_prev = sum(float(j.square().sum()) for j in J_prev) + damping * float(previous.dot(previous))
    step_prev = sum(float(a.dot(b)) for a, b in zip(J_step, J_prev, strict=True)) + damping * float(
        step.dot(previous)
    )
    matrix = torch.tensor([[step_step, step_prev], [step_prev, prev_prev]], dtype=torch.float64)
    right = -torch.stack([g.dot(step), g.dot(previous)])
    determinant = step_step * prev_prev - step_prev**2
    if not determinant > 1e-14 * step_step * prev_prev:  # Δ ∥ δ (or a zero δ): the 1-d model
        return (-float(g.dot(step)) / step_step if step_step > 0 else 0.0), 0.0
    eta, mu = torch.linalg.solve(matrix, right).tolist()
    return eta, mu
