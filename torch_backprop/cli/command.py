"""The torch-backprop command (also python -m torch_backprop).

Each subcommand lives in its own module of :mod:`torch_backprop.cli` (``train.py``, ``verify.py``,
``bench.py``), which defines ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, importing a subcommand's module when it is used. Every parser is a
:class:`~torch_backprop.cli.options.CommandParser` (no abbreviations, one-line errors that point at
the subcommand's ``--help``, defaults in the help), so a subcommand added to :data:`SUBCOMMANDS`
follows the same conventions.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata

from .options import CommandParser

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("torch_backprop.cli.train", "train a BackpropMLP on a torchvision dataset"),
    "verify": ("torch_backprop.cli.verify", "check the manual backward against native autograd"),
    "bench": ("torch_backprop.cli.bench", "time a training step against autograd and torch.compile"),
    "pinn": ("torch_backprop.cli.pinn", "train a physics-informed network on a reference PDE problem"),
}


def build_parser(wanted: Iterable[str] = ()) -> tuple[CommandParser, dict[str, CommandParser]]:
    """The ``torch-backprop`` parser and one parser per subcommand, with the options of those ``wanted``.

    Only the wanted subcommands' modules are imported (``torch-backprop train`` imports no bench code).
    """
    wanted = set(wanted)
    parser = CommandParser(prog="torch-backprop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    subcommands = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subcommands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name in wanted:
            importlib.import_module(module_name).add_arguments(subcommands[name])
    return parser, subcommands


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subcommands = build_parser(argv[:1])
    args, unknown = parser.parse_known_args(argv)
    if (
        unknown
    ):  # argparse leaves a subcommand's unknown options to the top level; its --help is the one to read
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, which is ``torch_backprop.__version__``)."""
    try:
        return metadata.version("torch-backprop")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
