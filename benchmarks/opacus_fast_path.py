"""A DP-SGD step through Opacus: the BackpropMLP part on the fused stack against the native twin.

Opacus (``GradSampleModule`` + ``DPOptimizer``, or ghost clipping with
``DPLossFastGradientClipping``) is pointed at two models that compute the same function:

* ``twin``: the BackpropMLP's native twin (``to_sequential()``): Opacus's per-layer hooks fire
  during native autograd's per-layer backward;
* ``fused``: the BackpropMLP itself: its stack runs as one Function and calls Opacus's hooks with
  the h^(l) and δ^(l+1) of the one δ recursion (:mod:`torch_backprop.core.opacus_hooks`).

A step is zero_grad, forward, cross-entropy (mean), backward, ``optimizer.step()`` with noise
σ = 1 and C = 1. Before timing, one noise-free step of each contender must leave the same
parameters. Times are interleaved medians (``torch-backprop bench``'s timing); peak memory is the
peak resident set of a fresh process running three steps, above its resident set after set-up.

    python benchmarks/opacus_fast_path.py --json benchmarks/results/opacus_fast_path.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torch_backprop import BackpropMLP
from torch_backprop.cli.timing import interleaved_medians

warnings.filterwarnings("ignore")  # Opacus's notices about secure RNG and hooks


class CNN(nn.Module):
    """An MNIST CNN whose classifier is a BackpropMLP (or, ``native``, its twin)."""

    def __init__(self, native: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = BackpropMLP([32 * 4 * 4, 512, 10])
        if native:
            self.head = self.head.to_sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_case(case: str, native: bool, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if case == "mlp":
        torch.manual_seed(0)
        model = BackpropMLP([784, 512, 512, 10])
        model = model.to_sequential() if native else model
        x = torch.randn(batch, 784, generator=generator)
    else:
        model = CNN(native)
        x = torch.randn(batch, 1, 28, 28, generator=generator)
    return model, x, torch.randint(10, (batch,), generator=generator)


def make_step(
    case: str, mode: str, native: bool, batch: int, sigma: float
) -> tuple[Callable[[], None], nn.Module]:
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model, x, y = make_case(case, native, batch)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"noise_multiplier": sigma, "max_grad_norm": 1.0, "expected_batch_size": batch}
    if mode == "hooks":
        module = GradSampleModule(model)
        optimizer = DPOptimizer(sgd, **options)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            optimizer.step()

    else:
        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        optimizer = DPOptimizerFastGradientClipping(sgd, **options)
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss())

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(module(x), y).backward()
            optimizer.step()

    return step, model


def peak_bytes(case: str, mode: str, native: bool, batch: int, threads: int) -> int:
    """Peak resident set of three steps above the set-up level, in a fresh process."""
    command = [sys.executable, __file__, "--peak", case, mode, "twin" if native else "fused", str(batch)]
    output = subprocess.run(command + ["--threads", str(threads)], capture_output=True, text=True, check=True)
    return int(output.stdout.split()[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_in_this_process(case: str, mode: str, contender: str, batch: int) -> None:
    step, _ = make_step(case, mode, contender == "twin", batch, 1.0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident set (VmHWM) restarts from the current one
    resting = _status_bytes("VmRSS")
    for _ in range(3):
        step()
    print(_status_bytes("VmHWM") - resting)


def check_same_step(case: str, mode: str, batch: int) -> float:
    """Largest parameter difference between the contenders after one noise-free step."""
    params = []
    for native in (True, False):
        step, model = make_step(case, mode, native, batch, 0.0)
        step()
        params.append([p.detach() for p in model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*params, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="mlp,cnn", help="mlp ([784,512,512,10]) and/or cnn")
    parser.add_argument("--modes", default="hooks,ghost")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--peak", nargs=4, metavar=("CASE", "MODE", "CONTENDER", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        case, mode, contender, batch = args.peak
        _peak_in_this_process(case, mode, contender, int(batch))
        return
    import opacus

    rows = []
    print(f"torch {torch.__version__}, opacus {opacus.__version__}, {args.threads} threads, B = {args.batch}")
    print("| case | mode | twin ms | fused ms | fused/twin | twin peak MB | fused peak MB | param diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        for mode in args.modes.split(","):
            difference = check_same_step(case, mode, args.batch)
            steps = {
                name: make_step(case, mode, name == "twin", args.batch, 1.0)[0] for name in ("twin", "fused")
            }
            for step in steps.values():
                step()
            medians = interleaved_medians(
                steps, rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads
            )
            paired = sorted(
                f / t for f, t in zip(medians["fused"]["rounds_s"], medians["twin"]["rounds_s"], strict=True)
            )
            ratio = paired[len(paired) // 2]
            peaks = {name: peak_bytes(case, mode, name == "twin", args.batch, args.threads) for name in steps}
            row = {
                "case": case,
                "mode": mode,
                "twin_ms": 1e3 * medians["twin"]["median_s"],
                "fused_ms": 1e3 * medians["fused"]["median_s"],
                "fused_over_twin": ratio,
                "twin_peak_bytes": peaks["twin"],
                "fused_peak_bytes": peaks["fused"],
                "max_parameter_difference": difference,
            }
            rows.append(row)
            print(
                f"| {case} | {mode} | {row['twin_ms']:.1f} | {row['fused_ms']:.1f} | {ratio:.2f} | "
                f"{peaks['twin'] / 2**20:.0f} | {peaks['fused'] / 2**20:.0f} | {difference:.1e} |",
                flush=True,
            )
    if args.json:
        machine = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opacus": opacus.__version__,
        }
        machine |= {"processor": platform.processor() or platform.machine(), "threads": args.threads}
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "settings": vars(args), "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
