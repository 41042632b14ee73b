"""DP-SGD on offline MNIST with per-sample clipping inside BackpropMLP's one backward.

Data: the official MNIST test set that ships with torch_backprop (``--dataset mnist-10k`` of the
train command: 10,000 real digits, checksum-verified); the first 8,000 train, the last 2,000 are
held out for the reported accuracy. Batches are drawn by Poisson
sampling (each training sample independently with probability q = batch_size / n), the sampling
the RDP accountant assumes; the loss is summed over the batch, each sample's gradient clipped to
norm C inside the backward (:func:`torch_backprop.per_sample`), and :func:`torch_backprop.dp_sgd_step`
adds N(0, (σC)²) noise to the clipped sum, divides by the expected batch size and steps SGD.
If Opacus is installed, ε at the given δ comes from its RDP accountant (noise multiplier σ,
sample rate q, steps); otherwise it is not reported.

Usage::

    python examples/dp_mnist.py                                  # σ = 1.0, C = 1.0, 10 epochs
    python examples/dp_mnist.py --noise-multiplier 1.0 --max-grad-norm 1.0 --epochs 10
    python examples/dp_mnist.py --synthetic --epochs 2            # no data needed, seconds
    python examples/dp_mnist.py --limit 1000 --epochs 1          # real data, a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_backprop import BackpropMLP, dp_sgd_step, per_sample
from torch_backprop.activations import available_activations
from torch_backprop.cli import options
from torch_backprop.cli.data import MNIST_10K_SHA256, DataError, load_dataset
from torch_backprop.cli.files import write_json


def load_mnist(root: Path | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): the first 8,000 and the last 2,000, as normalised (n, 784) floats.

    ``root`` None reads the copy shipped with torch_backprop; otherwise a folder holding the two
    official ``t10k-*-ubyte.gz`` files.
    """
    train, test, _ = load_dataset("mnist-10k", root)
    return (*train.tensors, *test.tensors)


def synthetic_digits(
    n_train: int, n_test: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ten noisy 784-pixel prototypes: a stand-in for MNIST that needs no files."""
    prototypes = torch.randn(10, 784, generator=generator)
    labels = torch.randint(10, (n_train + n_test,), generator=generator)
    x = prototypes[labels] + 3.0 * torch.randn(n_train + n_test, 784, generator=generator)
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]


@torch.no_grad()
def accuracy(model: BackpropMLP, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float | None:
    """ε from Opacus's RDP accountant, or None when Opacus is not installed or σ = 0."""
    if noise_multiplier == 0:
        return float("inf")
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        return None
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(delta=delta)


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/dp_mnist.py", __doc__)
    count = options.number(int, low=1)
    positive = options.number(float, low=0, low_open=True)
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder of the two MNIST test-set .gz files (default: the copy shipped with torch_backprop)",
    )
    parser.add_argument("--synthetic", action="store_true", help="random prototype digits, no files")
    parser.add_argument("--limit", type=count, default=None, help="use only the first N training samples")
    parser.add_argument("--epochs", type=count, default=10, help="passes of 1/q Poisson batches each")
    parser.add_argument("--batch-size", type=count, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=positive, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=options.number(float, low=0), default=0.9, help="SGD momentum")
    options.add_widths(parser, "--hidden", default=[256], help="hidden widths", example="256,128")
    parser.add_argument(
        "--activation", choices=available_activations(), default="tanh", help="hidden activation"
    )
    parser.add_argument(
        "--noise-multiplier", type=options.number(float, low=0), default=1.0, help="σ (0: clipping alone)"
    )
    parser.add_argument("--max-grad-norm", type=positive, default=1.0, help="C, the clipping threshold")
    parser.add_argument(
        "--delta",
        type=options.number(float, low=0, high=1, low_open=True, high_open=True),
        default=1e-5,
        help="δ for the reported ε",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters, batches and noise")
    parser.add_argument(
        "--threads", type=count, default=None, help="intra-op threads (default: torch's current setting)"
    )
    parser.add_argument(
        "--json", type=options.output_file, metavar="FILE", help="also write the results as JSON"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_root is not None and not args.synthetic and not args.data_root.is_dir():
        parser.error(
            f"argument --data-root: expected a folder holding {', '.join(MNIST_10K_SHA256)}, got "
            f"{args.data_root} (no such folder); leave out --data-root to read the copy shipped with "
            "torch_backprop, or use --synthetic"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    if args.synthetic:
        x_train, y_train, x_test, y_test = synthetic_digits(4000, 500, generator)
        data = "synthetic"
    else:
        try:
            x_train, y_train, x_test, y_test = load_mnist(args.data_root)
        except DataError as error:
            parser.error(f"{'; '.join(str(error).splitlines())}; or use --synthetic")
        data = f"MNIST test set: train on first {len(y_train)}, test on last {len(y_test)}"
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]

    n = len(y_train)
    sample_rate = min(1.0, args.batch_size / n)
    steps_per_epoch = max(1, round(1 / sample_rate))
    model = BackpropMLP([784, *args.hidden, 10], activation=args.activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    start = time.perf_counter()
    steps = 0
    for epoch in range(1, args.epochs + 1):
        for _ in range(steps_per_epoch):
            chosen = torch.rand(n, generator=generator) < sample_rate  # Poisson sampling
            x, y = x_train[chosen], y_train[chosen]
            optimizer.zero_grad(set_to_none=True)
            with per_sample(model, loss_reduction="sum", max_grad_norm=args.max_grad_norm):
                F.cross_entropy(model(x), y, reduction="sum").backward()
            dp_sgd_step(
                model,
                optimizer,
                noise_multiplier=args.noise_multiplier,
                max_grad_norm=args.max_grad_norm,
                batch_size=args.batch_size,
                generator=generator,
                loss_reduction="mean",  # (S + noise) / expected batch size
            )
            steps += 1
        print(f"epoch {epoch}: test accuracy {accuracy(model, x_test, y_test):.4f}")
    seconds = time.perf_counter() - start
    eps = epsilon(args.noise_multiplier, sample_rate, steps, args.delta)
    result = {
        "data": data,
        "train_samples": n,
        "test_samples": len(y_test),
        "sizes": model.sizes,
        "activation": args.activation,
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "expected_batch_size": args.batch_size,
        "sample_rate": sample_rate,
        "epochs": args.epochs,
        "steps": steps,
        "lr": args.lr,
        "momentum": args.momentum,
        "test_accuracy": accuracy(model, x_test, y_test),
        "epsilon": eps,
        "delta": args.delta,
        "seconds": seconds,
    }
    eps_text = (
        "ε not computed (pip install opacus)" if eps is None else f"ε = {eps:.2f} at δ = {args.delta:g}"
    )
    print(
        f"{data}: σ = {args.noise_multiplier}, C = {args.max_grad_norm}, q = {sample_rate:.4f}, "
        f"{steps} steps ({args.epochs} epochs): test accuracy {result['test_accuracy']:.4f}, {eps_text} "
        f"({seconds:.1f} s)"
    )
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
