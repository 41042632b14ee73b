"""The torch-backprop command (also python -m torch_backprop).

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing a subcommand's module when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["ConfigError", "main", "number", "positive_ints"]

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("torch_backprop.train", "train a BackpropMLP on a torchvision dataset"),
    "verify": ("torch_backprop.verify", "check the manual backward against native autograd"),
    "bench": ("torch_backprop.bench", "time a training step against autograd and torch.compile"),
}


class ConfigError(ValueError):
    """Options that do not fit together: a command reports it as one line, without a traceback."""


def positive_ints(text: str, *, what: str, example: str, at_least: int = 0) -> list[int]:
    """Parse ``"784,256,10"`` into positive integers (an argparse ``type``), naming ``what`` in errors.

    Raises:
        argparse.ArgumentTypeError: not integers, a non-positive entry, or fewer than ``at_least``.
    """
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what} such as {example}, got {text!r}"
        ) from None
    if len(values) < at_least or any(n <= 0 for n in values):
        need = f"at least {at_least} " if at_least else ""
        raise argparse.ArgumentTypeError(f"expected {need}positive {what}, got {text!r}")
    return values


def number(
    kind: type[int] | type[float],
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], int | float]:
    """An argparse ``type`` for a finite ``int`` or ``float`` in ``[low, high]`` (ends open when asked).

    ``number(float, low=0, low_open=True)`` accepts 0.5 and refuses ``0``, ``-1``, ``nan`` and ``inf``
    with ``expected a finite number > 0, got '-1'``.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    noun = "an integer" if kind is int else "a finite number"
    expected = f"expected {noun}{' ' + ' and '.join(bounds) if bounds else ''}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        inside = math.isfinite(value) and not (
            (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))
        )
        if not inside:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line instead of the whole usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="torch-backprop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


def _version() -> str:
    from . import __version__

    return __version__
