"""The torch-backprop command (also python -m torch_backprop).

Each subcommand lives in its own module of :mod:`torch_backprop.cli` (``train.py``, ``verify.py``,
``bench.py``), which defines ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, importing a subcommand's module when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

__all__ = ["SUBCOMMANDS", "main"]

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("torch_backprop.cli.train", "train a BackpropMLP on a torchvision dataset"),
    "verify": ("torch_backprop.cli.verify", "check the manual backward against native autograd"),
    "bench": ("torch_backprop.cli.bench", "time a training step against autograd and torch.compile"),
    "pinn": ("torch_backprop.cli.pinn", "train a physics-informed network on a reference PDE problem"),
}


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
    """The installed distribution's version (pyproject.toml's, which is ``torch_backprop.__version__``)."""
    try:
        return metadata.version("torch-backprop")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
