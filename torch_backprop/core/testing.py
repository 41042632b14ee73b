"""Check any model's gradients against a reference: ``compare_gradients`` and ``assert_gradients_match``.

Typical use: ``assert_gradients_match(model, model.to_sequential(), x)``, i.e. BackpropMLP against
native autograd on its twin with identical weights; but any two modules with parameters of the
same shapes, in the same order, can be compared.

This module owns the package's checking conventions, which ``torch-backprop verify`` uses too: the
seeded loss (:func:`seeded_loss`), the default tolerances per dtype (:func:`tolerances`) and the
error table (:func:`format_table`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "GradientError",
    "assert_gradients_match",
    "compare_gradients",
    "error_table",
    "format_table",
    "seeded_loss",
    "tolerances",
]


@dataclass(frozen=True)
class GradientError:
    """How far one tensor of ``model`` is from the reference's.

    Attributes:
        name: ``"output"``, ``"input[i]"`` or the model's parameter name.
        max_abs: max |model - reference|.
        max_rel: max |model - reference| / |reference| over the entries where reference ≠ 0.
        shape: the tensor's shape.
        scale: max |reference|, so that ``max_abs / scale`` is the error relative to the tensor's size
            (elementwise ``max_rel`` is large wherever the reference is nearly 0).
    """

    name: str
    max_abs: float
    max_rel: float
    shape: tuple[int, ...]
    scale: float = 0.0


def seeded_loss(seed: int = 0) -> Callable[[Tensor], Tensor]:
    """Q(h) = Σ h ⊙ R, R fixed and random (from ``seed``): every entry of every gradient is exercised."""

    def loss(output: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
        return (output * weights.to(output.device, output.dtype)).sum()

    return loss


_seeded_loss = seeded_loss(0)

# torch.testing.assert_close's defaults per dtype.
_DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def tolerances(
    dtype: torch.dtype, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float]:
    """``(rtol, atol)``: those given, and ``torch.testing.assert_close``'s default for ``dtype`` for each not.

    Dtypes without a default of their own get float32's.
    """
    default_rtol, default_atol = _DEFAULT_TOLERANCES.get(dtype, _DEFAULT_TOLERANCES[torch.float32])
    return (default_rtol if rtol is None else rtol, default_atol if atol is None else atol)


def _errors(name: str, actual: Tensor, expected: Tensor) -> GradientError:
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs()
    nonzero = scale > 0
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = (diff[nonzero] / scale[nonzero]).max().item() if nonzero.any() else 0.0
    scale_max = scale.max().item() if scale.numel() else 0.0
    return GradientError(name, max_abs, max_rel, tuple(actual.shape), scale_max)


def _gradient_pairs(
    model: nn.Module, reference: nn.Module, inputs: tuple[Tensor, ...], loss_fn: Callable[[Tensor], Tensor]
) -> list[tuple[str, Tensor, Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    if len(named) != len(ref_params):
        raise ValueError(f"model has {len(named)} trainable parameters but reference has {len(ref_params)}")
    results = []
    for module, params in ((model, [p for _, p in named]), (reference, ref_params)):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        output = module(*xs)
        wrt = [x for x in xs if x.requires_grad] + params
        grads = torch.autograd.grad(loss_fn(output), wrt, allow_unused=True) if wrt else ()
        results.append([output.detach(), *grads])
    names = (
        ["output"] + [f"input[{i}]" for i, x in enumerate(inputs) if x.requires_grad] + [n for n, _ in named]
    )
    pairs = []
    for name, actual, expected in zip(names, *results, strict=True):
        if (actual is None) != (expected is None):
            raise ValueError(f"{name}: one side has no gradient")
        if actual is not None:
            if actual.shape != expected.shape:
                raise ValueError(
                    f"{name}: shape {tuple(actual.shape)} differs from the reference's "
                    f"{tuple(expected.shape)}"
                )
            pairs.append((name, actual, expected))
    return pairs


def compare_gradients(
    model: nn.Module,
    reference: nn.Module,
    *inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor] = _seeded_loss,
) -> list[GradientError]:
    """Run both modules on ``inputs``, backpropagate ``loss_fn(output)``, and measure the differences.

    Inputs that require grad are compared too. Existing ``.grad`` fields are left untouched
    (gradients are taken with ``torch.autograd.grad``).

    Args:
        model: the module under test.
        reference: a module with parameters of the same shapes in the same order (e.g.
            ``model.to_sequential()``).
        *inputs: the inputs, passed to both (each module gets its own copy).
        loss_fn: a scalar function of the output; default: a sum weighted by fixed random numbers.

    Returns:
        One :class:`GradientError` for the output, each input that requires grad, and each
        parameter of ``model`` that requires grad, in that order.

    Raises:
        ValueError: the trainable parameter lists differ in length or shape.
    """
    return [_errors(*pair) for pair in _gradient_pairs(model, reference, inputs, loss_fn)]


def format_table(rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """A fixed-width text table; ``rows[0]`` is the header, underlined.

    The first ``left`` columns are left-aligned (names, shapes), the others right-aligned (numbers).
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def error_table(errors: Sequence[GradientError], label: Callable[[str], str] = str) -> str:
    """:class:`GradientError` rows as a :func:`format_table`, each tensor named by ``label(name)``."""
    rows = [["tensor", "shape", "max abs err", "max rel err"]]
    rows += [[label(e.name), str(tuple(e.shape)), f"{e.max_abs:.3e}", f"{e.max_rel:.3e}"] for e in errors]
    return format_table(rows)


def assert_gradients_match(
    model: nn.Module,
    reference: nn.Module,
    *inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor] = _seeded_loss,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[GradientError]:
    """Like :func:`compare_gradients`, but raise when any tensor differs.

    Raises ``AssertionError`` with a per-tensor table when any tensor is off by more than
    ``atol + rtol * |reference|`` (``torch.testing.assert_close``'s
    rule and, by default, its dtype-based tolerances).

    Returns:
        The rows of :func:`compare_gradients`, when everything matches.
    """
    pairs = _gradient_pairs(model, reference, inputs, loss_fn)
    errors = [_errors(*pair) for pair in pairs]
    rtol, atol = tolerances(next(model.parameters()).dtype, rtol, atol)
    bad = [
        name
        for name, actual, expected in pairs
        if not torch.isclose(actual.double(), expected.double(), rtol=rtol, atol=atol).all()
    ]
    if bad:
        active = _active_dropout(model) + _active_dropout(reference)
        hint = (
            f"\nhint: dropout is active in training mode ({', '.join(active)}), so the two sides draw "
            "different masks: call .eval() on both (or use dropout=0) before comparing them"
            if active
            else ""
        )
        raise AssertionError(
            f"gradients differ beyond rtol={rtol}, atol={atol} (mismatched: {', '.join(bad)}):\n"
            f"{error_table(errors)}{hint}"
        )
    return errors


def _active_dropout(module: nn.Module) -> list[str]:
    """The modules that drop at random as they are now: nn.Dropout(p > 0) or a dropout > 0 attribute."""
    found = []
    for name, sub in module.named_modules():
        rate = sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else getattr(sub, "dropout", 0)
        if sub.training and isinstance(rate, float) and rate > 0:
            found.append(f"{name or type(sub).__name__}: {type(sub).__name__} {rate:g}")
    return found
