"""Per-sample clipping inside the one backward against a plain step, Opacus and torch.func.

A step is: zero grads, forward, cross-entropy (mean), backward, SGD step. Every clipped step clips
each sample's gradient to total norm C (no noise, so only the clipping machinery is timed) and all
of them start from the same weights and data; the script checks that their clipped gradients agree
before timing. Each row is measured in ``--rounds`` rounds that interleave the methods (each a
``torch.utils.benchmark.Timer.timeit`` of several steps); times are medians over rounds, and ratios
are medians over rounds of the per-round ratio, so that background load shifts all rows alike.
The CPU-time columns (``time.process_time`` around the same measurements, all threads) are the
ratios to trust on a shared machine, where other processes stretch wall time but not CPU time.

Rows:
    plain BackpropMLP       the baseline (1.00x)
    plain nn.Sequential     native autograd on the twin, for context
    per_sample clipped      ``with per_sample(model, max_grad_norm=C)``: this package
    Opacus hooks            ``GradSampleModule`` (hooks) + ``DPOptimizer`` (σ = 0): materialises g_b
    Opacus ghost            ``GradSampleModuleFastGradientClipping`` (ghost clipping, two backwards)
    torch.func vmap(grad)   per-sample gradients by ``vmap(grad(...))``, then norms, clip, sum

With ``--whole-step`` every row is the whole DP-SGD step (clip, noise σ, SGD) and the noise comes
from :class:`~torch_backprop.GaussianNoise` with its defaults (the next draw filled ahead on a
background thread when a core is idle); the flat style also runs with the other ways to draw the
noise (a ``torch.Generator`` in the step, as before; ``GaussianNoise`` drawn in the step, on one
or two threads), and every style with ``secure=True`` (os.urandom). The draws alone are timed too.

Opacus is optional (``pip install opacus``); its rows are skipped when it is not importable.

Usage::

    python benchmarks/per_sample.py                      # [784,512,512,10], batch 256, float32
    python benchmarks/per_sample.py --json per_sample.json --min-run-time 3
    python benchmarks/per_sample.py --whole-step --threads 1     # the whole DP step, every style
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.benchmark import Timer

from torch_backprop import AdaptiveClipping, BackpropMLP, GaussianNoise, dp_sgd_step, per_sample
from torch_backprop.cli.files import write_json
from torch_backprop.cli.timing import interleaved_medians, machine_info
from torch_backprop.firstorder.noise import secure_standard_normal

Step = Callable[[], None]


def clipped_reference(model: nn.Module, x: Tensor, y: Tensor, clip: float) -> list[Tensor]:
    """Clipped mean gradient from a float64 per-sample loop: the check every method must pass."""
    twin = model.to_sequential().double()
    grads = [
        torch.autograd.grad(
            F.cross_entropy(twin(x[b : b + 1].double()), y[b : b + 1]), list(twin.parameters())
        )
        for b in range(x.shape[0])
    ]
    per_param = [torch.stack(g) for g in zip(*grads, strict=True)]
    norms = torch.cat([g.flatten(1) for g in per_param], 1).norm(dim=1)
    factor = (clip / norms).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor, g) / x.shape[0] for g in per_param]


def plain_step(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Step, list[Tensor]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step, list(model.parameters())


def noise_source(model: BackpropMLP, noise: str) -> torch.Generator | GaussianNoise:
    """Where a DP step's noise comes from.

    ``"default"``, ``"in-step"``, ``"2 workers"``, ``"secure"``: a ``GaussianNoise``;
    ``"torch.Generator"``: ``torch.randn`` per parameter in the step, as before ``GaussianNoise``.
    """
    if noise == "torch.Generator":
        return torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    if noise == "secure":
        return GaussianNoise(params, secure=True)
    options = {"default": {}, "in-step": {"prefetch": False}, "2 workers": {"prefetch": False, "workers": 2}}
    return GaussianNoise(params, seed=0, **options[noise])


def per_sample_step(
    model: BackpropMLP,
    x: Tensor,
    y: Tensor,
    clip: Any,
    sigma: float | None = None,
    noise: str = "default",
    **style: Any,
) -> tuple[Step, list[Tensor]]:
    """Clipping inside the backward; with ``sigma``, the whole DP-SGD step (``dp_sgd_step``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = noise_source(model, noise) if sigma is not None else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with per_sample(model, loss_reduction="mean", max_grad_norm=clip, **style):
            F.cross_entropy(model(x), y).backward()
        if sigma is None:
            optimizer.step()
        else:
            dp_sgd_step(model, optimizer, sigma, clip, x.shape[0], generator)

    return step, list(model.parameters())


def opacus_hooks_step(
    model: BackpropMLP, x: Tensor, y: Tensor, clip: float, sigma: float = 0.0
) -> tuple[Step, list[Tensor]]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(model.to_sequential(), loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=x.shape[0],
        loss_reduction="mean",
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()

    return step, list(module.parameters())


def opacus_ghost_step(
    model: BackpropMLP, x: Tensor, y: Tensor, clip: float, sigma: float = 0.0
) -> tuple[Step, list[Tensor]]:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    module = GradSampleModuleFastGradientClipping(
        model.to_sequential(), max_grad_norm=clip, use_ghost_clipping=True, loss_reduction="mean"
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(module.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=x.shape[0],
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss(), loss_reduction="mean")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(module(x), y).backward()
        optimizer.step()

    return step, list(module.parameters())


def vmap_step(model: BackpropMLP, x: Tensor, y: Tensor, clip: float) -> tuple[Step, list[Tensor]]:
    twin = model.to_sequential()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.0)

    def sample_loss(params: dict[str, Tensor], x_b: Tensor, y_b: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(twin, params, (x_b.unsqueeze(0),)), y_b.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        params = {name: p.detach() for name, p in twin.named_parameters()}
        grads = per_sample_grad(params, x, y)
        norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        factor = (clip / norms).clamp(max=1.0)
        for name, p in twin.named_parameters():
            p.grad = torch.einsum("b,b...->...", factor, grads[name]) / x.shape[0]
        optimizer.step()

    return step, list(twin.parameters())


def fastdp_step(
    model: BackpropMLP, x: Tensor, y: Tensor, clip: float, sigma: float, clipping_fn: str = "Abadi"
) -> tuple[Step, list[Tensor]]:
    """The book-keeping of fastDP (``clipping_mode="MixOpt"``) on the twin; fastDP from PYTHONPATH."""
    from fastDP import PrivacyEngine  # not on the package index: a checkout on PYTHONPATH

    twin = model.to_sequential()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.0)
    engine = PrivacyEngine(
        twin, batch_size=x.shape[0], sample_size=50 * x.shape[0], epochs=1, noise_multiplier=sigma,
        max_grad_norm=clip, clipping_fn=clipping_fn, clipping_mode="MixOpt", loss_reduction="mean",
    )  # fmt: skip
    engine.attach(optimizer)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward()
        optimizer.step()

    return step, list(twin.parameters())


def dp_methods(model: BackpropMLP, x: Tensor, y: Tensor, clip: float, sigma: float) -> list:
    """The whole DP-SGD step (clip, noise σ, SGD) for every clipping style and peer."""
    depth = len(model.layers)
    thresholds = [clip / math.sqrt(2 * depth)] * (2 * depth)
    adaptive = AdaptiveClipping(clip, unclipped_num_std=sigma or 1.0)  # σ < 2 σ_u, Opacus's rule

    def ours(max_grad_norm: Any, noise: str = "default", **style: Any) -> Callable[[], tuple]:
        return lambda: per_sample_step(model, x, y, max_grad_norm, sigma, noise, **style)

    styles = [
        ("flat", clip, {}),
        ("per_layer", thresholds, {"clipping": "per_layer"}),
        ("layer-wise", clip, {"clipping": "layer-wise"}),
        ("param-wise", clip, {"clipping": "param-wise"}),
        ("group-wise", clip, {"clipping": "group-wise", "groups": [0, depth - 1]}),
        ("automatic", clip, {"clipping_fn": "automatic"}),
        ("adaptive", adaptive, {"clipping": "adaptive"}),
    ]
    return [
        ("plain BackpropMLP", lambda: plain_step(model, x, y), False),
        *((f"DP {name}", ours(c, **style), name == "flat") for name, c, style in styles),
        ("DP flat, noise in the step (torch.Generator)", ours(clip, "torch.Generator"), False),
        ("DP flat, GaussianNoise in the step", ours(clip, "in-step"), False),
        ("DP flat, GaussianNoise in the step, 2 workers", ours(clip, "2 workers"), False),
        *((f"DP {name}, secure", ours(c, "secure", **style), False) for name, c, style in styles),
        ("Opacus hooks DP", lambda: opacus_hooks_step(model, x, y, clip, sigma), True),
        ("Opacus ghost DP", lambda: opacus_ghost_step(model, x, y, clip, sigma), True),
        ("fastDP MixOpt DP", lambda: fastdp_step(model, x, y, clip, sigma), True),
    ]


def noise_draws(model: BackpropMLP, threads: int, rounds: int) -> list[dict]:
    """The Gaussian draw for every parameter, by the ways PyTorch offers (same distribution and dtype)."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    generator = torch.Generator().manual_seed(0)
    in_step = GaussianNoise(params, seed=0, prefetch=False)
    two = GaussianNoise(params, seed=0, workers=2, prefetch=False)
    ways: dict[str, Step] = {
        "randn per parameter (dp_sgd_step)": lambda: [
            torch.randn(p.shape, generator=generator) for p in params
        ],
        "randn per parameter, global generator": lambda: [torch.randn(p.shape) for p in params],
        "one flat randn": lambda: torch.randn(sum(sizes), generator=generator).split(sizes),
        "normal_ into a preallocated buffer": lambda: torch.empty(sum(sizes)).normal_(generator=generator),
        "uniform_ into a preallocated buffer (the generator's uniforms alone)": lambda: torch.empty(
            sum(sizes)
        ).uniform_(generator=generator),
        "GaussianNoise.draw, one thread (6 chunks)": in_step.draw,
        "GaussianNoise.draw, 2 workers": two.draw,
        "secure: os.urandom, Box-Muller, 4-sum (float64)": lambda: secure_standard_normal(sum(sizes)),
    }
    try:
        import numpy as np

        for name in ("PCG64", "SFC64"):
            bits = np.random.Generator(getattr(np.random, name)(0))
            out = np.empty(sum(sizes), dtype=np.float32)
            ways[f"numpy {name} standard_normal (ziggurat), float32"] = partial(
                bits.standard_normal, out=out, dtype=np.float32
            )
    except ImportError:
        pass
    timed = interleaved_medians(ways, rounds=rounds, min_run_time=0.2, threads=threads)  # rotated rounds
    return [{"draw": name, "median_s": t["median_s"], "variates": sum(sizes)} for name, t in timed.items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 512, 512, 10])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="C; default: median norm")
    parser.add_argument("--min-run-time", type=float, default=4.0, help="about this many seconds per row")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved measurements per row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-slow", action="store_true", help="skip the materialising methods")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--whole-step", action="store_true", help="the whole DP-SGD step (noise σ) for every clipping style"
    )
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="σ of --whole-step")
    parser.add_argument(
        "--secure", action="store_true", help="with --whole-step: every style also with secure noise"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, harmless

    torch.manual_seed(0)
    model = BackpropMLP(args.sizes)
    x = torch.randn(args.batch_size, args.sizes[0])
    y = torch.randint(args.sizes[-1], (args.batch_size,))
    with per_sample(model, max_grad_norm=1.0) as ps:  # one pass for the norms, to pick C
        F.cross_entropy(model(x), y).backward()
    clip = args.max_grad_norm or ps.norms.median().item()
    model.zero_grad(set_to_none=True)
    reference = clipped_reference(model, x, y, clip)

    methods: list[tuple[str, Callable[[], tuple[Step, list[Tensor]]], bool]] = [
        ("plain BackpropMLP", lambda: plain_step(model, x, y), False),
        ("plain nn.Sequential", lambda: plain_step(model.to_sequential(), x, y), False),
        ("per_sample clipped", lambda: per_sample_step(model, x, y, clip), True),
        ("Opacus hooks + clipping", lambda: opacus_hooks_step(model, x, y, clip), True),
        ("Opacus ghost clipping", lambda: opacus_ghost_step(model, x, y, clip), True),
        ("torch.func vmap(grad) + clipping", lambda: vmap_step(model, x, y, clip), True),
    ]
    if args.whole_step:  # checked without noise first: the same clipped gradient as the float64 loop
        methods = dp_methods(model, x, y, clip, args.noise_multiplier)
        checks = {name: build for name, build, checked in dp_methods(model, x, y, clip, 0.0) if checked}
    slow = {"Opacus hooks + clipping", "torch.func vmap(grad) + clipping", "Opacus hooks DP"}
    if args.whole_step and not args.secure:
        methods = [method for method in methods if not method[0].endswith(", secure")]
    rows, steps = [], []
    for name, build, clipped in methods:
        if args.skip_slow and name in slow:
            continue
        try:
            step, params = build()
        except ImportError as error:
            rows.append({"method": name, "skipped": f"not importable: {error}"})
            continue
        error_max = None
        if clipped and args.whole_step:  # the update of σ = 0 is the clipped mean gradient (lr 0: grads stay)
            check, check_params = checks[name]()
            check()
            error_max = max(
                (p.grad.double() - r).abs().max().item() for p, r in zip(check_params, reference, strict=True)
            )
        step()
        if clipped and not args.whole_step:
            error_max = max(
                (p.grad.double() - r).abs().max().item() for p, r in zip(params, reference, strict=True)
            )
        timer = Timer(stmt="step()", globals={"step": step}, num_threads=args.threads, label=name)
        # Steps per measurement so that one takes about min_run_time / rounds.
        once = timer.timeit(1).median
        number = max(1, round(args.min_run_time / args.rounds / once))
        rows.append({"method": name, "max_abs_error_vs_float64_loop": error_max, "times_s": [], "cpu_s": []})
        steps.append((rows[-1], timer, number))
    # Rounds interleave the methods, so a change in background load hits all of them alike; the
    # ratios are medians over rounds of (method / plain BackpropMLP in the same round).
    for _ in range(args.rounds):
        for row, timer, number in steps:
            cpu_start = time.process_time()
            row["times_s"].append(timer.timeit(number).median)
            row["cpu_s"].append((time.process_time() - cpu_start) / number)
    base_times, base_cpu = steps[0][0]["times_s"], steps[0][0]["cpu_s"]
    ours_name = "DP flat" if args.whole_step else "per_sample clipped"
    ours = next(row for row, _, _ in steps if row["method"] == ours_name)
    ours_times, ours_cpu = ours["times_s"], ours["cpu_s"]
    print(
        f"sizes {args.sizes}, batch {args.batch_size}, CPU float32, {args.threads} threads, "
        f"C = {clip:.4g} (median per-sample norm), torch {torch.__version__}, {args.rounds} rounds\n"
    )
    print(
        f"| method | median step (ms) | vs plain BackpropMLP | {ours_name} is faster by "
        f"| CPU time vs plain | CPU time vs {ours_name} |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['method']} | skipped ({row['skipped']}) | | | | |")
            continue
        times = row["times_s"]
        row["median_s"] = statistics.median(times)
        row["vs_plain"] = statistics.median(t / b for t, b in zip(times, base_times, strict=True))
        row["vs_per_sample"] = statistics.median(t / o for t, o in zip(times, ours_times, strict=True))
        cpu = row["cpu_s"]
        row["cpu_vs_plain"] = statistics.median(t / b for t, b in zip(cpu, base_cpu, strict=True))
        row["cpu_vs_per_sample"] = statistics.median(t / o for t, o in zip(cpu, ours_cpu, strict=True))
        print(
            f"| {row['method']} | {1e3 * row['median_s']:.2f} | {row['vs_plain']:.2f}x | "
            f"{row['vs_per_sample']:.1f}x | {row['cpu_vs_plain']:.2f}x | {row['cpu_vs_per_sample']:.1f}x |"
        )
    draws = noise_draws(model, args.threads, args.rounds) if args.whole_step else []
    for row in draws:
        print(f"noise: {row['draw']}: {1e3 * row['median_s']:.2f} ms for {row['variates']} variates")
    result = {
        "whole_step": args.whole_step,
        "noise_multiplier": args.noise_multiplier if args.whole_step else None,
        "noise_draws": draws,
        "load_average": list(os.getloadavg()),
        "prefetch_default": GaussianNoise(list(model.parameters()), seed=0).prefetch,
        "sizes": args.sizes,
        "batch_size": args.batch_size,
        "max_grad_norm": clip,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": machine_info("cpu", args.threads),
        "rows": rows,
    }
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
