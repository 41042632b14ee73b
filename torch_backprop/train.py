"""``torch-backprop train``: the command that trains a BackpropMLP (or its native twin) on a dataset.

This file parses and checks the options and reports errors; the training is
:mod:`torch_backprop.training` (the loop, the process group), its files are
:mod:`torch_backprop.checkpoint` (checkpoint state, ``--resume``), written through
:mod:`torch_backprop.files`, and the data comes from :mod:`torch_backprop.data`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import torch.distributed as dist

from . import checkpoint
from .activations import available_activations
from .cli import ConfigError, number, positive_ints
from .data import DATASETS, DataError, default_data_root
from .training import fit

__all__ = ["add_arguments", "run", "validate"]


def _int_list(text: str) -> list[int]:
    return positive_ints(text, what="widths", example="256,128", at_least=1)


_COUNT = number(int, low=1)  # epochs, samples, batch size, step size
_NON_NEGATIVE_INT = number(int, low=0)
_NON_NEGATIVE = number(float, low=0)
_POSITIVE = number(float, low=0, low_open=True)
_FRACTION = number(float, low=0, high=1, high_open=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="mnist",
        choices=list(DATASETS),
        help="torchvision dataset; mnist-10k: the MNIST test set shipped with the package (no "
        "download), first 8,000 train, last 2,000 test; fake: torchvision FakeData (default: mnist)",
    )
    data.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"where the data is or goes (default: {default_data_root()}; for mnist-10k, the copy "
        "shipped with the package)",
    )
    data.add_argument(
        "--limit-train", type=_COUNT, default=None, metavar="N", help="use the first N training samples"
    )
    data.add_argument(
        "--limit-test", type=_COUNT, default=None, metavar="N", help="use the first N test samples"
    )
    data.add_argument(
        "--fake-size",
        type=_COUNT,
        default=2048,
        metavar="N",
        help="training samples of --dataset fake (default: 2048)",
    )
    data.add_argument(
        "--workers", type=_NON_NEGATIVE_INT, default=0, help="DataLoader worker processes (default: 0)"
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--hidden", type=_int_list, default=[256], metavar="W1,W2,...", help="hidden widths (default: 256)"
    )
    model.add_argument(
        "--activation",
        default="relu",
        choices=available_activations(),
        help="hidden activation (default: relu)",
    )
    model.add_argument(
        "--dropout",
        type=_FRACTION,
        default=0.0,
        help="dropout after each hidden layer, in [0, 1) (default: 0)",
    )
    model.add_argument(
        "--backend",
        choices=["manual", "autograd"],
        default="manual",
        help="manual: BackpropMLP (the slides' backward); autograd: its native twin",
    )
    model.add_argument(
        "--compare-autograd",
        action="store_true",
        help="train both backends in lockstep and report their largest parameter difference",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_COUNT, default=5, help="(default: 5)")
    optim.add_argument("--batch-size", type=_COUNT, default=128, help="global batch size (default: 128)")
    optim.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], default="adam", help="(default: adam)"
    )
    optim.add_argument("--lr", type=_POSITIVE, default=1e-3, help="learning rate (default: 1e-3)")
    optim.add_argument("--momentum", type=_NON_NEGATIVE, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=_NON_NEGATIVE, default=0.0, help="(default: 0)")
    optim.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine", "step"],
        default="constant",
        help="per-epoch schedule: constant, cosine to 0 over --epochs, or step (default: constant)",
    )
    optim.add_argument(
        "--lr-step-size", type=_COUNT, default=10, help="epochs between steps of 'step' (default: 10)"
    )
    optim.add_argument("--lr-gamma", type=_POSITIVE, default=0.1, help="factor of each 'step' (default: 0.1)")
    optim.add_argument(
        "--seed", type=int, default=0, help="initialisation, batch order and dropout (default: 0)"
    )

    runtime = parser.add_argument_group("runtime and output")
    runtime.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when present (default: auto)",
    )
    runtime.add_argument(
        "--amp",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="automatic mixed precision (fp16 uses a gradient scaler) (default: off)",
    )
    runtime.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write metrics.json, model.pt, checkpoint.pt and curves.png here",
    )
    runtime.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue from DIR/checkpoint.pt (repeat the run's options; --epochs may grow); "
        "--out defaults to DIR",
    )
    runtime.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds another run's checkpoint, replacing its files",
    )


def validate(args: argparse.Namespace) -> None:
    """Check what argparse's types cannot check alone, before anything is loaded or written.

    ``--resume DIR`` without ``--out`` writes into ``DIR``.

    Raises:
        ConfigError: an unusable ``--out`` or ``--resume`` folder.
    """
    if args.resume is not None:
        if not args.resume.is_dir():
            raise ConfigError(f"--resume expected the folder of a run, got {args.resume} (not a folder)")
        if args.out is None:
            args.out = args.resume
    if args.out is not None:
        checkpoint.check_out(args.out)


class _Terminated(BaseException):
    """SIGTERM, raised where the run is, so that its files and its lock are left in order."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` command; returns the exit status."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        validate(args)
        fit(args)
    except (DataError, ConfigError) as error:
        print(f"torch-backprop train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torch-backprop train: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("torch-backprop train: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
