"""What the Python of a custom autograd Function costs: BackpropMLP against two leaner yardsticks.

``torch-backprop bench`` finds BackpropMLP a few percent slower than native autograd on small
networks, with the same kernels and no more instructions. This asks how much of that any
``torch.autograd.Function`` with a Python backward pays, and how much is BackpropMLP's own
generality (checks, the :class:`~torch_backprop.phases.Tape`, the shared δ generator, the
activation dispatch). It times one training step (``torch_backprop.benchmark.training_step``,
interleaved, medians) of:

* ``manual``: BackpropMLP;
* ``flat``: BackpropMLP whose ``backward_phase`` is one explicit ReLU-only loop (no generator, no
  activation dispatch, no skipping of unneeded gradients);
* ``bare``: a bare ReLU-only Function (no checks, no dropout, autocast, recompute or transforms),
  the least Python a custom Function's forward and backward can run;
* ``native``: the ``nn.Sequential`` twin under plain autograd.

The yardsticks exist for this measurement only (the test suite holds BackpropMLP, not them, to
native autograd). Hidden layers use ReLU and the output none. Run from the repository root:

    python benchmarks/function_overhead.py --cases 8-16-16-1@32,784-256-10@64 --threads 2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_backprop import BackpropMLP
from torch_backprop.cli.bench import Case, parse_cases, training_step
from torch_backprop.cli.timing import interleaved_medians

relu_backward_into = torch.ops.aten.threshold_backward.grad_input


def relu_stack_backward(
    grad_output: Tensor, h: Sequence[Tensor], weights: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """([∂W^(l)], [∂b^(l)]) for ReLU hidden layers and no output activation, as one loop."""
    depth = len(weights)
    grad_weights, grad_biases = [None] * depth, [None] * depth
    delta = grad_output  # BP1, σ'_L = 1
    for k in reversed(range(depth)):
        grad_weights[k] = delta.t().mm(h[k])  # BP3
        grad_biases[k] = delta.sum(0)  # BP4
        if k > 0:
            back = delta.mm(weights[k])
            delta = relu_backward_into(back, h[k], 0, grad_input=back)  # BP2
    return grad_weights, grad_biases


def flat_backward_phase(tape: Any, *, needs_x: bool, needs_weight: Any, needs_bias: Any) -> tuple:
    """A ``backward_phase`` for BackpropMLP: :func:`relu_stack_backward` on its tape."""
    return None, *relu_stack_backward(tape.grad_output, tape.h, tape.weights)


class _BareFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, *params: Tensor) -> Tensor:
        depth = len(params) // 2
        h = [x]
        for k in range(depth):
            z = torch.addmm(params[depth + k], h[-1], params[k].t())
            h.append(z.relu_() if k < depth - 1 else z)
        ctx.save_for_backward(*h[:-1], *params[:depth])
        return h[-1]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        saved = ctx.saved_tensors
        depth = len(saved) // 2
        grad_weights, grad_biases = relu_stack_backward(grad_output, saved[:depth], saved[depth:])
        return (None, *grad_weights, *grad_biases)


class BareMLP(nn.Module):
    """The parameters of ``model`` (shared), run through :class:`_BareFunction`."""

    def __init__(self, model: BackpropMLP) -> None:
        super().__init__()
        self.layers = model.layers

    def forward(self, x: Tensor) -> Tensor:
        layers = self.layers
        return _BareFunction.apply(x, *[layer.weight for layer in layers], *[layer.bias for layer in layers])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8-16-16-1@32,32-64-64-64-64-1@128,784-256-10@64,784-256-10@512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, float32, hidden ReLU; step time / native")
    print("| case | manual | flat | bare | native ms |")
    print("|---|---:|---:|---:|---:|")
    for sizes, batch in parse_cases(args.cases):
        torch.manual_seed(0)
        manual = BackpropMLP(sizes)
        flat, bare = BackpropMLP(sizes), BackpropMLP(sizes)
        flat.load_state_dict(manual.state_dict())
        bare.load_state_dict(manual.state_dict())
        flat.backward_phase = flat_backward_phase
        models = {"manual": manual, "flat": flat, "bare": BareMLP(bare), "native": manual.to_sequential()}
        case = Case(sizes, batch)
        x, target = case.data()
        steps = {
            name: training_step(m, list(m.parameters()), x, target, case.loss) for name, m in models.items()
        }
        for step in steps.values():  # warm-up
            for _ in range(3):
                step()
        for name, model in models.items():  # every contender computes native's gradients
            for p, q in zip(model.parameters(), models["native"].parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
        medians = interleaved_medians(
            steps, rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads
        )
        native = medians["native"]["median_s"]
        ratios = " | ".join(f"{medians[n]['median_s'] / native:.3f}" for n in ("manual", "flat", "bare"))
        print(f"| {case.shape_name} | {ratios} | {1e3 * native:.3f} |", flush=True)


if __name__ == "__main__":
    main()
