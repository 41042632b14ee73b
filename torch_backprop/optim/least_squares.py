r"""What the optimisers of least-squares PDE losses share: the terms, their stacked system, the line search.

A PDE loss is a sum of terms (:class:`~torch_backprop.pde.residual.ResidualTape`), each
½ mean_n w_n r_n² over its own points. Scaling each term's rows by √(w_n / N_t) makes the loss one
least-squares problem, L = ½ ‖r̃‖², with Jacobian J̃ and gradient ∇L = J̃ᵀ r̃ (LS1-LS2). The
optimisers take the terms from a closure, as ``torch.optim.LBFGS`` does, and this module checks
them, stacks them and runs the grid line search of Müller & Zeinhofer (2023) along a step.

Equations:
    LS1  r̃_t = √(w_t / N_t) ⊙ r_t,   J̃_t = √(w_t / N_t) ⊙ J_t   (rows scaled; stacked over the terms t)
    LS2  L = ½ ‖r̃‖² = Σ_t ½ mean_n w_t,n r_t,n²,   ∇L = J̃ᵀ r̃,   G = J̃ᵀ J̃ (Gauss–Newton)
    LS3  η* = argmin_{η ∈ grid} L(θ + η Δ + μ u_prev): one forward pass per grid point, η* = 0 (no
         step) when none is below L(θ)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..pde.residual import ResidualTape

__all__ = [
    "DEFAULT_GRID",
    "check_number",
    "grid_line_search",
    "lower_gram",
    "stacked_system",
    "terms_from_closure",
    "terms_loss",
]

DEFAULT_GRID = tuple(2.0**-k for k in range(30, -1, -1))
"""The step sizes the grid line search tries: 2⁻³⁰, ..., 2⁻¹, 1 (Müller & Zeinhofer's)."""


def terms_from_closure(
    closure: Callable[[], object] | None, params: Sequence[Tensor], caller: str
) -> list[ResidualTape]:
    """The closure's terms: one :class:`ResidualTape` or a list of them, over exactly ``params``.

    Raises:
        TypeError: no closure, or one that returns anything else (a loss tensor, say).
        ValueError: no terms, or a term whose Jacobian's columns are not the optimiser's parameters.
    """
    if closure is None or not callable(closure):
        raise TypeError(
            f"{caller}.step needs a closure that returns the loss terms "
            "(residual_jacobian(...) tapes), got {type(closure).__name__}"
        )
    result = closure()
    terms = [result] if isinstance(result, ResidualTape) else result
    if not isinstance(terms, (list, tuple)) or not all(isinstance(t, ResidualTape) for t in terms):
        kind = type(result).__name__
        raise TypeError(
            f"{caller}'s closure must return a ResidualTape or a list of them (from residual_jacobian), "
            f"got {kind}; a loss tensor carries no Jacobian"
        )
    if not terms:
        raise ValueError(f"{caller}'s closure returned no terms")
    wanted = {id(p) for p in params}
    for k, term in enumerate(terms):
        have = {id(p) for p in term.parameters}
        if have == wanted and [id(p) for p in term.parameters] != [id(p) for p in terms[0].parameters]:
            raise ValueError(
                f"{caller}'s terms must share one model; term {k}'s parameters are in another order"
            )
        if have != wanted:
            raise ValueError(
                f"{caller} optimises {len(wanted)} parameter tensors, but term {k}'s Jacobian has "
                f"{len(have)} ({len(have - wanted)} not in the optimiser, {len(wanted - have)} missing): "
                "give the optimiser exactly the model's parameters that require grad"
            )
    return list(terms)


def _row_scale(term: ResidualTape, dtype: torch.dtype) -> Tensor:
    """√(w_n / N_t), ``(N_t,)`` (LS1)."""
    count = max(len(term), 1)
    weight = term.weight
    if isinstance(weight, Tensor):
        return (weight.to(dtype) / count).sqrt()
    return term.residual.new_full((len(term),), math.sqrt(weight / count), dtype=dtype)


def stacked_system(
    terms: Sequence[ResidualTape], dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``(J̃, r̃)``: the terms' scaled Jacobians and residuals stacked (LS1), in ``dtype``.

    J̃ is written term by term into one (Σ N_t, D) buffer and scaled in place.
    """
    rows = sum(len(term) for term in terms)
    columns = sum(p.numel() for p in terms[0].parameters)
    jacobian = terms[0].residual.new_empty(rows, columns, dtype=dtype)
    residuals, start = [], 0
    for term in terms:
        scale = _row_scale(term, dtype)
        block = jacobian[start : start + len(term)]
        if term.residual.dtype == dtype:
            term.jacobian(out=block)
        else:
            block.copy_(term.jacobian())
        block.mul_(scale.unsqueeze(1))
        residuals.append(term.residual.to(dtype) * scale)
        start += len(term)
    return jacobian, torch.cat(residuals)


def lower_gram(a: Tensor) -> Tensor:
    """The product a aᵀ of a (n, m), computed only on and below its diagonal blocks (the rest is zero).

    A Cholesky factorisation reads the lower triangle alone, so the rows are taken in blocks and
    each block row is multiplied with the rows above it and its own: about (1 + 1/B)/2 of the full
    product's work for B blocks, as BLAS ``syrk`` would, in torch's own products.
    """
    rows = a.shape[0]
    blocks = min(max(rows // 512, 1), 8)
    if blocks == 1:
        return a.mm(a.t())
    out = a.new_zeros(rows, rows)
    edges = [rows * i // blocks for i in range(blocks + 1)]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        torch.mm(a[low:high], a[:high].t(), out=out[low:high, :high])
    return out


def terms_loss(terms: Sequence[ResidualTape], residuals: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Each term's ½ mean_n w_n r_n² (LS2), of its tape's residuals or of the given ones."""
    if residuals is None:
        return [term.loss() for term in terms]
    return [term.loss(r) for term, r in zip(terms, residuals, strict=True)]


@torch.no_grad()
def grid_line_search(
    terms: Sequence[ResidualTape],
    params: Sequence[Tensor],
    origin: Sequence[Tensor],
    step: Tensor,
    previous: Tensor | None,
    momentum: float,
    grid: Sequence[float],
    loss: float,
) -> tuple[float, Tensor, float]:
    """``(η*, update, loss)`` by LS3; the parameters are left at θ + update (θ itself when η* = 0).

    ``step`` Δ and ``previous`` u_prev are flat (in the terms' column order); ``origin`` is θ, one
    tensor per parameter. A grid point whose loss is not finite never wins; when none is below
    ``loss``, L(θ), the update is zero, with a warning.
    """
    best, best_loss, best_update = 0.0, loss, None
    for eta in grid:
        update = step * eta  # η Δ + μ u_prev
        if previous is not None and momentum:
            update.add_(previous, alpha=momentum)
        write_parameters(params, origin, update)
        value = float(sum(terms_loss(terms, [term.evaluate() for term in terms])))
        if math.isfinite(value) and value < best_loss:
            best, best_loss, best_update = eta, value, update
    if best_update is None:
        write_parameters(params, origin, None)
        warnings.warn(
            f"the grid line search found no step size in [{min(grid):.1e}, {max(grid):.1e}] that lowers "
            f"the loss {loss:.6e}; the step is skipped (step size 0)",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0.0, step.new_zeros(step.shape), loss
    write_parameters(params, origin, best_update)
    return best, best_update, best_loss


def write_parameters(params: Sequence[Tensor], origin: Sequence[Tensor], update: Tensor | None) -> None:
    """θ + update into the parameters (in their own dtype); θ itself for ``None``."""
    with torch.no_grad():
        if update is None:
            for p, p0 in zip(params, origin, strict=True):
                p.copy_(p0)
            return
        for p, p0, u in zip(params, origin, update.split([p.numel() for p in params]), strict=True):
            p.copy_(p0 + u.view_as(p).to(p.dtype))


def check_number(
    caller: str,
    name: str,
    value: float,
    *,
    low: float,
    high: float = math.inf,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """Refuse anything but a finite number within the bounds, naming the caller, option and value."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low:g}" + (
            f" and {'<' if open_high else '<='} {high:g}" if math.isfinite(high) else ""
        )
        raise ValueError(f"{caller} expects {name} to be a finite number {bounds}, got {value!r}")
