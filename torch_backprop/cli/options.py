"""The command-line conventions that every command and example shares, in one place.

* :class:`CommandParser` (or :func:`parser`): argparse without abbreviations (``--ep`` is not
  ``--epochs``), a usage error in one line that points at the command's own ``--help``, and every
  option's default in its help. The ``torch-backprop`` subcommands get it from
  :mod:`torch_backprop.cli.command`, the examples from :func:`parser`, so a command added later
  inherits it.
* Option types that check a value as argparse parses it, so a bad value is refused before any
  work: :func:`number`; :func:`parse_widths` and :func:`add_widths`, the one way layer widths are
  written (``784,256,10``; ``784-256-10`` and ``784 256 10`` are read too); :func:`output_file`, a
  file to write in a folder that exists.
* :class:`ConfigError`, the error of options that do not fit together, which a command prints as
  one line; :func:`select_device`, the one place that turns ``--device`` into a ``torch.device``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "CommandParser",
    "ConfigError",
    "HelpFormatter",
    "add_widths",
    "module_available",
    "number",
    "output_file",
    "parse_widths",
    "parser",
    "positive_ints",
    "select_device",
]


class ConfigError(ValueError):
    """Options that do not fit together: a command reports it as one line, without a traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, with ``(default: ...)`` added to each option whose help does not give it.

    Flags (``store_true``) and options without a default (``None``) are left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if silent or not action.option_strings or "default" in text.lower():
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """argparse with the commands' conventions: no abbreviations, one-line errors, defaults in the help.

    A usage error is one line, ``PROG: MESSAGE (see PROG --help)``, exit status 2, where PROG is the
    command itself (``torch-backprop train``, ``python examples/poisson.py``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str, epilog: str | None = None) -> CommandParser:
    """A :class:`CommandParser` for a script, e.g. ``parser("python examples/poisson.py", __doc__)``.

    Only the first line of ``description`` is kept (a module docstring's summary).
    """
    return CommandParser(prog=prog, description=description.strip().splitlines()[0], epilog=epilog)


def parse_widths(
    text: str, *, what: str = "widths", example: str = "784,256,10", at_least: int = 1
) -> list[int]:
    """``"784,256,10"`` (or ``"784-256-10"``, or ``"784 256 10"``) into ``[784, 256, 10]``.

    Raises:
        argparse.ArgumentTypeError: not integers, a non-positive entry, or fewer than ``at_least``.
    """
    stripped = text.strip()
    separator = r"[,\s]+" if re.search(r"[,\s]", stripped) else "-"
    parts = re.split(separator, stripped) if stripped else []
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {what} as comma-separated integers such as {example}, got {text!r}"
        ) from None
    bad = [n for n in values if n <= 0]
    if bad:
        raise argparse.ArgumentTypeError(f"expected positive {what} ({bad[0]} is not), got {text!r}")
    if len(values) < at_least:
        count = "one or more" if at_least == 1 else f"at least {at_least}"
        raise argparse.ArgumentTypeError(f"expected {count} {what} such as {example}, got {text!r}")
    return values


def positive_ints(text: str, *, what: str, example: str, at_least: int = 0) -> list[int]:
    """:func:`parse_widths` under its former name (an argparse ``type`` for one comma-separated token)."""
    return parse_widths(text, what=what, example=example, at_least=at_least)


def add_widths(
    group: Any,
    flag: str,
    *,
    default: Sequence[int] | None,
    help: str,
    what: str = "widths",
    example: str = "256,128",
    at_least: int = 1,
) -> None:
    """Add a widths option to ``group`` (a parser or an argument group): ``--hidden 256,128``.

    The value is checked as it is parsed (:func:`parse_widths`); ``256-128`` and ``256 128`` are read
    as ``256,128``.
    """

    class Widths(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            text = " ".join(values) if isinstance(values, list) else str(values)
            try:
                setattr(
                    namespace, self.dest, parse_widths(text, what=what, example=example, at_least=at_least)
                )
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentError(self, str(error)) from None

    group.add_argument(
        flag,
        nargs="+",
        action=Widths,
        default=None if default is None else list(default),
        metavar=("W1,W2,...", "W"),
        help=f"{help}, comma-separated such as {example}",
    )


def output_file(text: str) -> Path:
    """An argparse ``type`` for a file to write: not a folder, in a folder that exists and is writable.

    Nothing is created: a folder the user did not make is not made for them.

    Raises:
        argparse.ArgumentTypeError: ``text`` names a folder, or its folder is missing, a file or
            not writable.
    """
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file name, got {'the folder ' if text else ''}{text!r}")
    folder = path.parent
    if not folder.is_dir():
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        reason = (
            f"{existing} is a file" if existing.exists() and not existing.is_dir() else f"no folder {folder}"
        )
        raise argparse.ArgumentTypeError(f"expected a file in an existing folder, got {text!r} ({reason})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"expected a file in a writable folder, got {text!r} ({folder} is not writable)"
        )
    return path


def module_available(name: str) -> bool:
    """Whether ``import name`` would find the module (without importing it)."""
    import importlib.util

    return name in sys.modules or importlib.util.find_spec(name) is not None


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


def select_device(choice: str = "auto", *, index: int | None = None) -> torch.device:
    """The device a ``--device`` option names.

    Args:
        choice: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        index: the CUDA device for ``"auto"`` and ``"cuda"`` (e.g. the process's ``LOCAL_RANK``);
            default: none given (the current device).

    Returns:
        The device.

    Raises:
        ValueError: ``choice`` is not a device, or names CUDA where CUDA is not available.
    """
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"--device takes auto, cpu, cuda or cuda:N, got {choice!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice} was asked for, but CUDA is not available here")
        if device.index is None and index is not None:
            device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"--device takes auto, cpu, cuda or cuda:N, got {choice!r}")
    return device
