r"""Curvature from the δ recursion: GGN and Hessian diagonals and Kronecker factors in one backward.

The backward phase (slides 8-10) carries one row δ_n^(l) per sample. Carried with K columns instead,
S_n^(l) (each column a δ), the same recursion gives curvature, as BackPACK computes it module by
module (Dangel et al., 2020), here over the whole stack at once. Notation as in
:class:`~torch_backprop.function.MLPFunction` and :mod:`torch_backprop.losses` (the loss's scale s
and Hessian factor S, ∂²Q/∂h_n^(L)² = S_n S_nᵀ: C exact columns, LS1, or M sampled ones, LS2), plus
    k: column, K columns;  S^(l): (K, N, n_l), the factor carried down to z^(l);
    B samples of T rows each (input (B, T, n_0)), N = B T;  q^(l) := Σ_k (S_k^(l))², (N, n_l).

    CV1  S^(L) = σ'_L(z^(L)) ⊙ S                                       (BP1, per column)
    CV2  S^(l) = σ'_l(z^(l)) ⊙ m^(l) ⊙ (S^(l+1) W^(l)ᵀ)                (BP2, per column)
    CV3  diag_ggn(W^(l)) = Σ_n q_n^(l+1) ⊗ (h_n^(l))² = q^(l+1)ᵀ (h^(l))²   (nn.Linear layout)
         diag_ggn(b^(l)) = Σ_n q_n^(l+1)
    CV4  per sample b: the sums of CV3 over the rows t of sample b only   (``*_batch``, (B, *p.shape))
    CV5  kflr / kfac: G^(l) = Σ_{n,k} S_{k,n}^(l+1) S_{k,n}^(l+1)ᵀ,  A^(l) = (1/N) Σ_n h_n^(l) h_n^(l)ᵀ;
         weight [G, A] (GGN block ≈ G ⊗ A), bias [G]

With the exact S (LS1) CV3 is ``diag_ggn_exact`` and CV5 ``kflr``; with M sampled columns (LS2)
``diag_ggn_mc`` and ``kfac``. The Hessian diagonal (``diag_h``) adds the σ'' terms the GGN drops.
With g^(l) = m^(l) ⊙ δ^(l+1) W^(l)ᵀ (g^(L) = ∂Q/∂h^(L)) and M_n^(l) = ∂²Q/∂z_n^(l)², per row:

    HD1  M^(L) = diag(σ'_L) S Sᵀ diag(σ'_L) + diag(σ''_L ⊙ g^(L))
    HD2  M^(l) = diag(σ'_l ⊙ m) W^(l) M^(l+1) W^(l)ᵀ diag(σ'_l ⊙ m) + diag(σ''_l ⊙ g^(l))
    HD3  M^(l) = Σ_k w_k F_k F_kᵀ: S (weights 1) and, for every σ'' term r^(j) = σ''_j ⊙ g^(j), the
         n_j columns of the identity with weights r^(j), each carried down by CV2;
         diag_h(W^(l)) = d^(l+1)ᵀ (h^(l))²,  d^(l+1) = Σ_k w_k F_k² = diag M^(l+1);  bias Σ_n d^(l+1)

HD1-HD2 hold because Q is a sum of row terms and each row's z^(l+1) is linear in W^(l), so
∂²Q/∂W_ji² = Σ_n (h_{n,i})² (M_n)_jj. Cost over a plain backward: K times its BP2 products for the
diagonals (K = C exact, M sampled), plus one BP3-sized product per layer; the Kronecker factors add
n_{l+1}² and n_l² per row; ``diag_h`` carries n_j more columns from each layer j with σ'' ≠ 0
(none for ReLU, where it equals ``diag_ggn_exact``). The GGN-vector product is
:func:`ggn_vector_product`.

Names, shapes and scaling are BackPACK's (``DiagGGNExact``, ``DiagGGNMC``, ``BatchDiagGGNExact``,
``BatchDiagGGNMC``, ``KFLR``, ``KFAC``, ``DiagHessian``, ``BatchDiagHessian``); see
``docs/curvature.md`` for the differences (T > 1 rows per sample, one shared draw of labels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .activations import zero_second_derivative
from .function import Stack, Tape, backward_phase, deltas, forward_phase, make_tape
from .losses import LossSpec, loss_rows
from .module import BackpropMLP

__all__ = ["QUANTITIES", "Curvature", "curvature", "factors", "ggn_vector_product", "tape_of"]

EXACT = ("diag_ggn_exact", "diag_ggn_exact_batch", "kflr")
SAMPLED = ("diag_ggn_mc", "diag_ggn_mc_batch", "kfac")
HESSIAN = ("diag_h", "diag_h_batch")
QUANTITIES = EXACT + SAMPLED + HESSIAN
_ROUND_OFF = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative, for the loss-gradient check


# ---------------------------------------------------------------------------------------------
# The recursion (CV1-CV2) and what each layer reads from it (CV3-CV5, HD1-HD3).


def factors(tape: Tape, S: Tensor, lowest: int) -> Any:
    """The δ recursion on K columns: yields ``(l, S^(l+1))`` for l = L-1 down to ``lowest``.

    ``S`` (K, N, n_L) is the loss's factor; it is overwritten.
    """
    depth = len(tape.activations)
    S = tape.activations[-1].backprop(S, tape.sigma_prime_from[-1], overwrite=True)  # CV1, (K, N, n_L)
    for k in reversed(range(lowest, depth)):
        yield k, S  # S^(k+1), (K, N, n_{k+1})
        if k == lowest:
            return
        back = S.matmul(tape.weights[k])  # S^(k+1) W^(k)ᵀ, (K, N, n_k)
        if tape.masks[k - 1] is not None:
            back.mul_(tape.masks[k - 1])
        S = tape.activations[k - 1].backprop(back, tape.sigma_prime_from[k - 1], overwrite=True)  # CV2


def _diagonal(d: Tensor, h: Tensor, batch: int, weight: bool, bias: bool, per_sample: bool) -> dict:
    """CV3 (or CV4 with ``per_sample``) from d = diag of M^(l+1) per row (N, n_{l+1}) and h^(l)."""
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
    columns = S.reshape(-1, S.shape[2])
    G = columns.t().mm(columns)  # Σ_{n,k} S S ᵀ, (n_{l+1}, n_{l+1})
    out = {"bias": [G]} if bias else {}
    if weight:
        out["weight"] = [G, h.t().mm(h) / h.shape[0]]  # A = (1/N) Σ_n h hᵀ, (n_l, n_l)
    return out


def _trainable(needs_weight: Sequence[bool], needs_bias: Sequence[bool]) -> list[tuple[int, bool, bool]]:
    """``(l, weight trainable, bias trainable)`` for every layer with a trainable parameter."""
    return [(k, w, b) for k, (w, b) in enumerate(zip(needs_weight, needs_bias, strict=True)) if w or b]


def _ggn(tape: Tape, S: Tensor, names: Sequence[str], trainable: list, batch: int) -> dict:
    """CV3-CV5 for ``names`` (diagonals, per-sample diagonals, Kronecker factors) from one S."""
    results: dict = {}
    wanted = {k: (w, b) for k, w, b in trainable}
    for k, S_k in factors(tape, S, trainable[0][0]):
        if k not in wanted:
            continue
        weight, bias = wanted[k]
        h = tape.h[k]
        q = S_k.square().sum(0) if any("diag" in name for name in names) else None  # q^(k+1), (N, n_{k+1})
        for name in names:
            if name.startswith("diag"):
                value = _diagonal(q, h, batch, weight, bias, per_sample=name.endswith("_batch"))
            else:
                value = _kronecker(S_k, h, weight, bias)
            for kind, tensor in value.items():
                results[(k, kind, name)] = tensor
    return results


def _hessian_diagonal(tape: Tape, S: Tensor, names: Sequence[str], trainable: list, batch: int) -> dict:
    """HD1-HD3: ``diag_h`` / ``diag_h_batch`` from the exact S, the δ^(l) and the σ'' terms."""
    results: dict = {}
    wanted = {k: (w, b) for k, w, b in trainable}
    lowest = trainable[0][0]
    acts, saved = tape.activations, tape.sigma_prime_from
    delta = dict(deltas(tape, lowest))  # δ^(k+1), for g^(k)
    blocks = [(acts[-1].backprop(S, saved[-1], overwrite=True), None)]  # (F, w): CV1 on S, weights 1
    residual = _sigma_second(tape, len(acts) - 1, tape.grad_output)  # σ''_L ⊙ g^(L), (N, n_L) or None
    for k in reversed(range(lowest, len(acts))):
        d = residual.clone() if residual is not None else 0  # HD3: the identity columns' own diagonal
        for F_k, w in blocks:
            F2 = F_k.square()
            d = d + (F2.sum(0) if w is None else torch.einsum("kn,kni->ni", w, F2))  # d^(k+1)
        if k in wanted:
            for name in names:
                value = _diagonal(d, tape.h[k], batch, *wanted[k], per_sample=name.endswith("_batch"))
                for kind, tensor in value.items():
                    results[(k, kind, name)] = tensor
        if k == lowest:
            return results
        W = tape.weights[k]  # (n_{k+1}, n_k)
        blocks = [(_carry(tape, k, F_k.matmul(W)), w) for F_k, w in blocks]  # CV2 on every block
        if residual is not None:  # identity columns of layer k+1: I W^(k)ᵀ is W's rows, every row n
            columns = W.unsqueeze(1).expand(-1, residual.shape[0], -1)  # (n_{k+1}, N, n_k)
            blocks.append((_carry(tape, k, columns), residual.t()))  # CV2; weights r^(k+1), (n_{k+1}, N)
        g = delta[k].mm(W)  # δ^(k+1) W^(k)ᵀ, (N, n_k)
        if tape.masks[k - 1] is not None:
            g = g * tape.masks[k - 1]
        residual = _sigma_second(tape, k - 1, g)  # σ''_k ⊙ g^(k)
    return results


def _carry(tape: Tape, k: int, back: Tensor) -> Tensor:
    """CV2 from ``back`` = F W^(k)ᵀ (K, N, n_k): σ'_k ⊙ m^(k) ⊙ back (into ``back`` where it owns it)."""
    owned = back.is_contiguous()  # an expanded view is not ours to write into
    if tape.masks[k - 1] is not None:
        back, owned = back * tape.masks[k - 1], True
    return tape.activations[k - 1].backprop(back, tape.sigma_prime_from[k - 1], overwrite=owned)


def _sigma_second(tape: Tape, layer: int, g: Tensor) -> Tensor | None:
    """σ''_{layer+1}(z) ⊙ g, or ``None`` where σ'' = 0 (identity, ReLU, leaky ReLU)."""
    act = tape.activations[layer]
    if act.derivative_from == "none" or act.second_derivative is zero_second_derivative:
        return None
    return act.second_derivative(tape.sigma_prime_from[layer]) * g


# ---------------------------------------------------------------------------------------------
# The API: a backward phase that adds curvature, and the context manager that installs it.


class _CurvaturePhase:
    """The curvature backward phase, bound to one forward call: batch shape, output, loss rows."""

    def __init__(self, owner: Curvature, batch: int | None, steps: int | None, previous: Any) -> None:
        self.owner, self.batch, self.steps, self.previous = owner, batch, steps, previous
        self.output: Tensor | None = None
        self.loss: tuple[Tensor, Tensor] | None = None

    def __call__(
        self, tape: Tape, *, needs_x: bool, needs_weight: Sequence[bool], needs_bias: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        return self.owner._backward_phase(
            self, tape, needs_x=needs_x, needs_weight=needs_weight, needs_bias=needs_bias
        )


class Curvature:
    """The context returned by :func:`curvature`; see there.

    Attributes:
        model (BackpropMLP): the model whose backward phase is extended inside the block.
        loss_function (nn.Module): the loss module the block watches.
        quantities (tuple[str, ...]): the attribute names filled on every trainable parameter.
        mc_samples (int): M, labels drawn per row for the Monte Carlo quantities.
        generator (torch.Generator | None): the generator of those draws (``None``: the global one).
        sampled_targets (Tensor | None): the latest backward's draws: classes (M, N) for
            cross-entropy, targets (M, N, C) for MSE; ``None`` without Monte Carlo quantities.
        backward_calls (int): backward calls that went through the block.
    """

    def __init__(
        self,
        model: BackpropMLP,
        loss_function: nn.Module,
        quantities: str | Sequence[str],
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(model, BackpropMLP):
            raise TypeError(
                f"curvature expects a torch_backprop.BackpropMLP, got {type(model).__name__}; "
                "convert an nn.Sequential with BackpropMLP.from_sequential"
            )
        self.loss_spec = LossSpec.from_module(loss_function)
        names = (quantities,) if isinstance(quantities, str) else tuple(quantities)
        unknown = [name for name in names if name not in QUANTITIES]
        if unknown or not names:
            raise ValueError(f"curvature expects quantities among {', '.join(QUANTITIES)}, got {names}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"curvature expects mc_samples to be a positive integer, got {mc_samples!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"curvature expects a torch.Generator or None, got {type(generator).__name__}")
        if any(name in HESSIAN for name in names):
            missing = [
                repr(a)
                for a in model.activations
                if a.derivative_from != "none" and a.second_derivative is None
            ]
            if missing:
                raise ValueError(
                    f"curvature: diag_h needs σ'' of every activation; {', '.join(missing)} has none "
                    "(register it with second_derivative=...)"
                )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("curvature expects a model with at least one trainable parameter, got none")
        self.model, self.loss_function = model, loss_function
        self.quantities, self.mc_samples, self.generator = names, mc_samples, generator
        self.sampled_targets: Tensor | None = None
        self.backward_calls = 0
        self._active, self._pending, self._previous_phase = False, None, None
        self._handles: list[Any] = []
        self._produced: set[str] = set()

    def __enter__(self) -> Curvature:
        if isinstance(self.model.backward_phase, _CurvaturePhase):
            raise RuntimeError("curvature blocks on the same model do not nest")
        _clear(self.model)
        self._previous_phase = self.model.backward_phase
        self._handles = [
            self.model.register_forward_pre_hook(self._bind_forward, with_kwargs=True),
            self.model.register_forward_hook(self._check_forward),
            self.loss_function.register_forward_hook(self._capture_loss),
        ]
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self._handles.append(param.register_hook(lambda grad, name=name: self._check_source(name)))
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.model.backward_phase = self._previous_phase
        if exc_type is None and self._pending is not None:
            raise RuntimeError(
                "curvature: the block closed before the backward of its latest forward; call backward "
                "inside the block (no curvature attributes were written for that forward)"
            )
        if exc_type is None and self.backward_calls == 0:
            raise RuntimeError(
                "curvature: no backward went through the block; run the forward, the loss and the "
                "backward inside it"
            )

    # Hooks ----------------------------------------------------------------------------------

    def _bind_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return None  # no backward will follow
        if self._pending is not None:
            raise RuntimeError(
                "curvature: the model ran forward again before the backward of its previous forward; "
                "inside the block every forward needs its own loss and backward before the next"
            )
        input = args[0] if args else kwargs.get("input")
        if not isinstance(input, Tensor):
            return None  # BackpropMLP.forward raises
        if input.dim() < 2:
            raise ValueError(
                f"curvature expects input with a batch dimension, (B, *, {module.in_features}), "
                f"got shape {tuple(input.shape)}"
            )
        previous = module.backward_phase
        if isinstance(previous, _CurvaturePhase):
            previous = previous.previous
        batch, steps = input.shape[0], math.prod(input.shape[1:-1])
        self._pending = module.backward_phase = _CurvaturePhase(self, batch, steps, previous)
        return None

    def _check_forward(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if module.backward_phase is not self._pending:
            self._pending = None
            raise RuntimeError(
                "curvature: another backward phase replaced the curvature phase during the forward "
                "(a per_sample block opened inside the curvature block?); open per_sample first, "
                "then curvature inside it"
            )
        self._pending.output = output.detach()

    def _capture_loss(self, module: nn.Module, args: tuple[Any, ...], result: Tensor) -> None:
        phase = self._pending
        if phase is None or phase.output is None or len(args) < 2:
            return
        rows = loss_rows(self.loss_spec, args[0], args[1], phase.output)
        if rows is not None:
            phase.loss = rows

    def _check_source(self, name: str) -> None:
        if name not in self._produced:
            raise RuntimeError(
                f"curvature: the gradient of {name} did not come through the curvature phase (was the "
                "forward run before the block, or the backward phase replaced?); run the forward, the "
                "loss and the backward inside the block"
            )
        self._produced.discard(name)

    # The backward phase -----------------------------------------------------------------------

    def _backward_phase(
        self,
        phase: _CurvaturePhase,
        tape: Tape,
        *,
        needs_x: bool,
        needs_weight: Sequence[bool],
        needs_bias: Sequence[bool],
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        if not self._active:
            raise RuntimeError(
                "curvature: backward ran after its with block closed; call it inside the block"
            )
        _clear(self.model)  # nothing from an earlier backward may survive a failing one
        self._pending = None
        self._check_loss(phase, tape)
        trainable = _trainable(needs_weight, needs_bias)
        with torch.no_grad():
            values = self._compute(phase, tape, trainable) if trainable else {}
        grads = (phase.previous or backward_phase)(
            tape, needs_x=needs_x, needs_weight=needs_weight, needs_bias=needs_bias
        )
        layers = self.model.layers
        for (k, kind, name), value in values.items():
            param = getattr(layers[k], kind)
            value = [v.to(param.dtype) for v in value] if isinstance(value, list) else value.to(param.dtype)
            setattr(param, name, value)
        self._produced = {
            f"layers.{k}.{kind}"
            for k in range(len(layers))
            for kind, needed in (("weight", needs_weight[k]), ("bias", needs_bias[k]))
            if needed
        }
        self.backward_calls += 1
        return grads

    def _check_loss(self, phase: _CurvaturePhase, tape: Tape) -> None:
        """Raise unless ∂Q/∂h^(L) reaching the backward is the watched loss's gradient at its target."""
        if phase.loss is None:
            raise RuntimeError(
                f"curvature: the loss module {self.loss_function} was not called on the model's output "
                "(or a reshape of it) before this backward; call that module, not a functional loss, on "
                "the output"
            )
        output, target = phase.loss
        rows = tape.grad_output.shape[0]
        if output.shape[0] != rows or phase.batch * phase.steps != rows:
            raise RuntimeError(
                f"curvature: the backward's {rows} rows do not match the loss's {output.shape[0]}"
            )
        expected = self.loss_spec.gradient(output.to(tape.grad_output.dtype), target.to(output.device))
        error = (tape.grad_output - expected).abs().max().item()
        bound = _ROUND_OFF.get(tape.grad_output.dtype, 1e-2) * max(expected.abs().max().item(), 1e-30)
        if not error <= bound:
            raise RuntimeError(
                f"curvature: the gradient reaching the model's output is not that of {self.loss_function} "
                f"at the captured target (max deviation {error:.3g}, allowed {bound:.3g}); the loss "
                "must be that module's output alone (no added terms, no scaling, one call per backward)"
            )

    def _compute(self, phase: _CurvaturePhase, tape: Tape, trainable: list) -> dict:
        output = phase.loss[0].to(tape.dtype)
        values: dict = {}
        exact = [name for name in self.quantities if name in EXACT]
        if exact:
            values.update(_ggn(tape, self.loss_spec.sqrt_hessian(output), exact, trainable, phase.batch))
        sampled = [name for name in self.quantities if name in SAMPLED]
        if sampled:
            S, self.sampled_targets = self.loss_spec.sqrt_hessian_sampled(
                output, self.mc_samples, self.generator
            )
            values.update(_ggn(tape, S, sampled, trainable, phase.batch))
        hessian = [name for name in self.quantities if name in HESSIAN]
        if hessian:
            S = self.loss_spec.sqrt_hessian(output)
            values.update(_hessian_diagonal(tape, S, hessian, trainable, phase.batch))
        return values


def _clear(model: nn.Module) -> None:
    for param in model.parameters():
        for name in QUANTITIES:
            if hasattr(param, name):
                delattr(param, name)


def curvature(
    model: BackpropMLP,
    loss_function: nn.Module,
    quantities: str | Sequence[str],
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Curvature:
    """Fill BackPACK's second-order attributes on a :class:`BackpropMLP`'s parameters in its one backward.

    Inside the ``with`` block every backward of the model also runs CV1-CV5 / HD1-HD3 (module
    docstring) and writes, on every trainable parameter ``p`` (frozen ones get nothing):

    ====================== ===================================== =====================================
    quantity               value                                 BackPACK extension
    ====================== ===================================== =====================================
    ``diag_ggn_exact``     GGN diagonal, ``p.shape``             ``DiagGGNExact``
    ``diag_ggn_exact_batch`` per-sample GGN diagonals, (B, *)    ``BatchDiagGGNExact``
    ``diag_ggn_mc``        Monte Carlo GGN (Fisher) diagonal     ``DiagGGNMC(mc_samples)``
    ``diag_ggn_mc_batch``  per-sample Monte Carlo diagonals      ``BatchDiagGGNMC(mc_samples)``
    ``kflr``               [G, A] (weight), [G] (bias), exact G  ``KFLR``
    ``kfac``               [G, A] / [G] with sampled G           ``KFAC(mc_samples)``
    ``diag_h``             Hessian diagonal (adds σ'' terms)     ``DiagHessian``
    ``diag_h_batch``       per-sample Hessian diagonals          ``BatchDiagHessian``
    ====================== ===================================== =====================================

    The loss must be ``loss_function`` (``nn.CrossEntropyLoss`` or ``nn.MSELoss``, reduction
    ``"mean"`` or ``"sum"``) called on the model's output, or on ``out.flatten(0, -2)``; the
    backward checks that the gradient reaching the output is exactly that loss's and raises
    otherwise. The ordinary gradients (and, inside a :func:`~torch_backprop.per_sample` block opened
    first, its per-sample results) are computed as usual. Each backward replaces the attributes;
    the Monte Carlo quantities of one backward share one draw (``sampled_targets``).

    Args:
        model: the :class:`BackpropMLP`.
        loss_function: the loss module that will be called on the output inside the block.
        quantities: one name or several, from the table.
        mc_samples: M, labels drawn per row for the Monte Carlo quantities.
        generator: generator of the draws; ``None`` (default) uses the global one, as BackPACK does.

    Returns:
        The :class:`Curvature` context; use it in a ``with`` statement.

    Raises:
        TypeError: not a BackpropMLP, an unsupported loss, a bad generator.
        ValueError: unknown quantities, mc_samples < 1, ``diag_h`` with an activation without σ'',
            no trainable parameter; (at the forward) input without a batch dimension.
        RuntimeError: a block inside a block; a second forward before the backward; a backward not
            through the block's phase, after the block, or whose output gradient is not the loss's.

    Example:
        >>> model, loss_function = BackpropMLP([784, 256, 10]), nn.CrossEntropyLoss()
        >>> x, y = torch.randn(64, 784), torch.randint(10, (64,))
        >>> with curvature(model, loss_function, ["diag_ggn_exact", "kfac"]):
        ...     loss_function(model(x), y).backward()
        >>> model.layers[0].weight.diag_ggn_exact.shape, [f.shape for f in model.layers[1].weight.kfac]
        (torch.Size([256, 784]), [torch.Size([10, 10]), torch.Size([256, 256])])
    """
    return Curvature(model, loss_function, quantities, mc_samples=mc_samples, generator=generator)


# ---------------------------------------------------------------------------------------------
# Without a backward: the tape of a forward, and the GGN-vector product on it.


def tape_of(model: BackpropMLP, input: Tensor) -> tuple[Tensor, Tape]:
    """h^(L) (N, n_L) and the :class:`~torch_backprop.function.Tape` of a forward of ``model``, no autograd.

    Input (*, n_0) is taken as N rows; the tape's ``grad_output`` is a zero placeholder to replace.

    Raises:
        ValueError: the model is in training mode with dropout (a random network has no fixed tape).
    """
    if model.training and model.dropout:
        raise ValueError("curvature: call model.eval() first; a forward with dropout draws a random network")
    x = input.reshape(-1, input.shape[-1])
    depth = len(model.layers)
    stack = Stack(
        [layer.weight for layer in model.layers], [layer.bias for layer in model.layers], [None] * (depth - 1)
    )
    with torch.no_grad():
        forward = forward_phase(x, model.activations, stack)
    h_last = forward[0]
    placeholder = h_last.new_zeros(()).expand_as(h_last)
    return h_last, make_tape(placeholder, x, model.activations, stack, forward, h_last.dtype, False)


def ggn_vector_product(
    model: BackpropMLP, loss_function: nn.Module, input: Tensor, vector: Sequence[Tensor]
) -> list[Tensor]:
    r"""G v, the exact GGN of the loss on ``input`` times ``vector``, without autograd.

    ``vector`` holds one tensor per trainable parameter (BackPACK's ``ggn_vector_product`` layout).
    The GGN does not depend on the targets, so none are taken; rows and scaling as in
    :func:`curvature` (input (B, T, n_0) gives N = B T rows).

        GV1  ż^(l+1) = ḣ^(l) W^(l) + h^(l) V^(l)ᵀ + v_b^(l),  ḣ^(l+1) = σ'_{l+1} ⊙ ż^(l+1),  ḣ^(0) = 0
        GV2  u_n = ∂²Q/∂h_n^(L)² ḣ_n^(L)                                       (LS3)
        GV3  G v = the backward phase BP1-BP4 with ∂Q/∂h^(L) := u

    Raises:
        TypeError, ValueError: a model or loss :func:`curvature` does not take; a vector whose
            shapes are not the trainable parameters'.
    """
    if not isinstance(model, BackpropMLP):
        raise TypeError(
            f"ggn_vector_product expects a torch_backprop.BackpropMLP, got {type(model).__name__}"
        )
    spec = LossSpec.from_module(loss_function, "ggn_vector_product")
    params = [(k, kind, p) for k, layer in enumerate(model.layers) for kind, p in layer.named_parameters()]
    params = [(k, kind, p) for k, kind, p in params if p.requires_grad]
    vector = list(vector)
    shapes = [tuple(p.shape) for _, _, p in params]
    if [tuple(v.shape) for v in vector] != shapes:
        raise ValueError(
            f"ggn_vector_product expects one tensor per trainable parameter with shapes {shapes}, "
            f"got {[tuple(v.shape) for v in vector]}"
        )
    output, tape = tape_of(model, input)
    tangent = {(k, kind): v.to(tape.dtype) for (k, kind, _), v in zip(params, vector, strict=True)}
    with torch.no_grad():
        h_dot = None
        for k, act in enumerate(model.activations):
            z_dot = output.new_zeros(output.shape[0], tape.weights[k].shape[0])
            if h_dot is not None:
                z_dot += h_dot.mm(tape.weights[k].t())  # ḣ^(k) W^(k)
            if (k, "weight") in tangent:
                z_dot += tape.h[k].mm(tangent[k, "weight"].t())  # h^(k) V^(k)ᵀ
            if (k, "bias") in tangent:
                z_dot += tangent[k, "bias"]
            h_dot = act.backprop(z_dot, tape.sigma_prime_from[k])  # GV1
        u = spec.hessian_product(output, h_dot)  # GV2, (N, n_L)
        needs_weight = [(k, "weight") in tangent for k in range(len(model.layers))]
        needs_bias = [(k, "bias") in tangent for k in range(len(model.layers))]
        _, grad_weights, grad_biases = backward_phase(
            tape._replace(grad_output=u), needs_x=False, needs_weight=needs_weight, needs_bias=needs_bias
        )  # GV3
    by_kind = {"weight": grad_weights, "bias": grad_biases}
    return [by_kind[kind][k].to(p.dtype) for k, kind, p in params]
