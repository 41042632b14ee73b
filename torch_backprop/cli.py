"""The ``torch-backprop`` command (also ``python -m torch_backprop``).

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing a subcommand's module when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["ConfigError", "main", "positive_ints"]

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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="torch-backprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
