"""Laplace approximation of a BackpropMLP trained on real MNIST digits: MAP against the Laplace predictive.

Data: the project's ``mnist-10k`` (the 10,000 official MNIST test digits, split as the ``train``
command splits them: the first 8,000 train, the last 2,000 test), shipped inside the package.
A BackpropMLP is trained to its MAP estimate (Adam, weight decay), then laplace-torch fits a Laplace
approximation around it with :class:`torch_backprop.laplace.BackpropGGN` as curvature backend
(default: last-layer KFAC, laplace-torch's own recommendation; ``--subset all --structure diag``
for the whole network), tunes the prior precision (by the marginal likelihood, laplace-torch's
default, or with ``--prior gridsearch`` by the NLL on the last ``--validation`` training digits,
which the MAP then does not train on) and predicts with the linearised (GLM) predictive and the
probit approximation. It reports, on the 2,000 test digits,
accuracy, negative log-likelihood (NLL) and expected calibration error (ECE, 15 equal-width bins
of confidence) of the MAP model and of the Laplace predictive; ``--plot FILE.png`` saves a
reliability diagram (accuracy against confidence per bin, both models). It writes nothing else.

Usage::

    python examples/laplace_mnist.py                            # the digits shipped with the package
    python examples/laplace_mnist.py --plot runs/reliability.png  # and the diagram, in a folder of yours
    python examples/laplace_mnist.py --subset all --structure diag
    python examples/laplace_mnist.py --prior gridsearch --validation 1000
    python examples/laplace_mnist.py --dataset fake --epochs 1   # synthetic images, no files, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torch_backprop import BackpropMLP
from torch_backprop.cli import options
from torch_backprop.cli.data import DATASETS, MNIST_10K_SHA256, DataError, load_dataset
from torch_backprop.cli.files import write_figure, write_json

BINS = 15


def train_map(model: BackpropMLP, loader: DataLoader, epochs: int, lr: float, weight_decay: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
        print(f"epoch {epoch}: training loss {total / len(loader.dataset):.4f}")
    model.eval()


def metrics(probabilities: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE (``BINS`` equal-width confidence bins) of predicted class probabilities."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    nll = -probabilities.gather(1, labels[:, None]).clamp(min=1e-12).log().mean()
    bins = torch.clamp((confidence * BINS).long(), max=BINS - 1)
    ece = sum(
        (bins == b).float().mean() * (correct[bins == b].mean() - confidence[bins == b].mean()).abs()
        for b in range(BINS)
        if (bins == b).any()
    )
    return {"accuracy": correct.mean().item(), "nll": nll.item(), "ece": float(ece)}


def reliability(probabilities: Tensor, labels: Tensor) -> tuple[list[float], list[float], list[int]]:
    """Per bin: mean confidence, accuracy and count (empty bins left out)."""
    confidence, predicted = probabilities.max(1)
    bins = torch.clamp((confidence * BINS).long(), max=BINS - 1)
    rows = [
        (
            confidence[bins == b].mean().item(),
            (predicted == labels)[bins == b].float().mean().item(),
            int((bins == b).sum()),
        )
        for b in range(BINS)
        if (bins == b).any()
    ]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def plot_reliability(curves: dict[str, tuple[Tensor, Tensor]], path: Path) -> None:
    """Save the reliability diagram as a PNG at ``path`` (atomically; needs matplotlib)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(curves), 4.2))
    axes = figure.subplots(1, len(curves), sharey=True)
    for ax, (name, (probabilities, labels)) in zip(axes, curves.items(), strict=True):
        confidence, accuracy, counts = reliability(probabilities, labels)
        width = 1 / BINS
        centres = [(int(c * BINS) + 0.5) * width for c in confidence]
        ax.bar(centres, accuracy, width=width * 0.9, edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.plot(confidence, accuracy, "o-", color="tab:red", markersize=3, label="(confidence, accuracy)")
        score = metrics(probabilities, labels)
        ax.set_title(f"{name}: ECE {score['ece']:.4f}, NLL {score['nll']:.3f}")
        ax.set_xlabel("confidence (max probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.text(0.02, 0.9, f"{sum(counts)} test digits", transform=ax.transAxes)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    write_figure(figure, path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/laplace_mnist.py", __doc__)
    count = options.number(int, low=1)
    parser.add_argument(
        "--dataset",
        default="mnist-10k",
        choices=("mnist-10k", "fake"),
        help="mnist-10k: the MNIST test set shipped with the package; fake: torchvision FakeData",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="a folder holding the MNIST test-set files (default: the copy shipped with the package)",
    )
    parser.add_argument(
        "--limit-train", type=count, default=None, help="use the first N training digits (default: all)"
    )
    parser.add_argument("--fake-size", type=count, default=1024, help="training images of --dataset fake")
    options.add_widths(parser, "--hidden", default=[256], help="hidden widths", example="256,128")
    parser.add_argument("--epochs", type=count, default=10, help="MAP training epochs")
    parser.add_argument("--batch-size", type=count, default=128, help="MAP training batch size")
    parser.add_argument(
        "--lr", type=options.number(float, low=0, low_open=True), default=1e-3, help="Adam lr"
    )
    parser.add_argument(
        "--weight-decay",
        type=options.number(float, low=0),
        default=5e-4,
        help="Adam weight decay (the MAP's prior)",
    )
    parser.add_argument(
        "--subset", choices=("last_layer", "all"), default="last_layer", help="the weights the Laplace covers"
    )
    parser.add_argument(
        "--structure", choices=("kron", "diag"), default="kron", help="the Hessian approximation's structure"
    )
    parser.add_argument(
        "--prior",
        choices=("marglik", "gridsearch"),
        default="marglik",
        help="how the prior precision is tuned: marginal likelihood, or NLL on --validation digits",
    )
    parser.add_argument(
        "--validation", type=count, default=1000, help="held-out training digits for --prior gridsearch"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the batch order")
    parser.add_argument(
        "--threads", type=count, default=None, help="intra-op threads (default: torch's current setting)"
    )
    parser.add_argument(
        "--plot",
        type=options.output_file,
        default=None,
        metavar="FILE.png",
        help="also save the reliability diagram there (needs matplotlib)",
    )
    parser.add_argument(
        "--json",
        type=options.output_file,
        default=None,
        metavar="FILE",
        help="also write the results as JSON",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    train_size = args.fake_size if args.dataset == "fake" else DATASETS[args.dataset].train_size
    if args.limit_train is not None:
        train_size = min(train_size, args.limit_train)
    if args.prior == "gridsearch" and not args.validation < train_size:
        parser.error(
            f"argument --validation: expected fewer than the {train_size} training digits, "
            f"got {args.validation}"
        )
    if args.plot is not None and not options.module_available("matplotlib"):
        parser.error("argument --plot: needs matplotlib, which is not installed: pip install matplotlib")
    if args.dataset == "mnist-10k" and args.data_root is not None and not args.data_root.is_dir():
        parser.error(
            f"argument --data-root: expected a folder holding {', '.join(MNIST_10K_SHA256)}, got "
            f"{args.data_root} (no such folder); leave out --data-root to read the package's copy"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from laplace import Laplace

        from torch_backprop.laplace import BackpropGGN, split_last_layer
    except ImportError:
        parser.error("this example needs laplace-torch: pip install 'torch-backprop[curvature]'")
    try:
        train, test, info = load_dataset(
            args.dataset,
            args.data_root,
            download=False,
            limit_train=args.limit_train,
            fake_size=args.fake_size,
        )
    except DataError as error:
        parser.error("; ".join(str(error).splitlines()))

    validation = None
    if args.prior == "gridsearch":
        x_train, y_train = train.tensors
        validation = TensorDataset(x_train[-args.validation :], y_train[-args.validation :])
        train = TensorDataset(x_train[: -args.validation], y_train[: -args.validation])

    torch.manual_seed(args.seed)
    model = BackpropMLP([info.in_features, *args.hidden, info.num_classes], activation="relu")
    start = time.perf_counter()
    train_map(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        args.epochs,
        args.lr,
        args.weight_decay,
    )
    train_seconds = time.perf_counter() - start

    network = split_last_layer(model) if args.subset == "last_layer" else model
    la = Laplace(
        network,
        "classification",
        subset_of_weights=args.subset,
        hessian_structure=args.structure,
        backend=BackpropGGN,
    )
    start = time.perf_counter()
    la.fit(DataLoader(train, batch_size=256))
    tuning = {"val_loader": DataLoader(validation, batch_size=256)} if validation is not None else {}
    la.optimize_prior_precision(method=args.prior, pred_type="glm", link_approx="probit", **tuning)
    laplace_seconds = time.perf_counter() - start

    x_test, y_test = test.tensors
    with torch.no_grad():
        map_probabilities = torch.softmax(model(x_test), dim=1)
    chunk = (
        256 if args.subset == "last_layer" else 16
    )  # the full GLM predictive holds (chunk, C, P) Jacobians
    laplace_probabilities = torch.cat(
        [la(x, pred_type="glm", link_approx="probit") for x in x_test.split(chunk)]
    )
    results = {
        "dataset": args.dataset,
        "train_samples": len(train),
        "test_samples": len(test),
        "sizes": model.sizes,
        "laplace": f"{args.subset} {args.structure}, backend BackpropGGN, GLM predictive, probit",
        "prior_tuning": args.prior
        if validation is None
        else f"gridsearch on {len(validation)} held-out digits",
        "prior_precision": la.prior_precision.flatten()[:1].item(),
        "map": metrics(map_probabilities, y_test),
        "laplace_predictive": metrics(laplace_probabilities, y_test),
        "train_seconds": train_seconds,
        "laplace_seconds": laplace_seconds,
    }
    print(f"{results['test_samples']} test digits | accuracy | NLL | ECE")
    for name in ("map", "laplace_predictive"):
        score = results[name]
        print(f"{name:18s} | {score['accuracy']:.4f} | {score['nll']:.4f} | {score['ece']:.4f}")
    print(f"(MAP training {train_seconds:.1f} s; Laplace fit and prior tuning {laplace_seconds:.1f} s)")
    curves = {"MAP": (map_probabilities, y_test), "Laplace (GLM, probit)": (laplace_probabilities, y_test)}
    if args.plot is not None:
        plot_reliability(curves, args.plot)
        results["plot"] = str(args.plot)
        print(f"reliability diagram: {args.plot}")
    else:
        print("no reliability diagram (--plot FILE.png saves one)")
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
