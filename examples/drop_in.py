"""Drop-in: an ordinary PyTorch training loop in which the MLP is a BackpropMLP.

The only line that differs from the stock loop is the one that builds the model
(``nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)`` becomes ``BackpropMLP([784, 256, 10])``);
data, loss, optimiser and loop are untouched, and gradients come from the slides' δ recursion.

    python examples/drop_in.py --data-root ~/.cache/torch_backprop   # MNIST (downloaded when missing)
    python examples/drop_in.py --fake --steps 50                      # offline, torchvision FakeData
    python examples/drop_in.py --fake --steps 50 --native             # the stock nn.Sequential
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms

from torch_backprop import BackpropMLP
from torch_backprop.cli import options


def make_model(native: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if native:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Flatten(), BackpropMLP([784, 256, 10]))  # the one changed line


def make_loader(fake: bool, data_root: str, batch_size: int, steps: int) -> torch.utils.data.DataLoader:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    if fake:
        dataset = torchvision.datasets.FakeData(steps * batch_size, (1, 28, 28), 10, transform=transform)
    else:
        try:
            dataset = torchvision.datasets.MNIST(data_root, train=True, download=True, transform=transform)
        except (OSError, RuntimeError) as error:  # offline: every download mirror failed
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SystemExit(
                f"drop_in.py: cannot load MNIST into {data_root} ({reason}); offline, run with --fake"
            ) from None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)


def train(args: argparse.Namespace) -> tuple[nn.Module, list[float]]:
    model = make_model(args.native)
    loader = make_loader(args.fake, args.data_root, args.batch_size, args.steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return model, losses


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/drop_in.py", __doc__)
    parser.add_argument("--fake", action="store_true", help="torchvision FakeData instead of MNIST (offline)")
    parser.add_argument(
        "--data-root", default="~/.cache/torch_backprop", help="where MNIST is, or is downloaded to"
    )
    parser.add_argument("--steps", type=options.number(int, low=1), default=400, help="training steps")
    parser.add_argument("--batch-size", type=options.number(int, low=1), default=64, help="batch size")
    parser.add_argument("--lr", type=options.number(float, low=0, low_open=True), default=0.05, help="SGD lr")
    parser.add_argument("--native", action="store_true", help="train the stock nn.Sequential instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data_root = str(Path(args.data_root).expanduser())
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
