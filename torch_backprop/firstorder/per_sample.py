"""Per-sample gradients, norms, clipping and BackPACK's first-order quantities inside the one backward.

:func:`per_sample` opens a block in which a :class:`~torch_backprop.BackpropMLP`'s backward phase
is replaced by one that computes, from the same δ^(l) and h^(l), each sample's gradient, its norm
and its clipped share (equations PS1-PS4, BL, SGS, VAR in :mod:`torch_backprop.firstorder.sample_terms`;
clipping styles CL1-CL4 in :mod:`torch_backprop.firstorder.clipping`). The block owns the bookkeeping that
keeps every result exact or refused: a guard on every trainable parameter checks that the gradient
reaching it is exactly the one the recursion made, and results are published only at the end of
a backward that succeeded.

Conventions follow Opacus: ``p.grad_sample[b]`` is the gradient of sample b's own loss term ℓ_b,
whatever the reduction, norms and the clipping threshold refer to those gradients, and
``batch_first`` says where the sample dimension is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ..core.module import BackpropMLP
from ..core.phases import Tape, deltas, lowest_layer
from . import dp_sgd
from .clipping import AdaptiveClipping, ClippingRule, clipping_rule
from .sample_terms import Layout, SampleTerms, bias_terms, unclipped_gradient, weight_gradient, weight_terms

__all__ = ["PerSample", "per_sample"]

_REDUCTIONS = ("mean", "sum")
_BACKPACK = ("grad_batch", "batch_l2", "sum_grad_squared", "variance")
_run_at_end_of_backward = torch.autograd.Variable._execution_engine.queue_callback


def _trainable_layers(model: BackpropMLP) -> list[tuple[Tensor | None, Tensor | None]]:
    """Each layer's trainable weight and bias (``None`` where frozen or absent)."""
    return [
        tuple(p if p is not None and p.requires_grad else None for p in (layer.weight, layer.bias))
        for layer in model.layers
    ]


class _Bound:
    """The backward phase of one forward call inside a block: the block, and the call's layout."""

    def __init__(self, owner: PerSample, layout: Layout) -> None:
        self.owner, self.layout, self.ran = owner, layout, False
        self.name = owner.name

    def __call__(
        self, tape: Tape, *, needs_x: bool, needs_weight: Sequence[bool], needs_bias: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        return self.owner._backward(self, tape, needs_x, needs_weight, needs_bias)


class _Pending:
    """What one backward inside a block has computed, committed only when the whole backward succeeds."""

    def __init__(self, task: int) -> None:
        self.task = task
        self.produced: dict[Tensor, list[tuple[Tensor, int]]] = {}  # by parameter: (gradient, version)
        self.previous_clean: dict[Tensor, bool] = {}  # was p.grad, before this backward, all clipped?
        self.accumulated: dict[Tensor, tuple[Tensor, int]] = {}  # p.grad after accumulating
        self.grad_sample: dict[Tensor, Tensor] = {}
        self.backpack: dict[Tensor, dict[str, Tensor]] = {}
        self.norms: Tensor | None = None
        self.scale = 1
        self.unclipped = 0  # samples whose norm is within the threshold (adaptive clipping)


class PerSample:
    """Per-sample gradients, norms, clipping and BackPACK's first-order quantities in one backward.

    Inside the ``with`` block the model's backward phase is replaced (``model.backward_phase``; the
    previous one is restored on exit, also on an exception) by one that computes, from the same δ^(l)
    and h^(l), at the end of each backward that succeeds:

    * ``p.grad_sample`` of shape ``[B, *p.shape]`` for every trainable parameter (by default when
      not clipping), where ``p.grad_sample[b]`` is the gradient of sample b's own loss term
      (Opacus's convention: for ``"mean"`` it is B times sample b's share of ``p.grad``);
      ``p.grad`` is the ordinary gradient.
    * with ``max_grad_norm=C``: ``p.grad`` = Σ_b c_b g_b (divided by B for ``"mean"``) with
      c_b = min(1, C / ‖g_b‖) and g_b sample b's gradient over all trainable parameters; no
      ``[B, *p.shape]`` tensor is built (unless ``grad_sample=True``). :func:`~torch_backprop.dp_sgd_step`
      then adds the noise.
    * BackPACK's first-order quantities, by BackPACK's names and scaling (per-sample gradients as
      they enter the loss, γ_b = g_b / B for ``"mean"``): ``grad_batch`` (BatchGrad),
      ``batch_l2`` (BatchL2Grad), ``sum_grad_squared`` (SumGradSquared), ``variance`` (Variance); the
      last three without building ``[B, *p.shape]`` for 2-D input. They describe the latest backward.

    ``ps.norms`` holds the unclipped norms ‖g_b‖. Frozen parameters (``requires_grad=False``) get
    nothing and do not count in the norms. An input gradient, if asked for, is the ordinary one.

    The loss must be a sum (``"sum"``) or a mean (``"mean"``) over the batch of per-sample terms,
    L = Σ_b ℓ_b or (1/B) Σ_b ℓ_b, with ℓ_b depending on sample b alone (cross-entropy or MSE with
    reduction ``"sum"``/``"mean"``). A loss that mixes samples (batch statistics, a contrastive loss)
    makes the results meaningless, and so does a ``loss_reduction`` that is not the loss's; neither
    can be detected from inside the backward. With T rows per sample (input (B, T, n_0)),
    ``"mean"`` means ℓ_b is the mean over its rows, as ``F.cross_entropy(out.flatten(0, 1),
    y.flatten())`` gives (Opacus's convention).

    Each backward in a block is a new set of samples (Opacus's convention for gradient accumulation
    and virtual batches): ``grad_sample`` and ``norms`` are concatenated along the sample
    dimension, each backward's samples are clipped on their own, and ``.grad`` adds up. Everything
    that cannot give exact per-sample results raises instead, before the model's gradients are
    written: a double backward (``create_graph=True``), a forward run before the block, the model
    called twice before one backward, a parameter that also gets gradient from elsewhere, a second
    backward through one forward, layers that carry hooks, torch.func or torch.compile.

    Args:
        model: the :class:`BackpropMLP`.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces its per-sample terms.
        max_grad_norm: the clipping threshold C > 0, a list of thresholds (one per group of the
            clipping style), an :class:`~torch_backprop.AdaptiveClipping`, or ``None`` (default)
            for no clipping.
        clipping: the clipping style, as :mod:`torch_backprop.firstorder.clipping` lists them: ``"flat"``
            (default), ``"per_layer"``, ``"adaptive"`` (Opacus), ``"layer-wise"``, ``"param-wise"``,
            ``"group-wise"`` (fastDP).
        clipping_fn: ``"Abadi"`` (default), c = min(1, C/‖g‖), or ``"automatic"``,
            c = C/(‖g‖ + γ) (fastDP).
        numerical_stability_constant: γ of ``"automatic"``; default 0.01 (fastDP's).
        groups: with ``"group-wise"``: the index of the first layer of each group, starting at 0.
        batch_first: ``True`` (default) if the input is ``(B, *, n_0)``, ``False`` for
            ``(T, B, *, n_0)`` (Opacus's ``batch_first``).
        grad_sample: write ``p.grad_sample``; default: when not clipping.
        grad_batch: write BackPACK's ``grad_batch`` (BatchGrad), γ_b.
        batch_l2: write BackPACK's ``batch_l2`` (BatchL2Grad), ‖γ_b‖² per parameter.
        sum_grad_squared: write BackPACK's ``sum_grad_squared`` (SumGradSquared), Σ_b γ_b ⊙ γ_b.
        variance: write BackPACK's ``variance`` (Variance).

    Use it in a ``with`` statement (``per_sample`` is this class).

    Shape:
        - Input: :math:`(B, *, H_{in})`, or :math:`(T, B, *, H_{in})` with ``batch_first=False``.
        - ``norms``, ``p.batch_l2``: :math:`(B,)`; ``p.grad_sample``, ``p.grad_batch``:
          :math:`(B, *p.shape)`; ``p.sum_grad_squared``, ``p.variance``: ``p.shape``.

    Raises:
        TypeError: ``model`` is not a :class:`BackpropMLP`; ``max_grad_norm`` not a number; a flag
            not a bool.
        ValueError: ``loss_reduction`` not ``"mean"``/``"sum"``; ``max_grad_norm`` ≤ 0; (on
            forward) an input without a sample dimension.
        RuntimeError: blocks nested on one model; backward after the block closed; and each of the
            combinations above that cannot be exact.

    Example:
        >>> model = BackpropMLP([784, 256, 10])
        >>> x, y = torch.randn(64, 784), torch.randint(10, (64,))
        >>> with per_sample(model, loss_reduction="mean") as ps:
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> model.layers[0].weight.grad_sample.shape, ps.norms.shape
        (torch.Size([64, 256, 784]), torch.Size([64]))

    Attributes:
        model (BackpropMLP): the model whose backward is replaced inside the block.
        loss_reduction (str): ``"mean"`` or ``"sum"``.
        max_grad_norm: the clipping threshold(s) as given, or ``None`` for no clipping.
        rule (ClippingRule | None): the clipping style resolved for the model on entry.
        batch_first (bool): whether the sample dimension is the first of the input (else the second).
        norms (Tensor | None): unclipped per-sample gradient norms ‖g_b‖ over all trainable
            parameters, of every sample of every backward in the block, in order (``None`` before one).
    """

    name = "per_sample"

    def __init__(
        self,
        model: BackpropMLP,
        loss_reduction: str = "mean",
        max_grad_norm: float | Sequence[float] | AdaptiveClipping | None = None,
        *,
        clipping: str = "flat",
        clipping_fn: str = "Abadi",
        numerical_stability_constant: float | None = None,
        groups: Sequence[int] | None = None,
        batch_first: bool = True,
        grad_sample: bool | None = None,
        grad_batch: bool = False,
        batch_l2: bool = False,
        sum_grad_squared: bool = False,
        variance: bool = False,
    ) -> None:
        if not isinstance(model, BackpropMLP):
            raise TypeError(
                f"per_sample expects a torch_backprop.BackpropMLP, got {type(model).__name__}; "
                "convert an nn.Sequential with BackpropMLP.from_sequential"
            )
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"per_sample expects loss_reduction 'mean' or 'sum', got {loss_reduction!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, (bool, str))
            or not isinstance(max_grad_norm, (int, float, list, tuple, AdaptiveClipping))
        ):
            raise TypeError(
                "per_sample expects max_grad_norm to be a number, a list of numbers, AdaptiveClipping "
                f"or None, got {type(max_grad_norm).__name__}"
            )
        clip_options = {"clipping": clipping, "groups": groups, "clipping_fn": clipping_fn}
        clip_options["numerical_stability_constant"] = numerical_stability_constant
        if max_grad_norm is not None:
            clipping_rule(max_grad_norm, layers=_trainable_layers(model), **clip_options)  # raises early
        elif clipping != "flat" or groups is not None or clipping_fn != "Abadi":
            raise ValueError(f"per_sample: clipping={clipping!r} needs max_grad_norm")
        flags = {"batch_first": batch_first, "grad_batch": grad_batch, "batch_l2": batch_l2}
        flags |= {"sum_grad_squared": sum_grad_squared, "variance": variance}
        if grad_sample is not None:
            flags["grad_sample"] = grad_sample
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"per_sample expects {flag} to be True or False, got {value!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.max_grad_norm = max_grad_norm
        self._clip_options = clip_options
        self.rule: ClippingRule | None = None
        self.batch_first = batch_first
        self.grad_sample = max_grad_norm is None if grad_sample is None else grad_sample
        self.backpack = tuple(name for name in _BACKPACK if flags[name])
        self.norms: Tensor | None = None
        self._active = False
        self._previous_phase: Any = None
        self._guards: dict[Tensor, tuple[Any, Any]] = {}
        self._names: dict[Tensor, str] = {}
        self._pending: _Pending | None = None

    # -- the block ------------------------------------------------------------------------------

    def __enter__(self) -> PerSample:
        if isinstance(self.model.backward_phase, PerSample):
            raise RuntimeError("per_sample blocks on the same model do not nest")
        if self._active:
            raise RuntimeError("per_sample: this block is already open")
        for param in self.model.parameters():
            for attribute in ("grad_sample", *_BACKPACK):
                if hasattr(param, attribute):
                    delattr(param, attribute)
        self.norms = None
        if self.max_grad_norm is not None:
            self.rule = clipping_rule(
                self.max_grad_norm, layers=_trainable_layers(self.model), **self._clip_options
            )
        self._names = {p: name for name, p in self.model.named_parameters()}
        self._previous_phase = self.model.backward_phase
        self.model.backward_phase = self
        self._active = True
        self._guard()
        return self

    def _guard(self) -> None:
        """Hooks on every trainable parameter: no gradient reaches it in the block unchecked."""
        for param in self.model.parameters():
            if param.requires_grad and param not in self._guards:
                self._guards[param] = (
                    param.register_hook(lambda grad, param=param: self._check(param, grad)),
                    param.register_post_accumulate_grad_hook(self._accumulated),
                )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._active = False
        self._pending = None
        for pre, post in self._guards.values():
            pre.remove()
            post.remove()
        self._guards.clear()
        self.model.backward_phase = self._previous_phase

    def bind(self, model: nn.Module, input: Tensor) -> _Bound:
        """The backward phase of one forward call (BackpropMLP calls this in its forward)."""
        if not self._active:
            raise RuntimeError("per_sample: the block is closed")
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            raise RuntimeError(
                "per_sample cannot run inside torch.func transforms or torch.compile: it writes "
                "per-sample results as a side effect of the backward; call the model eagerly in the block"
            )
        needed = 2 if self.batch_first else 3
        if input.dim() < needed:
            shape = "(B, *, F)" if self.batch_first else "(T, B, *, F) with batch_first=False"
            raise ValueError(
                f"per_sample expects input with a sample dimension, {shape}, got shape {tuple(input.shape)}"
                + ("; for one sample use input.unsqueeze(0)" if self.batch_first else "")
            )
        self._guard()  # a parameter made trainable inside the block is guarded too
        return _Bound(self, Layout(tuple(input.shape[:-1]), 0 if self.batch_first else 1))

    # -- one backward -----------------------------------------------------------------------------

    def _backward(
        self,
        bound: _Bound,
        tape: Tape,
        needs_x: bool,
        needs_weight: Sequence[bool],
        needs_bias: Sequence[bool],
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        if not self._active:
            raise RuntimeError(
                "per_sample: backward ran after its with block closed; call backward inside the block"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "per_sample does not support a double backward (create_graph=True, e.g. a gradient "
                "penalty in the loss): the per-sample gradient of such a loss is not the one the "
                "recursion sees; compute it outside the block"
            )
        if bound.ran:
            raise RuntimeError(
                "per_sample: a second backward through the same forward call (retain_graph=True); "
                "each backward in a block is a new set of samples, so add the losses and call "
                "backward once"
            )
        layout = bound.layout
        rows = tape.grad_output.shape[0]
        if rows != math.prod(layout.lead):
            raise RuntimeError(
                f"per_sample: the backward's {rows} rows do not match the input's {layout.lead}"
            )
        bound.ran = True
        pending = self._pending_for_this_backward()
        depth = len(tape.activations)
        grad_x, grad_weights, grad_biases = None, [None] * depth, [None] * depth
        lowest = lowest_layer(needs_x, needs_weight, needs_bias)
        delta = dict(deltas(tape, lowest))  # δ^(l+1) of every layer first: clipping needs all norms
        h = tape.h
        scale = layout.batch if self.loss_reduction == "mean" else 1
        backpack = self.backpack
        sum_squared = "sum_grad_squared" in backpack or "variance" in backpack
        samples = self.grad_sample or "grad_batch" in backpack
        layers = self.model.layers
        params = {}  # (k, "weight" | "bias") -> parameter, for the trainable ones
        terms: dict[Tensor, SampleTerms] = {}
        for k in delta:
            if needs_weight[k]:
                params[k, "weight"] = layers[k].weight
                terms[layers[k].weight] = weight_terms(delta[k], h[k], layout, samples, sum_squared)
            if needs_bias[k]:
                params[k, "bias"] = layers[k].bias
                terms[layers[k].bias] = bias_terms(delta[k], layout, samples, sum_squared)
        norm_dtype = torch.promote_types(tape.dtype, torch.float32)
        squared_norms = torch.zeros(layout.batch, dtype=norm_dtype, device=tape.grad_output.device)
        for layer in terms.values():
            squared_norms += layer.squared_norms
        norms = squared_norms.clamp(min=0).sqrt() * scale  # ‖g_b‖, PS2

        rows: dict[Tensor, Tensor] = {}  # parameter -> c_{b,g} repeated over t, (N, 1), when clipping
        if self.rule is not None:
            for g, part in enumerate(self.rule.groups):
                trained = [p for p in part if p in terms]
                if not trained:
                    continue
                group_norms = torch.stack([terms[p].squared_norms for p in trained]).sum(0).sqrt() * scale
                factor = self.rule.factors(group_norms, g)  # CL1 / CL2, (B,)
                factor_rows = layout.each_row(factor.to(tape.dtype))[:, None]
                rows |= dict.fromkeys(trained, factor_rows)
                if self.rule.adaptive is not None:
                    pending.unclipped += int((group_norms <= self.rule.thresholds[g]).sum())
            stray = [self._names.get(p, "?") for p in terms if p not in rows]
            if stray:
                raise RuntimeError(
                    f"per_sample: {', '.join(stray)} became trainable after the block was entered, so its "
                    "clipping group is unknown; set requires_grad before entering the block"
                )
        for (k, kind), param in params.items():
            factor_rows = rows.get(param)
            if kind == "weight":
                grad = weight_gradient(delta[k], h[k], factor_rows)  # BP3, or PS4 when clipping
                grad_weights[k] = grad = grad.to(param.dtype)
            else:
                grad = (
                    delta[k].sum(0) if factor_rows is None else delta[k].t().mv(factor_rows[:, 0])
                )  # BP4/PS4
                grad_biases[k] = grad = grad.to(param.dtype)
            pending.produced.setdefault(param, []).append((grad, grad._version))
            layer = terms[param]
            if self.grad_sample:
                pending.grad_sample[param] = (layer.samples * scale).to(param.dtype)  # PS1
            quantities = {}
            if "grad_batch" in backpack:
                quantities["grad_batch"] = layer.samples  # γ_b
            if "batch_l2" in backpack:
                quantities["batch_l2"] = layer.squared_norms  # BL
            if "sum_grad_squared" in backpack:
                quantities["sum_grad_squared"] = layer.sum_squared  # SGS
            if "variance" in backpack:
                total = grad if factor_rows is None else unclipped_gradient(delta[k], h[k], kind)  # Σ_b γ_b
                quantities["variance"] = (
                    layer.sum_squared / layout.batch - (total / layout.batch).square()
                )  # VAR
            pending.backpack[param] = {name: q.to(param.dtype) for name, q in quantities.items()}
        pending.norms = norms.detach()
        pending.scale = scale
        if needs_x:
            grad_x = delta[0].mm(tape.weights[0]).to(tape.h[0].dtype)  # BP5, unclipped
        return grad_x, grad_weights, grad_biases

    def _pending_for_this_backward(self) -> _Pending:
        task = torch._C._current_graph_task_id()
        if self._pending is not None and self._pending.task == task:
            return self._pending  # a second forward call in this backward: _check refuses it
        self._pending = _Pending(task)
        _run_at_end_of_backward(self._commit)
        return self._pending

    def _check(self, param: Tensor, grad: Tensor) -> None:
        """Before ``param``'s gradient is accumulated: it must be exactly the one the recursion made."""
        pending = self._pending
        if pending is not None and pending.task != torch._C._current_graph_task_id():
            pending = None
        produced = pending.produced.pop(param, None) if pending is not None else None
        name = self._names.get(param, "a parameter")
        if produced is None:
            raise RuntimeError(
                f"per_sample: a gradient reached {name} without passing through the per-sample "
                "backward: the forward ran before the block was entered, or the parameter is used "
                "outside this BackpropMLP; run the forward inside the block (no gradient of the "
                "model was written)"
            )
        if len(produced) > 1:
            raise RuntimeError(
                f"per_sample: this backward goes through {len(produced)} forward calls of the model; "
                "per-sample gradients need one forward per backward: concatenate the inputs into one "
                "batch, or call backward once per forward (no gradient of the model was written)"
            )
        ours, version = produced[0]
        if grad is not ours or grad._version != version:
            raise RuntimeError(
                f"per_sample: {name} also receives gradient from outside the per-sample backward "
                "(weight sharing, or another use of the parameter in the loss), so its per-sample "
                "gradients would be wrong; the gradients of this backward are incomplete: zero them"
            )
        pending.previous_clean[param] = dp_sgd.holds_only_clipped(param)

    def _accumulated(self, param: Tensor) -> None:
        """After ``param``'s gradient is accumulated: remember what ``.grad`` now holds."""
        if self._pending is not None and param.grad is not None:
            self._pending.accumulated[param] = (param.grad, param.grad._version)

    def _commit(self) -> None:
        """At the end of a backward that went through without error: publish what it computed."""
        pending, self._pending = self._pending, None
        if pending is None or not self._active:
            return
        for param, g in pending.grad_sample.items():
            previous = getattr(param, "grad_sample", None)
            param.grad_sample = g if previous is None else torch.cat([previous, g])
        for param, quantities in pending.backpack.items():
            for name, value in quantities.items():
                setattr(param, name, value)
        if pending.norms is not None:
            self.norms = pending.norms if self.norms is None else torch.cat([self.norms, pending.norms])
        if self.rule is not None:
            samples = 0 if pending.norms is None else pending.norms.shape[0]
            for param, (grad, version) in pending.accumulated.items():
                dp_sgd.record_clipped(
                    param,
                    grad,
                    version,
                    clean=pending.previous_clean.get(param, False),
                    rule=self.rule,
                    loss_reduction=self.loss_reduction,
                    samples=samples,
                    unclipped=pending.unclipped,
                    scale=pending.scale,
                )


per_sample = PerSample  # the name users call, in the manner of torch.no_grad
