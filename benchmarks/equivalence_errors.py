"""Largest gradient errors of BackpropMLP against native autograd, per dtype, over a grid.

Runs every activation x depths 1-5 x bias on/off x output activation on/off, with input gradients,
and prints the largest error seen for the output and for all gradients: absolute, relative to the
tensor's largest entry (max |err| / max |ref|), and elementwise relative (large near zeros); per
dtype (float64, float32, bfloat16, float16, and float32 under CPU bfloat16 autocast).

    python benchmarks/equivalence_errors.py
"""

from __future__ import annotations

import torch

from torch_backprop import BackpropMLP, available_activations
from torch_backprop.testing import GradientError, compare_gradients

SIZES = {1: [4, 1], 2: [5, 1, 3], 3: [3, 6, 1, 2], 4: [6, 4, 1, 5, 1], 5: [2, 7, 3, 1, 4, 3]}


def _relative(row: GradientError) -> float:
    return row.max_abs / row.scale if row.scale else 0.0


def main() -> None:
    print(
        "| dtype | cases | output: abs | output: rel to scale "
        "| grads: abs | grads: rel to scale | grads: elementwise rel |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, dtype, autocast in [
        ("float64", torch.float64, False),
        ("float32", torch.float32, False),
        ("bfloat16", torch.bfloat16, False),
        ("float16", torch.float16, False),
        ("float32 + autocast bf16", torch.float32, True),
    ]:
        cases, worst = 0, [0.0, 0.0, 0.0, 0.0, 0.0]
        for activation in available_activations():
            for depth, sizes in SIZES.items():
                for bias in (True, False):
                    for output in (None, activation):
                        torch.manual_seed(depth)
                        model = BackpropMLP(
                            sizes, activation, output_activation=output, bias=bias, dtype=dtype
                        )
                        x = torch.randn(16, sizes[0], dtype=dtype, requires_grad=True)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                            rows = compare_gradients(model, model.to_sequential(), x)
                        cases += 1
                        worst[0] = max(worst[0], rows[0].max_abs)
                        worst[1] = max(worst[1], _relative(rows[0]))
                        worst[2] = max(worst[2], *(r.max_abs for r in rows[1:]))
                        worst[3] = max(worst[3], *(_relative(r) for r in rows[1:]))
                        worst[4] = max(worst[4], *(r.max_rel for r in rows[1:]))
        print(f"| {label} | {cases} | " + " | ".join(f"{w:.2e}" for w in worst) + " |")


if __name__ == "__main__":
    main()
