r"""``curvature``: BackPACK's second-order quantities on a BackpropMLP, filled in its one backward.

Inside ``with curvature(model, loss_function, quantities):`` every backward of the model also runs
the δ recursion on K columns (:mod:`torch_backprop.secondorder.recursion`, equations CV1-CV5 and HD1-HD3)
and writes, on every trainable parameter p, the attributes BackPACK's extensions write:

    attribute               value (nn.Linear layout)                         BackPACK extension
    diag_ggn_exact          GGN diagonal, CV3 with the exact S (C columns)   DiagGGNExact
    diag_ggn_exact_batch    per-sample GGN diagonals, CV4, (B, *p.shape)     BatchDiagGGNExact
    diag_ggn_mc             Monte Carlo GGN (Fisher) diagonal, M columns     DiagGGNMC(mc_samples)
    diag_ggn_mc_batch       per-sample Monte Carlo diagonals                 BatchDiagGGNMC(mc_samples)
    kflr                    [G, A] (weight) / [G] (bias), CV5, exact S       KFLR
    kfac                    [G, A] / [G], CV5 with M sampled columns         KFAC(mc_samples)
    diag_h                  Hessian diagonal, HD1-HD3 (adds the σ'' terms)   DiagHessian
    diag_h_batch            per-sample Hessian diagonals                     BatchDiagHessian

The loss side (which losses, their scaling, the draws of the Monte Carlo labels) is
:mod:`torch_backprop.secondorder.loss_hessians`; the GGN-vector product, which needs no backward, is
:func:`torch_backprop.secondorder.products.ggn_vector_product`.

It follows :func:`~torch_backprop.per_sample`'s pattern: the context sets ``model.backward_phase``
to itself, whose ``bind`` makes each forward's phase (with
:func:`~torch_backprop.core.phases.backward_phase`'s signature, bound to the batch shape), and the
ordinary gradients are still computed by the phase it replaced (so a ``per_sample`` block opened
first keeps working inside). Nothing may pass silently:
the loss module's forward hook captures its input and target, the backward checks that the
gradient reaching the output is exactly that loss's, and hooks on the parameters check that their
gradients came through this phase; every mismatch raises before any attribute is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ..core.module import BackpropMLP
from ..core.phases import Tape, backward_phase
from .loss_hessians import LossSpec, loss_rows
from .recursion import Results, Trainable, ggn_quantities, hessian_diagonal, trainable_layers

__all__ = ["QUANTITIES", "Curvature", "curvature"]

EXACT = ("diag_ggn_exact", "diag_ggn_exact_batch", "kflr")
SAMPLED = ("diag_ggn_mc", "diag_ggn_mc_batch", "kfac")
HESSIAN = ("diag_h", "diag_h_batch")
QUANTITIES = EXACT + SAMPLED + HESSIAN
# Relative bound on |∂Q/∂h^(L) - the loss's gradient|: round-off of the softmax or difference
# computed twice (a few ulps, summed over at most a few thousand rows' shared scale).
_ROUND_OFF = {torch.float64: 1e-9, torch.float32: 1e-4}


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
        if isinstance(self.model.backward_phase, Curvature):
            raise RuntimeError("curvature blocks on the same model do not nest")
        self._parameters = [p for p in self.model.parameters()]
        _clear(self._parameters, QUANTITIES)
        self._previous_phase = self.model.backward_phase
        self.model.backward_phase = self  # BackpropMLP.forward calls bind
        self._handles = [
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

    name = "curvature"

    def bind(self, module: nn.Module, input: Tensor) -> Any:
        """The backward phase of one forward call (BackpropMLP calls this in its forward)."""
        previous = self._previous_phase
        if previous is not None and hasattr(previous, "bind"):
            previous = previous.bind(module, input)  # a per_sample block opened first
        if not torch.is_grad_enabled():
            return previous  # no backward will follow
        if self._pending is not None:
            raise RuntimeError(
                "curvature: the model ran forward again before the backward of its previous forward; "
                "inside the block every forward needs its own loss and backward before the next"
            )
        if input.dim() < 2 or input.numel() == 0:
            raise ValueError(
                f"curvature expects a non-empty batch, input (B, *, {module.in_features}), "
                f"got shape {tuple(input.shape)}"
            )
        batch, steps = input.shape[0], math.prod(input.shape[1:-1])
        self._pending = _CurvaturePhase(self, batch, steps, previous)
        return self._pending

    def _check_forward(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        if module.backward_phase is not self or self._pending is None:
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
        _clear(self._parameters, self.quantities)  # nothing of an earlier backward survives a failing one
        self._pending = None
        self._check_loss(phase, tape)
        trainable = trainable_layers(needs_weight, needs_bias)
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
        if output.shape[0] != rows or phase.batch is None or phase.batch * phase.steps != rows:
            raise RuntimeError(
                f"curvature: the backward's {rows} rows do not match the loss's {output.shape[0]}"
            )
        expected = self.loss_spec.gradient(output.to(tape.grad_output.dtype), target.to(output.device))
        error = (tape.grad_output - expected).abs().max()
        bound = _ROUND_OFF.get(tape.grad_output.dtype, 1e-2) * expected.abs().max().clamp(min=1e-30)
        if not bool(error <= bound):  # one synchronisation; the message's .item() only on failure
            error, bound = error.item(), bound.item()
            raise RuntimeError(
                f"curvature: the gradient reaching the model's output is not that of {self.loss_function} "
                f"at the captured target (max deviation {error:.3g}, allowed {bound:.3g}); the loss "
                "must be that module's output alone (no added terms, no scaling, one call per backward)"
            )

    def _compute(self, phase: _CurvaturePhase, tape: Tape, trainable: Trainable) -> Results:
        output = phase.loss[0].to(tape.dtype)
        values: Results = {}
        exact = [name for name in self.quantities if name in EXACT]
        if exact:
            values.update(
                ggn_quantities(tape, self.loss_spec.sqrt_hessian(output), exact, trainable, phase.batch)
            )
        sampled = [name for name in self.quantities if name in SAMPLED]
        if sampled:
            S, self.sampled_targets = self.loss_spec.sqrt_hessian_sampled(
                output, self.mc_samples, self.generator
            )
            values.update(ggn_quantities(tape, S, sampled, trainable, phase.batch))
        hessian = [name for name in self.quantities if name in HESSIAN]
        if hessian:
            S = self.loss_spec.sqrt_hessian(output)
            values.update(hessian_diagonal(tape, S, hessian, trainable, phase.batch))
        return values


def _clear(parameters: Sequence[Tensor], names: Sequence[str]) -> None:
    for param in parameters:
        for name in names:
            if name in param.__dict__:
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
