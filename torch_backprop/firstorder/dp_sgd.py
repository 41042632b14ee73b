r"""The DP-SGD step after one-pass clipping: noise the clipped sum once, average, step.

:func:`~torch_backprop.per_sample` with ``max_grad_norm=C`` leaves in ``p.grad`` the clipped sum
S = Σ_b c_b g_b of each backward's samples (S / B for ``"mean"``). :func:`dp_sgd_step` turns it into
the DP-SGD update of Abadi et al. (2016), with Opacus's ``DPOptimizer`` semantics:

    DP1  ``"sum"``:  p.grad = S + N(0, (σ C)² I)
    DP2  ``"mean"``: p.grad = (S + N(0, (σ C)² I)) / batch_size     (batch_size: expected, logical)

A privacy guarantee that does not hold is the worst bug this package can have, so the step refuses
(and names the parameters) unless every trainable parameter's ``.grad`` is exactly what clipping
left in it: each clipped backward records, per parameter, which tensor ``.grad`` then was and its
version counter; anything that touches ``.grad`` afterwards (an unclipped backward, an in-place
change, DDP's averaging) breaks the match. The refusal says which cause it saw, each with its fix:
gradients already there before the clipped backward (not zeroed), changed after it, a second step
on the same gradients, no clipped backward at all, sums clipped by different rules, or a
threshold other than the block's. Under ``torch.distributed`` the clipped sums of all
processes are added and the noise is drawn once, on rank 0 (as Opacus's ``DistributedDPOptimizer``
does), so every process takes the same step as one process would on the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .clipping import AdaptiveClipping, ClippingRule
from .noise import GaussianNoise

__all__ = ["dp_sgd_step"]


@dataclass
class _Clipped:
    """What clipping left in one parameter's ``.grad``."""

    grad: Tensor  # the tensor ``.grad`` was
    version: int  # and its version counter
    rule: ClippingRule  # the groups and thresholds it was clipped by
    loss_reduction: str  # the block's
    samples: int  # samples clipped into it
    unclipped: int  # of which within their threshold (adaptive clipping counts them)
    scales: set[int] = field(default_factory=set)  # s per backward: S = s * .grad when all equal


@dataclass
class _Refused:
    """Why a parameter's ``.grad`` is not a clipped sum, seen when it happened.

    ``cause``: ``"stale"`` (``.grad`` held an unclipped gradient before a clipped backward added to
    it), ``"rules"`` (two clipped sums by different rules or reductions), ``"stepped"`` (``grad`` at
    ``version`` is what :func:`dp_sgd_step` left after noising it and stepping).
    """

    cause: str
    grad: Tensor | None = None
    version: int = -1


_records: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> _Clipped | _Refused


def _matches(param: Tensor) -> _Clipped | None:
    record = _records.get(param)
    grad = param.grad
    if (
        not isinstance(record, _Clipped)
        or grad is None
        or grad is not record.grad
        or grad._version != record.version
    ):
        return None
    return record


def holds_only_clipped(param: Tensor) -> bool:
    """Whether ``param.grad`` is nothing, zeros, or exactly what clipping left there."""
    return param.grad is None or _matches(param) is not None or not bool(param.grad.any())


def record_clipped(
    param: Tensor,
    grad: Tensor,
    version: int,
    *,
    clean: bool,
    rule: ClippingRule,
    loss_reduction: str,
    samples: int,
    unclipped: int,
    scale: int,
) -> None:
    """Remember what a clipped backward left in ``param.grad``: ``grad`` at ``version``.

    ``clean``: ``param.grad`` held nothing unclipped before it. Called by
    :class:`~torch_backprop.firstorder.per_sample.PerSample` at the end of each clipped backward.
    """
    previous = _records.pop(param, None)
    if not clean:  # an unclipped gradient, or a stepped one, was there before this backward added to it
        _records[param] = _Refused("stale")
        return
    if not isinstance(previous, _Clipped) or previous.grad is not grad:  # .grad was None or zero: a fresh sum
        _records[param] = _Clipped(grad, version, rule, loss_reduction, samples, unclipped, {scale})
    elif previous.rule.spec() == rule.spec() and previous.loss_reduction == loss_reduction:
        _records[param] = _Clipped(
            grad,
            version,
            rule,
            loss_reduction,
            previous.samples + samples,
            previous.unclipped + unclipped,
            previous.scales | {scale},
        )
    else:  # sums clipped by different rules have no single sensitivity
        _records[param] = _Refused("rules")


def dp_sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float | Sequence[float] | AdaptiveClipping | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | GaussianNoise | None = None,
    *,
    loss_reduction: str | None = None,
) -> None:
    r"""A DP-SGD step: add Gaussian noise to the clipped sum once, average (``"mean"``), step.

    Call it after the backward(s) inside ``per_sample(model, loss_reduction, max_grad_norm=C)``:
    ``p.grad`` then holds S = Σ_b c_b g_b (``"sum"``) or S / B (``"mean"``) for every trainable
    parameter. It sets, as Opacus's ``DPOptimizer`` does, ``p.grad = S + N(0, (σC)² I)`` for
    ``"sum"`` and ``p.grad = (S + N(0, (σC)² I)) / batch_size`` for ``"mean"``, then calls
    ``optimizer.step()``. Zeroing the gradients stays the caller's job.

    Several backward calls in one block (gradient accumulation, virtual batches) are one logical
    batch: their clipped sums add up and the noise is added once. Under ``torch.distributed``
    (e.g. ``torchrun``) call it on every process: the clipped sums are summed over processes and
    the noise is drawn on rank 0 only, so all processes take the same step; run the backward under
    ``DistributedDataParallel.no_sync()`` (or without DDP), since DDP's own averaging changes the
    clipped gradients.

    Privacy accounting: each step is a subsampled Gaussian mechanism with noise multiplier σ and
    sample rate q = (expected logical batch size) / dataset size. Account it with an existing
    accountant, e.g. Opacus's RDP accountant::

        from opacus.accountants import RDPAccountant
        accountant = RDPAccountant()
        accountant.step(noise_multiplier=sigma, sample_rate=batch_size / len(dataset))  # every step
        epsilon = accountant.get_epsilon(delta=1e-5)

    The RDP analysis assumes Poisson sampling (each sample in each batch independently with
    probability q); with shuffled fixed-size batches the figure is the customary approximation.

    Args:
        model: the model whose parameters ``optimizer`` updates; every trainable parameter's
            gradient must come from the clipped backward(s) of one ``per_sample`` block.
        optimizer: any ``torch.optim`` optimizer over those parameters.
        noise_multiplier: σ ≥ 0; the noise's standard deviation is σ C on the clipped sum.
        max_grad_norm: C, the threshold the gradients were clipped to (checked).
        batch_size: for ``"mean"``: the expected size of the logical batch (all samples of all
            backward calls since the gradients were zeroed, on all processes); unused for ``"sum"``.
        generator: where the noise comes from: a :class:`~torch_backprop.firstorder.noise.GaussianNoise`
            over the trainable parameters (seeded, reproducible, drawn ahead of time, or from the
            operating system's CSPRNG with ``secure=True``); a ``torch.Generator`` on the
            parameters' device (``torch.randn`` per parameter, as Opacus's ``DPOptimizer`` draws);
            ``None`` for the global generator.
        loss_reduction: how the update aggregates the noisy sum, as Opacus's ``DPOptimizer``'s:
            ``"mean"`` (divide by ``batch_size``) or ``"sum"``; ``None`` (default) for the block's.
            The clipped sum S is recovered exactly whichever reduction the block's loss used.

    Raises:
        ValueError: σ < 0 or not finite, C ≤ 0, a missing or non-positive batch size for
            ``"mean"``, an unknown ``loss_reduction``, or a ``GaussianNoise`` made for other
            parameters (shapes, dtypes or devices).
        RuntimeError: a trainable parameter whose gradient is not exactly the clipped sum of one
            ``per_sample`` block, the message saying which cause it saw and its fix: gradients
            already there before the clipped backward (no ``zero_grad()`` before it), changed after
            it (an unclipped backward, an in-place change, DDP's averaging), a second step on the
            same gradients, no clipped backward (or no gradient) at all, sums clipped by different
            rules or blocks; a threshold other than the block's.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"dp_sgd_step expects a finite noise_multiplier >= 0, got {noise_multiplier}")
    if isinstance(max_grad_norm, (int, float)) and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"dp_sgd_step expects a finite max_grad_norm > 0, got {max_grad_norm}")
    if loss_reduction not in (None, "mean", "sum"):
        raise ValueError(f"dp_sgd_step expects loss_reduction 'mean', 'sum' or None, got {loss_reduction!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
    ):
        raise ValueError(f"dp_sgd_step expects a positive integer batch_size, got {batch_size!r}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if isinstance(generator, GaussianNoise):
        _check_noise(generator, named)
    problem = _check(named, max_grad_norm, loss_reduction, batch_size)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and named:  # every process must fail together, or the others wait for it forever
        failed = torch.tensor([1.0 if problem else 0.0], device=named[0][1].device)
        dist.all_reduce(failed)
        if failed.item() and not problem:
            problem = "another process's gradients failed this check (see its error)"
    if problem:
        raise RuntimeError(f"dp_sgd_step: {problem}")
    if not named:
        optimizer.step()
        return
    first = _records[named[0][1]]
    rule, reduction = first.rule, loss_reduction or first.loss_reduction
    adaptive = rule.adaptive
    multiplier = (
        noise_multiplier if adaptive is None else adaptive.gradient_noise_multiplier(noise_multiplier)
    )
    std = multiplier * rule.sensitivity  # σ Δ, CL4
    noisy = not distributed or dist.get_rank() == 0  # the noise is drawn once, on rank 0
    average = 1 / batch_size if reduction == "mean" else 1  # DP2 or DP1
    drawn = generator.draw() if noisy and isinstance(generator, GaussianNoise) else None
    with torch.no_grad():  # in place, as clip_grad_norm_ does: S · average + N(0, (σΔ · average)²)
        grads = []
        for index, (_, param) in enumerate(named):
            (scale,) = _records[param].scales
            grad = param.grad  # S / scale
            if drawn is not None:
                noise = drawn[index]
            elif noisy:  # drawn before .grad changes: a generator on another device fails with .grad intact
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)
            else:
                noise = None
            if scale * average != 1:
                grad.mul_(scale * average)
            if noise is not None:
                grad.add_(noise, alpha=std * average)
            grads.append(grad)
        for _, param in named:  # a second step on these gradients is refused, and says so
            _records[param] = _Refused("stepped", param.grad, param.grad._version)
        counts = torch.tensor([float(first.unclipped), float(first.samples)], dtype=torch.float64)
        if adaptive is not None and noisy:
            counts[0] += adaptive.unclipped_num_std * (
                generator.scalar()
                if isinstance(generator, GaussianNoise)
                else torch.randn((), generator=generator, dtype=torch.float64)
            )
        if distributed:  # Σ over processes (the noise from rank 0 only), in one reduction; linear in S
            flat = torch.cat([grad.flatten() for grad in grads])
            dist.all_reduce(flat)
            for piece, grad in zip(flat.split([g.numel() for g in grads]), grads, strict=True):
                grad.copy_(piece.view_as(grad))
            if adaptive is not None:
                counts = counts.to(flat.device)
                dist.all_reduce(counts)
                counts = counts.cpu()
    if adaptive is not None:
        adaptive.update(counts[0].item(), int(counts[1].item()))
    optimizer.step()


def _check_noise(noise: GaussianNoise, named: list[tuple[str, Tensor]]) -> None:
    """Refuse a ``GaussianNoise`` made for other parameters than the trainable ones of ``named``."""
    given = list(zip(noise.shapes, noise.dtypes, noise.devices, strict=True))
    expected = [(p.shape, p.dtype, p.device) for _, p in named]
    if given != expected:
        raise ValueError(
            "dp_sgd_step expects a GaussianNoise over the trainable parameters, in order: "
            f"[{_describe(expected)}], got one over [{_describe(given)}]"
        )


def _describe(layout: list[tuple[torch.Size, torch.dtype, torch.device]]) -> str:
    return ", ".join(
        f"{tuple(shape)} {str(dtype).removeprefix('torch.')} {device}" for shape, dtype, device in layout
    )


def _check(
    named: list[tuple[str, Tensor]], max_grad_norm: Any, loss_reduction: str | None, batch_size: int | None
) -> str | None:
    """Why the gradients of ``named`` are not one block's clipped sums, or ``None`` if they are."""
    causes: dict[str, list[str]] = {}
    for name, param in named:
        if _matches(param) is None:
            causes.setdefault(_cause(param), []).append(name)
    if causes:
        found = "; ".join(
            f"the gradients of {', '.join(names)} {_CAUSES[cause]}" for cause, names in causes.items()
        )
        return f".grad is not the clipped sum of one per_sample block: {found}"
    records = [_records[param] for _, param in named]
    trainable = {id(param) for _, param in named}
    for record in records:
        covered = {id(p) for part in record.rule.groups for p in part}
        if covered != trainable or record.rule.spec() != records[0].rule.spec():
            return (
                "the gradients were clipped by separate per_sample blocks (or rules), so no single "
                "sensitivity bounds a sample's whole gradient; clip every trainable parameter in one block"
            )
    rule = records[0].rule
    if max_grad_norm is not None and not rule.given_as(max_grad_norm):
        return (
            f"the gradients were clipped with max_grad_norm={rule.given!r}, not {max_grad_norm!r}: the "
            f"noise must match the threshold they were clipped to; pass max_grad_norm={rule.given!r}, "
            f"or clip with {max_grad_norm!r}"
        )
    if (loss_reduction or records[0].loss_reduction) == "mean" and batch_size is None:
        return "loss_reduction 'mean' needs batch_size, the expected logical batch size to average by"
    scales = set().union(*(record.scales for record in records))
    if len(scales) > 1:
        return (
            f"with loss_reduction 'mean', backward calls over batches of {sorted(scales)} samples "
            "left means over different sizes in .grad, so the clipped sum cannot be recovered; "
            "use loss_reduction='sum'"
        )
    return None


_CAUSES = {
    "stale": (
        "were not zeroed before the clipped backward (an earlier backward's, or the last step's, were "
        "still there), so .grad holds more than the clipped sum: call optimizer.zero_grad() before the "
        "per_sample block"
    ),
    "changed": (
        "changed after the clipped backward (an unclipped backward, an in-place change of .grad, or "
        "DDP's averaging): call dp_sgd_step right after the clipped backward (under DDP, run it in "
        "no_sync())"
    ),
    "stepped": (
        "were already noised and stepped on by dp_sgd_step: a second step on the same gradients is not "
        "a new private step; call optimizer.zero_grad() and run a new clipped backward first"
    ),
    "rules": (
        "were clipped by per_sample blocks with different rules or reductions, so no single sensitivity "
        "bounds their sum: clip every backward of the logical batch with the same per_sample options"
    ),
    "unclipped": (
        "got no clipped backward (they are outside the per_sample block's model, or the backward ran "
        "outside the block): run the forward and backward of every trainable parameter inside "
        "per_sample(model, max_grad_norm=...)"
    ),
    "absent": (
        "are None (no backward reached them): run the forward and backward of every trainable "
        "parameter inside per_sample(model, max_grad_norm=...), or set requires_grad=False on them"
    ),
}


def _cause(param: Tensor) -> str:
    """Which of :data:`_CAUSES` keeps ``param.grad`` from being one block's clipped sum."""
    record, grad = _records.get(param), param.grad
    if grad is None:
        return "absent"
    if isinstance(record, _Refused):
        if record.cause == "stepped" and (grad is not record.grad or grad._version != record.version):
            return "stale"  # the last step's gradients, added to or changed since
        return record.cause
    if isinstance(record, _Clipped):
        return "changed"
    return "unclipped"
