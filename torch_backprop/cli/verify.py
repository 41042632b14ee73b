"""The ``verify`` command: check the manual backward against native autograd for one architecture.

Runs random data through :class:`~torch_backprop.BackpropMLP` and its native twin
(:meth:`~torch_backprop.BackpropMLP.to_sequential`, same weights), backpropagates the same loss
through both and prints, per layer, the largest absolute and relative error of ∂W^(l), ∂b^(l) and
∂x (:func:`torch_backprop.testing.compare_gradients`), then ``torch.autograd.gradcheck``'s verdict
on the manual backward in float64. Exits 1 on any mismatch.

``--show-deltas`` adds the norm of each δ^(l) = ∂Q/∂z^(l), the slides' intermediate variable
(slides 8-10): read from the manual recursion itself (:func:`torch_backprop.core.phases.deltas`) and,
independently, from autograd on the twin's pre-activations, so vanishing or exploding gradients
show at a glance and the two columns check each other. It also shows δ^(L) started as the slides
start it, BP1 with the loss inside the stack (δ^(L) = Q'(h^(L) - y) ⊙ σ'_L(z^(L)),
:mod:`torch_backprop.core.losses`), beside autograd's ∂Q/∂h^(L) ⊙ σ'_L on the twin, for each fused
loss on random targets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core.activations import available_activations
from ..core.functional import mlp
from ..core.loss_function import stack_loss
from ..core.losses import resolve_loss
from ..core.module import BackpropMLP
from ..core.phases import Tape, backward_phase, deltas
from ..core.testing import (
    assert_gradients_match,
    compare_gradients,
    error_table,
    format_table,
    seeded_loss,
    tolerances,
)
from .options import add_widths, number, select_device

__all__ = ["add_arguments", "delta_norms", "output_deltas", "run"]

_TOLERANCE = number(float, low=0)
_COUNT = number(int, low=1)

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_GRADCHECK_FULL_LIMIT = 2000  # parameters + inputs up to which gradcheck builds the full Jacobian


def _activation_list(text: str) -> list[str]:
    names = [part for part in text.replace(" ", "").split(",") if part]
    unknown = [n for n in names if n not in available_activations()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown activation {', '.join(unknown) or text!r}; "
            f"expected one of: {', '.join(available_activations())}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``verify`` options to ``parser``."""
    add_widths(
        parser,
        "--sizes",
        default=[784, 256, 10],
        help="layer widths, input first",
        what="sizes",
        example="784,256,10",
        at_least=2,
    )
    parser.add_argument(
        "--activation",
        type=_activation_list,
        default=None,
        metavar="NAME[,NAME...]",
        help="hidden activation, or one per hidden layer (default: relu; --sizes needs a hidden layer "
        f"for it); one of: {', '.join(available_activations())}",
    )
    parser.add_argument(
        "--output-activation",
        default="identity",
        choices=available_activations(),
        help="activation of the last layer (default: identity)",
    )
    parser.add_argument("--no-bias", action="store_true", help="layers without bias")
    parser.add_argument(
        "--dtype", choices=list(_DTYPES), default="float64", help="the model's and the data's dtype"
    )
    parser.add_argument("--batch-size", type=_COUNT, default=16, help="rows of random input (default: 16)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the parameters and the data (default: 0)"
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="cpu", help="auto: CUDA when present"
    )
    parser.add_argument(
        "--rtol", type=_TOLERANCE, default=None, help="default: torch.testing's for the dtype"
    )
    parser.add_argument(
        "--atol", type=_TOLERANCE, default=None, help="default: torch.testing's for the dtype"
    )
    parser.add_argument("--no-gradcheck", action="store_true", help="skip torch.autograd.gradcheck")
    parser.add_argument("--show-deltas", action="store_true", help="print the norm of each δ^(l) per layer")


def delta_norms(
    model: BackpropMLP, x: Tensor, loss_fn: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """δ^(1), ..., δ^(L) from the manual recursion and from autograd on the twin's pre-activations.

    Args:
        model: the stack (dropout is not applied: the model is evaluated deterministically).
        x: input, ``(N, n_0)``.
        loss_fn: Q as a function of the output.

    Returns:
        ``(manual, native)``: two lists of L tensors, ``δ^(l)`` of shape ``(N, n_l)``, l = 1..L.
    """
    depth = len(model.layers)
    manual: list[Tensor | None] = [None] * depth

    def recording_phase(tape: Tape, **needs: Any) -> Any:
        for k, delta in deltas(tape):
            manual[k] = delta.detach().clone()  # δ^(k+1)
        return backward_phase(tape, **needs)

    x_manual = x.detach().clone().requires_grad_()
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    output = mlp(x_manual, weights, biases, list(model.activations), backward_phase=recording_phase)
    loss_fn(output).backward()

    twin = model.to_sequential().eval()
    pre_activations: list[Tensor] = []

    def keep(module: nn.Module, inputs: Any, z: Tensor) -> None:
        z.retain_grad()
        pre_activations.append(z)

    handles = [m.register_forward_hook(keep) for m in twin if isinstance(m, nn.Linear)]
    x_native = x.detach().clone().requires_grad_()
    loss_fn(twin(x_native)).backward()
    for handle in handles:
        handle.remove()
    native = [z.grad for z in pre_activations]
    model.zero_grad(set_to_none=True)
    return [d for d in manual if d is not None], native


def output_deltas(model: BackpropMLP, x: Tensor, seed: int = 0) -> list[tuple[str, Tensor, Tensor]]:
    """δ^(L) both ways for each fused loss on random targets: ``(loss, slides', autograd's)``.

    The slides' δ^(L) is the one the fused node (:meth:`BackpropMLP.loss`) starts its recursion with,
    BP1 = Q'(h^(L) - y) ⊙ σ'_L(z^(L)); autograd's is ∂Q/∂z^(L) of the native loss on the twin.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, classes = x.shape[0], model.out_features
    factory: dict[str, Any] = {"dtype": x.dtype}
    targets = {
        "cross_entropy": torch.randint(classes, (rows,), generator=generator),
        "mse_loss": torch.randn(rows, classes, generator=generator, **factory),
        "binary_cross_entropy_with_logits": torch.rand(rows, classes, generator=generator, **factory),
    }
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    results = []
    for name, target in targets.items():
        target = target.to(x.device)
        recorded: list[Tensor] = []

        def recording_phase(tape: Tape, recorded: list[Tensor] = recorded, **needs: Any) -> Any:
            recorded.append(next(deltas(tape))[1].detach().clone())  # BP1: δ^(L)
            return backward_phase(tape, **needs)

        spec, _, _ = resolve_loss(name, "mean")
        x_ours = x.detach().clone().requires_grad_()
        stack_loss(
            x_ours, target, None, None, weights, biases, model.activations, 0.0, False, recording_phase, spec
        ).backward()

        twin = model.to_sequential().eval()
        last = [m for m in twin if isinstance(m, nn.Linear)][-1]
        kept: list[Tensor] = []

        def keep(module: nn.Module, inputs: Any, z: Tensor, kept: list[Tensor] = kept) -> None:
            z.retain_grad()
            kept.append(z)

        handle = last.register_forward_hook(keep)
        spec.native(twin(x.detach()), target, None, None).backward()
        handle.remove()
        results.append((name, recorded[0], kept[0].grad))
    model.zero_grad(set_to_none=True)
    return results


def _gradcheck(model: BackpropMLP, x: Tensor) -> tuple[bool, str]:
    """``torch.autograd.gradcheck`` of the manual backward in float64 (fast mode for large stacks)."""
    params64 = [layer.weight.detach().double().requires_grad_() for layer in model.layers]
    has_bias = model.layers[0].bias is not None
    if has_bias:
        params64 += [layer.bias.detach().double().requires_grad_() for layer in model.layers]
    depth = len(model.layers)
    x64 = x.detach().double().requires_grad_()
    activations = list(model.activations)

    def stack(x: Tensor, *params: Tensor) -> Tensor:
        return mlp(x, params[:depth], params[depth:] if has_bias else None, activations)

    count = x64.numel() + sum(p.numel() for p in params64)
    fast = count > _GRADCHECK_FULL_LIMIT
    ok = torch.autograd.gradcheck(
        stack, (x64, *params64), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=fast, raise_exception=False
    )
    how = "fast mode (random projections)" if fast else "full Jacobian"
    return ok, f"gradcheck (float64, {how}, {count} inputs)"


def _label(name: str) -> str:
    if name == "output":
        return "h^(L) (output)"
    if name.startswith("input"):
        return "∂x"
    _, index, kind = name.split(".")
    return f"∂{'W' if kind == 'weight' else 'b'}^({index})"


def _hidden_activation(args: argparse.Namespace) -> str | list[str]:
    """``--activation`` as BackpropMLP takes it: one name, or one per hidden layer of ``--sizes``.

    Raises:
        ValueError: names given for a stack without hidden layers, or a list of the wrong length.
    """
    sizes = ",".join(map(str, args.sizes))
    hidden = len(args.sizes) - 2
    if args.activation is None:
        return "relu"
    if hidden == 0:
        raise ValueError(
            f"--activation sets the hidden layers' activation, but --sizes {sizes} has none; expected "
            f"three or more --sizes, or --output-activation for the one layer, got --activation "
            f"{','.join(args.activation)}"
        )
    if len(args.activation) == 1:
        return args.activation[0]
    if len(args.activation) != hidden:
        raise ValueError(
            f"--activation expected 1 name or {hidden} (one per hidden layer of --sizes {sizes}), "
            f"got {len(args.activation)}: {','.join(args.activation)}"
        )
    return args.activation


def run(args: argparse.Namespace) -> int:
    """Run the ``verify`` command; returns 0 when everything matches, 1 otherwise."""
    try:
        activation = _hidden_activation(args)
        device = select_device(args.device)
    except ValueError as error:
        print(f"torch-backprop verify: {error}", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]

    torch.manual_seed(args.seed)
    model = BackpropMLP(
        args.sizes,
        activation=activation,
        output_activation=args.output_activation,
        bias=not args.no_bias,
        device=device,
        dtype=dtype,
    )
    x = torch.randn(args.batch_size, args.sizes[0], device=device, dtype=dtype, requires_grad=True)
    loss_fn = seeded_loss(args.seed)
    print(
        f"verify: BackpropMLP {args.sizes}, activations {list(model.activations)}, "
        f"{'no bias' if args.no_bias else 'bias'}, {args.dtype} on {device}, batch {args.batch_size}; "
        "reference: native autograd on model.to_sequential()"
    )

    errors = compare_gradients(model, model.to_sequential(), x, loss_fn=loss_fn)
    print(error_table(errors, label=_label))
    failures = []
    try:
        assert_gradients_match(
            model, model.to_sequential(), x, loss_fn=loss_fn, rtol=args.rtol, atol=args.atol
        )
        print("gradients: match native autograd")
    except AssertionError as error:
        first = str(error).splitlines()[0]
        print(f"gradients: MISMATCH: {first}")
        failures.append("gradients")

    if args.show_deltas:
        manual, native = delta_norms(model, x, loss_fn)
        rows = [["δ^(l)", "shape", "‖δ‖ manual", "‖δ‖ autograd", "mean per-sample ‖δ‖", "max abs diff"]]
        for k, (m, n) in enumerate(zip(manual, native, strict=True), start=1):
            rows.append(
                [
                    f"δ^({k})",
                    str(tuple(m.shape)),
                    f"{m.norm().item():.4e}",
                    f"{n.norm().item():.4e}",
                    f"{m.norm(dim=1).mean().item():.4e}",
                    f"{(m - n).abs().max().item():.3e}",
                ]
            )
        print(format_table(rows))
        rtol, atol = tolerances(dtype, args.rtol, args.atol)
        if not all(torch.allclose(m, n, rtol=rtol, atol=atol) for m, n in zip(manual, native, strict=True)):
            print("deltas: MISMATCH between the manual recursion and autograd")
            failures.append("deltas")
        print(
            "δ^(L), BP1: the slides' start Q'(h^(L) - y) ⊙ σ'_L(z^(L)) (model.loss) and autograd's ∂Q/∂z^(L)"
        )
        rows = [["loss (mean)", "‖δ^(L)‖ slides' BP1", "‖δ^(L)‖ autograd", "max abs diff"]]
        starts = output_deltas(model, x, args.seed)
        for name, ours, theirs in starts:
            rows.append(
                [
                    name,
                    f"{ours.norm().item():.4e}",
                    f"{theirs.norm().item():.4e}",
                    f"{(ours - theirs).abs().max().item():.3e}",
                ]
            )
        print(format_table(rows))
        if not all(torch.allclose(o, t, rtol=rtol, atol=atol) for _, o, t in starts):
            print("BP1: MISMATCH between the slides' start and autograd")
            failures.append("BP1")

    if not args.no_gradcheck:
        ok, what = _gradcheck(model, x)
        print(f"{what}: {'passed' if ok else 'FAILED'}")
        if not ok:
            failures.append("gradcheck")

    if failures:
        print(f"verify: FAILED ({', '.join(failures)})")
        return 1
    print("verify: OK")
    return 0
