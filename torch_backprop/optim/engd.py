r"""Energy natural gradient descent (ENGD) for least-squares PDE losses, solved in the smaller space.

Müller & Zeinhofer, "Achieving high accuracy with PINNs via energy natural gradient descent"
(ICML 2023): for a PDE loss L = Σ_t ½ mean_n w_t,n r_t,n² (interior and boundary terms), the
energy natural gradient is the Gauss–Newton step of the stacked least-squares problem
(:mod:`torch_backprop.optim.least_squares`, LS1-LS2), with the Jacobian J̃ of the residuals from
:func:`~torch_backprop.pde.residual.residual_jacobian`. With damping λ:

    EN1  Δ = −(J̃ᵀ J̃ + λ I)⁻¹ J̃ᵀ r̃                     (the Gramian, D × D: when D ≤ N)
    EN2  Δ = −J̃ᵀ (J̃ J̃ᵀ + λ I)⁻¹ r̃                     (the kernel, N × N: when N < D; Woodbury)
    EN3  θ ← θ + u,  u = η Δ + μ u_prev                 (η from the grid line search LS3, or lr)
    EN4  G_t = β G_{t-1} + (1 − β) J̃ᵀ J̃, G_0 = I or 0   (optional: EN1 with G_t for J̃ᵀJ̃)
    EN5  M⁺ = V_k Λ_k⁻¹ V_kᵀ over the eigenvalues λ_i > ε n λ_max of M = G + λI or K + λI (n × n)
         (optional, for EN1/EN2: the minimum-norm step, as ``torch.linalg.lstsq``'s gelsd solves it)

EN1 and EN2 are the same step (the push-through identity (JᵀJ + λI)⁻¹ Jᵀ = Jᵀ (JJᵀ + λI)⁻¹);
each is solved by a Cholesky factorisation in float64, whatever the model's dtype, in the space
of the smaller matrix: O(N D² + D³) or O(N² D + N³) a step. The rla-pinns code of the same
authors (arXiv 2505.12149) solves EN2 the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .least_squares import (
    DEFAULT_GRID,
    check_number,
    grid_line_search,
    lower_gram,
    stacked_system,
    terms_from_closure,
    write_parameters,
)

__all__ = ["ENGD"]

_SPACES = ("auto", "parameters", "residuals")
_SOLVERS = ("cholesky", "pseudo-inverse")
_MAX_DAMPING_RAISES = 40


class ENGD(torch.optim.Optimizer):
    r"""Energy natural gradient descent: the damped Gauss–Newton step of a PDE loss (EN1-EN3).

    The loss is given as residuals, not as a number: ``step(closure)`` calls ``closure()`` once, which
    returns the terms (:func:`~torch_backprop.pde.residual.residual_jacobian` tapes, one per
    interior or boundary term, each with its weight), and the step is solved from their Jacobian.
    The grid line search (``line_search_fn="grid"``, the default, as Müller & Zeinhofer) then
    evaluates the loss along the step by forward passes only, at the tapes' points, and takes the
    step size of the lowest loss; with ``line_search_fn=None`` the step size is ``lr``.

    ``p.grad`` is neither read nor written. All state lives under ``optimizer.state["engd"]``
    (float64 tensors kept as they are by ``load_state_dict``), so resuming is exact:

    * ``step``: the number of steps taken; ``update``: the last update u (flat, float64);
      ``gramian``: the averaged G_t of EN4 (float64; ``None`` without an average);
    * ``loss`` and ``losses``: L before the last step, and each term's part of it;
    * ``lr``: the last step size (0 for a skipped step); ``damping``: the λ the last solve used;
      ``rank``: the eigenvalues the pseudo-inverse kept (``solver="pseudo-inverse"``);
    * ``skipped``: steps left out (no decrease on the grid, or a non-finite step), ``damping_raised``:
      solves whose λ had to be raised for the factorisation.

    Args:
        params: the model's parameters that require grad (exactly the tapes' Jacobian columns).
        lr: the step size when ``line_search_fn`` is ``None``.
        momentum: μ in u = η Δ + μ u_prev (0: none).
        damping: λ ≥ 0 added to the diagonal of the Gramian or the kernel. A factorisation that
            fails (the matrix is not positive definite in float64) is retried with λ raised tenfold
            (from at least 10⁻¹⁵ times the mean diagonal), with one warning per optimiser.
        line_search_fn: ``"grid"`` or ``None``.
        grid: the step sizes the grid line search tries; default 2⁻³⁰, ..., 2⁻¹, 1.
        solve_in: ``"auto"`` (the smaller of the two spaces), ``"parameters"`` (EN1) or
            ``"residuals"`` (EN2).
        solver: ``"cholesky"`` (EN1/EN2 by a Cholesky factorisation) or ``"pseudo-inverse"`` (EN5:
            an eigendecomposition, the eigenvalues at round-off level left out, the minimum-norm step
            the authors' least-squares solve gives; O(n³) with a larger constant). Pair it with
            ``damping=0``: a damping lifts the round-off eigenvalues above the threshold, and the
            step is then the damped one again.
        ema_factor: β of EN4, the moving average of the Gramian over steps (0: none), as the
            KFAC-for-PINNs authors' ``ENGD_ema_factor``; it lives in parameter space, so it makes
            ``"auto"`` solve there.
        initialize_to_identity: start the average from G_0 = I (else 0), their
            ``ENGD_initialize_to_identity``: a strong damping in the first steps that fades as βᵗ.

    Example:
        >>> model = BackpropMLP([2, 32, 1], "tanh", dtype=torch.float64)
        >>> optimizer = ENGD(model.parameters())
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
        line_search_fn: str | None = "grid",
        grid: Sequence[float] | None = None,
        solve_in: str = "auto",
        solver: str = "cholesky",
        ema_factor: float = 0.0,
        initialize_to_identity: bool = False,
    ) -> None:
        check_number("ENGD", "lr", lr, low=0, open_low=True)
        check_number("ENGD", "ema_factor", ema_factor, low=0, high=1, open_high=True)
        if not isinstance(initialize_to_identity, bool):
            raise TypeError(
                f"ENGD expects initialize_to_identity True or False, got {initialize_to_identity!r}"
            )
        check_number("ENGD", "momentum", momentum, low=0, high=1, open_high=True)
        check_number("ENGD", "damping", damping, low=0)
        if line_search_fn not in ("grid", None):
            raise ValueError(f"ENGD expects line_search_fn 'grid' or None, got {line_search_fn!r}")
        grid = DEFAULT_GRID if grid is None else tuple(grid)
        if not grid or not all(isinstance(g, (int, float)) and 0 < g < math.inf for g in grid):
            raise ValueError(f"ENGD expects grid as a non-empty list of finite step sizes > 0, got {grid!r}")
        if solver not in _SOLVERS:
            raise ValueError(f"ENGD expects solver one of {', '.join(_SOLVERS)}, got {solver!r}")
        if solve_in not in _SPACES:
            raise ValueError(f"ENGD expects solve_in one of {', '.join(_SPACES)}, got {solve_in!r}")
        if solve_in == "residuals" and (ema_factor or initialize_to_identity):
            raise ValueError(
                "ENGD averages the D × D Gramian over steps (ema_factor, initialize_to_identity), which "
                "solve_in='residuals' never makes (its kernel is of each step's own points); use "
                "solve_in='parameters' or 'auto'"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            line_search_fn=line_search_fn,
            grid=grid,
            solve_in=solve_in,
            solver=solver,
            ema_factor=ema_factor,
            initialize_to_identity=initialize_to_identity,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "ENGD solves for all parameters at once and takes one parameter group, "
                f"got {len(self.param_groups)}"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; options a saved state predates take this optimiser's."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], object]) -> Tensor:  # type: ignore[override]
        """One ENGD step; returns the loss L before it (a float64 scalar).

        Args:
            closure: returns the loss terms, a :class:`~torch_backprop.pde.residual.ResidualTape` or a
                list of them; called once.

        Raises:
            TypeError: no closure, or one that returns something else (a loss tensor).
            ValueError: terms over other parameters than the optimiser's.
        """
        group = self.param_groups[0]
        with torch.enable_grad():
            terms = terms_from_closure(closure, group["params"], "ENGD")
        state = self.state["engd"]
        if not state:
            state.update(step=0, update=None, gramian=None, skipped=0, damping_raised=0, warned_damping=False)
        params = terms[0].parameters
        jacobian, residual = stacked_system(terms)  # LS1, float64
        losses = [float(0.5 * r.square().sum()) for r in _split_rows(residual, terms)]
        loss = sum(losses)
        state.update(loss=loss, losses=losses)
        state["step"] += 1
        if not math.isfinite(loss):
            return self._skip(state, residual, "the residuals are not finite")
        step = self._solve(jacobian, residual, group, state)
        if step is None:
            return self._skip(state, residual, "the Jacobian is not finite")
        if not bool(torch.isfinite(step).all()):
            return self._skip(state, residual, "the solve gave a non-finite step")
        previous = state["update"]
        origin = [p.detach().clone() for p in params]
        if group["line_search_fn"] == "grid":
            eta, update, _ = grid_line_search(
                terms, params, origin, step, previous, group["momentum"], group["grid"], loss
            )
            if eta == 0:
                state["skipped"] += 1
        else:
            eta = group["lr"]
            update = step * eta  # EN3: η Δ + μ u_prev
            if previous is not None and group["momentum"]:
                update.add_(previous, alpha=group["momentum"])
            write_parameters(params, origin, update)
        state.update(lr=eta, update=update)
        return residual.new_tensor(loss)

    def _solve(
        self, jacobian: Tensor, residual: Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> Tensor:
        """Δ by EN1 or EN2, with λ raised until the Cholesky factorisation succeeds."""
        rows, columns = jacobian.shape
        averaged = group["ema_factor"] > 0 or group["initialize_to_identity"]
        space = group["solve_in"]
        if space == "auto":
            space = "residuals" if rows < columns and not averaged else "parameters"
        if space == "residuals":
            matrix, right = lower_gram(jacobian), residual  # J̃ J̃ᵀ (lower triangle), r̃ (EN2)
        else:
            matrix, right = lower_gram(jacobian.t()), jacobian.t().mv(residual)  # J̃ᵀ J̃, ∇L (EN1)
        # a non-finite entry of J̃ reaches a diagonal entry of the product (a sum of squares)
        if not bool(torch.isfinite(matrix.diagonal()).all()):
            return None
        if averaged:  # EN4: G_t = β G_{t-1} + (1 − β) J̃ᵀJ̃, from G_0 = I or 0
            matrix = matrix.tril_()
            matrix.add_(matrix.tril(-1).t()).mul_(1 - group["ema_factor"])  # made whole, for the next step
            previous = state["gramian"]
            if previous is None and group["initialize_to_identity"]:
                previous = torch.eye(columns, dtype=matrix.dtype)
            if previous is not None:
                matrix.add_(previous, alpha=group["ema_factor"])
            state["gramian"] = matrix
        if group["solver"] == "pseudo-inverse":
            return self._pseudo_inverse(matrix, right, jacobian, space, group, state)
        diagonal = matrix.diagonal()
        damping = group["damping"]
        floor = 1e-15 * float(diagonal.mean()) if diagonal.numel() else 0.0
        for _ in range(_MAX_DAMPING_RAISES):
            factor, info = torch.linalg.cholesky_ex(
                matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype)
            )
            if int(info) == 0:
                break
            raised = max(10 * damping, floor, torch.finfo(matrix.dtype).tiny)
            if not state["warned_damping"]:
                warnings.warn(
                    f"ENGD: the damped {'kernel' if space == 'residuals' else 'Gramian'} is not positive "
                    f"definite in float64 at damping {damping:.1e}; raised to {raised:.1e} for this step "
                    "(said once; optimizer.state['engd']['damping_raised'] counts every such step)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                state["warned_damping"] = True
            state["damping_raised"] += 1 if damping == group["damping"] else 0
            damping = raised
        else:
            return torch.full_like(jacobian[0], math.nan)
        state["damping"] = damping
        solution = torch.cholesky_solve(right.unsqueeze(1), factor).squeeze(1)
        return -(jacobian.t().mv(solution) if space == "residuals" else solution)  # EN2 / EN1

    def _pseudo_inverse(
        self,
        matrix: Tensor,
        right: Tensor,
        jacobian: Tensor,
        space: str,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> Tensor:
        """EN5: the minimum-norm solve by eigendecomposition, eigenvalues below ε n λ_max left out."""
        whole = matrix.tril() + matrix.tril(-1).t()
        whole.diagonal().add_(group["damping"])
        try:
            values, vectors = torch.linalg.eigh(whole)
        except RuntimeError:  # no convergence
            return torch.full_like(jacobian[0], math.nan)
        # lstsq's rule for its rank (gelsd's default rcond): ε times the matrix's size, relative to λ_max
        keep = values > torch.finfo(values.dtype).eps * len(whole) * values.max().clamp_min(0)
        kept = vectors[:, keep]
        solution = kept.mv(kept.t().mv(right) / values[keep])  # (V_k Λ_k⁻¹ V_kᵀ) right
        state.update(damping=group["damping"], rank=int(keep.sum()))
        return -(jacobian.t().mv(solution) if space == "residuals" else solution)  # EN2 / EN1

    def _skip(self, state: dict[str, Any], residual: Tensor, why: str) -> Tensor:
        warnings.warn(
            f"ENGD: {why}; the step is skipped and the parameters are unchanged", RuntimeWarning, stacklevel=3
        )
        state.update(skipped=state["skipped"] + 1, lr=0.0, update=None)
        return residual.new_tensor(state["loss"])


def _split_rows(residual: Tensor, terms: Sequence[Any]) -> list[Tensor]:
    return list(residual.split([len(t) for t in terms]))
