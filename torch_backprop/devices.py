"""Device choice for the commands: the one place that turns ``--device`` into a ``torch.device``."""

from __future__ import annotations

import torch

__all__ = ["select_device"]


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
