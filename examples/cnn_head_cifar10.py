"""A small CNN on CIFAR-10 whose classifier head is a BackpropMLP.

The convolutions are native; the head's backward is the slides' δ recursion, and its input
gradient ∂x = δ^(1) W^(0)ᵀ (BP5) is what flows back into the convolutions, so the whole network
trains with one ``loss.backward()``.

    python examples/cnn_head_cifar10.py --data-root ~/.cache/torch_backprop   # CIFAR-10 (downloaded)
    python examples/cnn_head_cifar10.py --fake --steps 20                     # offline, FakeData
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision import transforms

from torch_backprop import BackpropMLP
from torch_backprop.cli import options

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class ConvNetWithMLPHead(nn.Module):
    """Two conv blocks (3x32x32 -> 32x8x8), flattened into a BackpropMLP head."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )  # fmt: skip
        self.head = BackpropMLP([32 * 8 * 8, hidden, num_classes])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_loader(fake: bool, data_root: str, batch_size: int, steps: int) -> torch.utils.data.DataLoader:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    if fake:
        dataset = torchvision.datasets.FakeData(steps * batch_size, (3, 32, 32), 10, transform=transform)
    else:
        try:
            dataset = torchvision.datasets.CIFAR10(data_root, train=True, download=True, transform=transform)
        except (OSError, RuntimeError) as error:  # offline: every download mirror failed
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SystemExit(
                f"cnn_head_cifar10.py: cannot load CIFAR-10 into {data_root} ({reason}); "
                "offline, run with --fake"
            ) from None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)


def build_parser() -> argparse.ArgumentParser:
    parser = options.parser("python examples/cnn_head_cifar10.py", __doc__)
    parser.add_argument(
        "--fake", action="store_true", help="torchvision FakeData instead of CIFAR-10 (offline)"
    )
    parser.add_argument(
        "--data-root", default="~/.cache/torch_backprop", help="where CIFAR-10 is, or is downloaded to"
    )
    parser.add_argument("--steps", type=options.number(int, low=1), default=1000, help="training steps")
    parser.add_argument("--batch-size", type=options.number(int, low=1), default=64, help="batch size")
    parser.add_argument(
        "--lr", type=options.number(float, low=0, low_open=True), default=1e-3, help="Adam lr"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    torch.manual_seed(0)
    model = ConvNetWithMLPHead()
    loader = make_loader(args.fake, str(Path(args.data_root).expanduser()), args.batch_size, args.steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # head: the manual δ recursion; its ∂x continues into the convolutions
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            conv_grad = model.features[0].weight.grad.norm().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  |∂W conv1| {conv_grad:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
