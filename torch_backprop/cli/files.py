"""Writing files atomically: the one writer behind every file the commands write.

Each file is written to a temporary name in its own directory, flushed to disk, then renamed over
the old one (``os.replace`` is atomic on POSIX and Windows), so a reader, or a run resumed after a
crash, sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

_SUFFIX = ".tmp"

__all__ = ["atomic_write", "remove_temporaries", "write_figure", "write_json", "write_torch"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file in the same directory, then rename.

    The parent directory is created when missing. On any failure (including ``KeyboardInterrupt``)
    the temporary file is removed and the old ``path``, if any, is left as it was.

    Args:
        path: the file to (re)write.
        write: receives the temporary file, opened for binary writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        # The name is chosen before the file exists, so that a signal raised at any point after the
        # file is created (SIGTERM, KeyboardInterrupt) reaches the cleanup below knowing which file
        # is ours; tempfile.mkstemp creates the file before it returns the name.
        temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}{_SUFFIX}"
        try:
            try:
                fd = os.open(temporary, flags, 0o600)
            except FileExistsError:  # another writer's name: draw again
                continue
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # created 0600; give the usual mode
            os.replace(temporary, path)
            return
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


def remove_temporaries(directory: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` of ``names`` left in ``directory`` when killed.

    Call it only while no other process writes there (the train command holds a lock on the folder).

    Returns:
        The files removed.
    """
    removed = []
    for name in names:
        for temporary in Path(directory).glob(f".{glob.escape(name)}.*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
                removed.append(temporary)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(obj: Any, path: str | os.PathLike[str], *, allow_nan: bool = True) -> None:
    """``obj`` as indented JSON with a final newline; ``allow_nan=False`` refuses NaN and infinities."""
    text = json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def write_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` (readable with ``torch.load(path, weights_only=True)`` for plain states)."""
    atomic_write(path, lambda file: torch.save(obj, file))


def write_figure(figure: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> None:
    """A matplotlib figure as PNG."""
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=dpi))
