"""Curvature in one backward against BackPACK on the native twin: exact and MC GGN diagonals, KFAC.

For every case of the performance grid (``torch-backprop bench``'s shapes × hidden activations,
which include ``[784, 512, 512, 10]`` at batch 256) it times one step (zero the gradients, forward,
the loss module, backward) of:

    plain                 BackpropMLP, no curvature (context)
    BackPACK plain        the extended twin outside any ``backpack`` block (native autograd)
    floor <quantity>      the matrix products alone that any exact method does for the quantity:
                          ``bench.matmul_floor`` (a plain step's) plus the K-column BP2 products
                          (K = C for the exact diagonal, 1 for one Monte Carlo sample) and, per
                          layer, the diagonal's q^(l+1)ᵀ (h^(l))² or KFAC's G and A products
    ours <quantity>       BackpropMLP inside ``curvature(model, loss, quantity)``
    BackPACK <quantity>   the extended twin inside ``backpack(extension)`` (``DiagGGNExact``,
                          ``DiagGGNMC()``, ``KFAC()``); BackPACK has no GELU, so GELU rows are ours only

for ``diag_ggn_exact``, ``diag_ggn_mc`` and ``kfac`` (one Monte Carlo sample), with the loss of
``bench.Case.loss`` (cross-entropy, or MSE for one output), reduction "mean". Before timing, each
pair is checked to agree (float32 round-off; the Monte Carlo pair with the same seed draws the same
labels). Times come from ``timing.interleaved_medians`` (every contender once per round, rotated);
the ratio ours / BackPACK is the median over rounds of the per-round ratio. ``--timer cpu`` (the
default) counts the process's CPU time, which other processes on a shared machine stretch far less
than wall time.

``--memory`` also reports each contender's peak memory during one step: the largest total of the
bytes its tensors hold at once above the level at the start of the step, from the allocation and
free events the PyTorch profiler records (``profile_memory=True``). Exact diagonals carry C
columns: where the factor S (C × batch × widest layer) would exceed ``--max-factor-gib``, that
quantity is skipped for both (the [1024]^4 case: 4 GiB).

``--laplace`` also times laplace-torch's ``Laplace.fit`` over 2,048 random MNIST-shaped samples
(batches of 256) with ``BackpropGGN`` against ``BackPackGGN`` on the twin, and the GLM predictive's
Jacobians (``backend.jacobians``) on 256 samples.

Usage::

    python benchmarks/curvature.py --json benchmarks/results/curvature.json --memory --laplace
    python benchmarks/curvature.py --cases 784-512-512-10@256 --activations relu --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from torch_backprop import BackpropMLP, curvature
from torch_backprop.cli.bench import DEFAULT_ACTIVATIONS, Case, Settings, matmul_floor, parse_cases
from torch_backprop.cli.files import write_json as write_report
from torch_backprop.cli.timing import interleaved_medians, machine_info

QUANTITIES = ("diag_ggn_exact", "diag_ggn_mc", "kfac")
BACKPACK_ACTIVATIONS = {"relu", "tanh", "sigmoid"}  # those of BackPACK's DiagGGN and KFAC modules
Step = Callable[[], None]


def loss_module(case: Case) -> nn.Module:
    return nn.MSELoss() if case.loss == "mse" else nn.CrossEntropyLoss()


def factor_gib(case: Case) -> float:
    """GiB of the exact factor S at its widest: C columns × batch × widest layer, float32."""
    return case.sizes[-1] * case.batch * max(case.sizes[1:]) * 4 / 2**30


def build(case: Case, seed: int = 0) -> tuple[BackpropMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = BackpropMLP(case.sizes, activation=case.activation)
    x, target = case.data()
    return model, x, target


def ours_step(model: BackpropMLP, x, target, loss: nn.Module, quantity: str | None) -> Step:
    parameters = list(model.parameters())

    def step() -> None:
        for p in parameters:
            p.grad = None
        if quantity is None:
            loss(model(x), target).backward()
            return
        with curvature(model, loss, quantity):
            loss(model(x), target).backward()

    return step


def backpack_step(model: BackpropMLP, x, target, case: Case, quantity: str | None) -> tuple[Step, nn.Module]:
    import backpack
    from backpack import extensions

    twin = backpack.extend(model.to_sequential())
    loss = backpack.extend(loss_module(case))
    extension = {
        "diag_ggn_exact": extensions.DiagGGNExact,
        "diag_ggn_mc": extensions.DiagGGNMC,
        "kfac": extensions.KFAC,
    }
    parameters = list(twin.parameters())

    def step() -> None:
        for p in parameters:
            p.grad = None
        if quantity is None:
            loss(twin(x), target).backward()
            return
        with backpack.backpack(extension[quantity]()):
            loss(twin(x), target).backward()

    return step, twin


def floor_step(case: Case, quantity: str) -> Step:
    """The quantity's matrix products alone, on random tensors of the step's shapes."""
    plain = matmul_floor(case.sizes, case.batch, torch.float32, "cpu")
    columns = case.sizes[-1] if quantity == "diag_ggn_exact" else 1
    weights = [torch.randn(n_out, n_in) for n_in, n_out in zip(case.sizes[:-1], case.sizes[1:], strict=True)]
    h = [torch.randn(case.batch, n) for n in case.sizes[:-1]]
    S = [torch.randn(columns * case.batch, n) for n in case.sizes[1:]]

    def step() -> None:
        plain()
        for k, weight in enumerate(weights):
            if k > 0:
                S[k].mm(weight)  # CV2 on K columns, (K N, n_k)
            if quantity == "kfac":
                S[k].t().mm(S[k])  # G, (n_{k+1}, n_{k+1})
                h[k].t().mm(h[k])  # A, (n_k, n_k)
            else:
                S[k][: case.batch].t().mm(h[k])  # CV3: q^(k+1)ᵀ (h^(k))², (n_{k+1}, n_k)

    return step


def check_agreement(model: BackpropMLP, twin: nn.Module, ours: Step, theirs: Step, quantity: str) -> float:
    """Largest relative difference between the two after one step each (same seed for MC draws)."""
    torch.manual_seed(123)
    ours()
    torch.manual_seed(123)
    theirs()
    worst = 0.0
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        a, b = getattr(p, quantity), getattr(q, quantity)
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
            worst = max(worst, ((u - v).abs().max() / v.abs().max().clamp(min=1e-30)).item())
    return worst


def measure_case(case: Case, args: argparse.Namespace) -> dict:
    model, x, target = build(case)
    loss = loss_module(case)
    steps: dict[str, Step] = {"plain": ours_step(model, x, target, loss, None)}
    owners: dict[str, nn.Module] = {"plain": model}
    row: dict = {"case": case.name, "loss": case.loss, "skipped": {}, "agreement": {}}
    with_backpack = case.activation in BACKPACK_ACTIVATIONS and not args.no_backpack
    if with_backpack:
        steps["BackPACK plain"], owners["BackPACK plain"] = backpack_step(model, x, target, case, None)
    for quantity in QUANTITIES:
        if quantity == "diag_ggn_exact" and factor_gib(case) > args.max_factor_gib:
            row["skipped"][quantity] = f"S would be {factor_gib(case):.1f} GiB (> --max-factor-gib)"
            continue
        steps[f"ours {quantity}"] = ours_step(model, x, target, loss, quantity)
        owners[f"ours {quantity}"] = model
        steps[f"floor {quantity}"], owners[f"floor {quantity}"] = floor_step(case, quantity), nn.Module()
        if with_backpack:
            theirs, twin = backpack_step(model, x, target, case, quantity)
            steps[f"BackPACK {quantity}"], owners[f"BackPACK {quantity}"] = theirs, twin
            row["agreement"][quantity] = check_agreement(
                model, twin, steps[f"ours {quantity}"], theirs, quantity
            )
    for step in steps.values():
        step()  # warm-up
    timed = interleaved_medians(
        steps, rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads, timer=args.timer
    )
    row["median_s"] = {name: t["median_s"] for name, t in timed.items()}
    row["ratio_ours_backpack"], row["ratio_extra"], row["ratio_floor"] = {}, {}, {}
    for quantity in QUANTITIES:
        for who in ("ours", "BackPACK"):
            if f"{who} {quantity}" in timed:
                pairs = zip(
                    timed[f"floor {quantity}"]["rounds_s"],
                    timed[f"{who} {quantity}"]["rounds_s"],
                    strict=True,
                )
                row["ratio_floor"][f"{who} {quantity}"] = statistics.median(f / t for f, t in pairs)
        ours, theirs = timed.get(f"ours {quantity}"), timed.get(f"BackPACK {quantity}")
        if ours and theirs:
            pairs = zip(ours["rounds_s"], theirs["rounds_s"], strict=True)
            row["ratio_ours_backpack"][quantity] = statistics.median(a / b for a, b in pairs)
            # the curvature's own cost: each step minus its own plain step, in the same round
            extra = zip(
                ours["rounds_s"],
                timed["plain"]["rounds_s"],
                theirs["rounds_s"],
                timed["BackPACK plain"]["rounds_s"],
                strict=True,
            )
            row["ratio_extra"][quantity] = statistics.median((a - p) / (b - q) for a, p, b, q in extra)
    if args.memory:
        row["peak_mib"] = {
            name: peak_bytes(step, owners[name]) / 2**20
            for name, step in steps.items()
            if "floor" not in name
        }
    return row


def peak_bytes(step: Step, owner: nn.Module) -> int:
    """Peak bytes held by tensors during ``step()`` above the level at its start (profiler events).

    The gradients and curvature attributes of the previous step are dropped first, so that the
    step frees nothing it did not allocate.
    """
    for p in owner.parameters():
        p.grad = None
        for name in QUANTITIES:
            if name in p.__dict__:
                delattr(p, name)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    return peak


def laplace_timings(args: argparse.Namespace) -> dict:
    """Laplace.fit with BackpropGGN against BackPackGGN on the twin, and the predictive's Jacobians."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    from torch_backprop.laplace import BackpropGGN, split_last_layer

    torch.manual_seed(0)
    model = BackpropMLP([784, 512, 512, 10])
    data = TensorDataset(torch.randn(2048, 784), torch.randint(10, (2048,)))
    loader = DataLoader(data, batch_size=256)
    twin = model.to_sequential()
    results = {}
    for subset, structure in [("all", "diag"), ("all", "kron"), ("last_layer", "kron")]:
        ours_model = model if subset == "all" else split_last_layer(model)
        times: dict[str, list[float]] = {"ours": [], "BackPACK": []}
        for _ in range(args.rounds):
            for name, net, backend in (("ours", ours_model, BackpropGGN), ("BackPACK", twin, BackPackGGN)):
                la = Laplace(
                    net,
                    "classification",
                    subset_of_weights=subset,
                    hessian_structure=structure,
                    backend=backend,
                )
                start = time.process_time() if args.timer == "cpu" else time.perf_counter()
                la.fit(loader)
                end = time.process_time() if args.timer == "cpu" else time.perf_counter()
                times[name].append(end - start)
        results[f"fit {subset} {structure}"] = {
            "ours_s": statistics.median(times["ours"]),
            "backpack_s": statistics.median(times["BackPACK"]),
            "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["BackPACK"], strict=True)),
        }
    x = data.tensors[0][:256]
    ours_backend = BackpropGGN(model, "classification")
    theirs_backend = BackPackGGN(twin, "classification")
    twin.output_size = 10  # laplace sets this during fit; its BackPACK Jacobians read it
    steps = {
        "ours jacobians": lambda: ours_backend.jacobians(x),
        "BackPACK jacobians": lambda: theirs_backend.jacobians(x),
    }
    timed = interleaved_medians(
        steps, rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads, timer=args.timer
    )
    results["glm jacobians, 256 samples"] = {
        "ours_s": timed["ours jacobians"]["median_s"],
        "backpack_s": timed["BackPACK jacobians"]["median_s"],
        "ratio": statistics.median(
            a / b
            for a, b in zip(
                timed["ours jacobians"]["rounds_s"], timed["BackPACK jacobians"]["rounds_s"], strict=True
            )
        ),
    }
    return results


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def print_table(report: dict) -> None:
    header = ["case", "loss", "quantity", "ours (ms)", "BackPACK (ms)", "ours / BackPACK"]
    header += ["extra over own plain step, ours / BackPACK", "matmul floor / time, ours, BackPACK"]
    header.append("plain step (ms), ours / BackPACK")
    header.append("peak MiB, ours / BackPACK (plain steps)")
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in report["cases"]:
        memory, median = row.get("peak_mib", {}), row["median_s"]
        plains = " / ".join(_cell(median.get(name), 1e3) for name in ("plain", "BackPACK plain"))
        for quantity in QUANTITIES:
            cells = [row["case"], row["loss"], quantity]
            if quantity in row["skipped"]:
                print("| " + " | ".join([*cells, f"skipped: {row['skipped'][quantity]}", *[""] * 6]) + " |")
                continue
            ours, theirs = median.get(f"ours {quantity}"), median.get(f"BackPACK {quantity}")
            cells += [_cell(ours, 1e3), _cell(theirs, 1e3), _cell(row["ratio_ours_backpack"].get(quantity))]
            floors = [row["ratio_floor"].get(f"{who} {quantity}") for who in ("ours", "BackPACK")]
            cells += [_cell(row["ratio_extra"].get(quantity)), ", ".join(_cell(f) for f in floors), plains]
            if memory:
                mib = " / ".join(
                    _cell(memory.get(f"{who} {quantity}"), digits=2) for who in ("ours", "BackPACK")
                )
                plain = " / ".join(_cell(memory.get(name), digits=2) for name in ("plain", "BackPACK plain"))
                cells.append(f"{mib} ({plain})")
            else:
                cells.append("")
            print("| " + " | ".join(cells) + " |")
    for name, entry in report.get("laplace", {}).items():
        cells = [f"laplace-torch {name}", "cross_entropy", "", _cell(entry["ours_s"], 1e3, 1)]
        cells += [_cell(entry["backpack_s"], 1e3, 1), _cell(entry["ratio"]), "", "", "", ""]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=None, help="e.g. 784-512-512-10@256,8-16-16-1@32 (default: bench grid)"
    )
    parser.add_argument("--activations", default=",".join(DEFAULT_ACTIVATIONS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timer", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--max-factor-gib", type=float, default=1.0)
    parser.add_argument("--memory", action="store_true", help="peak memory per contender (profiler)")
    parser.add_argument("--laplace", action="store_true", help="also time laplace-torch's fit and Jacobians")
    parser.add_argument("--no-backpack", action="store_true", help="ours only (BackPACK not installed)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK, harmless
    torch.set_num_threads(args.threads)
    shapes = parse_cases(args.cases) if args.cases else Settings().shapes
    settings = Settings(shapes=shapes, activations=args.activations.split(","))
    report = {
        "machine": machine_info("cpu", args.threads),
        "timer": args.timer,
        "rounds": args.rounds,
        "cases": [],
    }
    for case in settings.cases():
        print(f"measuring {case.name} ...", file=sys.stderr)
        report["cases"].append(measure_case(case, args))
    if args.laplace:
        report["laplace"] = laplace_timings(args)
    print_table(report)
    if args.json:
        write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
