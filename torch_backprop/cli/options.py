"""What the commands share about their options: argparse types, the one-line error, the device.

:func:`number` and :func:`positive_ints` check an option's value as argparse parses it, so a bad
value is refused before any work; :class:`ConfigError` is the error of options that do not fit
together, which a command prints as one line; :func:`select_device` is the one place that turns
``--device`` into a ``torch.device``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

__all__ = ["ConfigError", "number", "positive_ints", "select_device"]


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
