"""The files of a training run: checkpoint state for ``--resume``, ``model.pt``, ``metrics.json``, curves.

After every epoch rank 0 writes, each atomically (:mod:`torch_backprop.cli.files`), ``checkpoint.pt``
(every backend's model, optimiser and scaler state, the RNG state, the history and the
run's options; for ``--dp`` also the accountant's history and the sampler's and noise's generator
states), then ``model.pt`` (a ``BackpropMLP`` state_dict, whichever backend trained it) and
``metrics.json`` (the options and every epoch's figures); at the end ``curves.png``. A crash
between two epochs leaves the previous epoch's files, from which ``--resume`` continues exactly.

:class:`RunFolder` holds ``--out`` for the whole run: a lock file (``.lock``, holding the pid)
under ``fcntl.flock``, released by the kernel when the process dies, so a second run into the
folder fails at once and a killed run's lock is no obstacle; the temporary files of a write that a
kill cut short are removed; a folder holding another run's checkpoint is replaced only with
``--overwrite``. On ``--resume``, ``model.pt`` and ``metrics.json`` are rewritten from the checkpoint
before training, so the three files describe the same epoch again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from ..core.module import BackpropMLP
from .files import remove_temporaries, write_figure, write_json, write_torch
from .options import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None  # type: ignore[assignment]


__all__ = [
    "CHECKPOINT",
    "CURVES",
    "METRICS",
    "MODEL",
    "RESUME_KEYS",
    "RunFolder",
    "Trainee",
    "check_out",
    "load_checkpoint",
    "restore",
    "rewrite_outputs",
    "run_config",
    "write_curves",
    "write_epoch",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.json"
CURVES = "curves.png"
LOCK = ".lock"
RUN_FILES = (CHECKPOINT, MODEL, METRICS, CURVES)
_SAVED_KEYS = ("epoch", "config", "history", "rng", "trainees")

# Options that must agree between a run and its --resume (the rest, e.g. --epochs, may change).
RESUME_KEYS = (
    "dataset", "hidden", "activation", "dropout", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "lr_schedule", "lr_step_size", "lr_gamma", "seed", "amp", "backend",
    "compare_autograd", "limit_train", "limit_test", "fake_size",
    "dp", "target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "clipping", "clipping_fn", "groups",
    "accountant", "secure_mode", "target_unclipped_quantile", "clipbound_learning_rate", "unclipped_num_std",
)  # fmt: skip
# What a checkpoint written before an option existed was run with (absent options not listed: None).
_ABSENT = {"dp": False}


class Trainee(Protocol):
    """What the run's files need of one backend's training state (``train``'s ``Trainee`` is one)."""

    name: str

    def state(self) -> dict[str, Any]:
        """Model, optimiser and scaler state, for the checkpoint."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    def mlp_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters in BackpropMLP's layout, whichever backend trained them."""


def run_config(
    args: argparse.Namespace, sizes: list[int], *, world_size: int, device: torch.device
) -> dict[str, Any]:
    """The run's options and facts, as ``metrics.json`` and the checkpoint record them."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config.update(
        sizes=sizes,
        world_size=world_size,
        device_used=str(device),
        torch_version=str(torch.__version__),
        python_version=platform.python_version(),
    )
    return config


def load_checkpoint(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``directory/checkpoint.pt``, after checking that ``args`` repeats the options it was made with.

    Raises:
        ConfigError: no checkpoint there, a file that is not one (empty, corrupt, foreign), or
            options in :data:`RESUME_KEYS` that differ.
    """
    path = directory / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"--resume {directory}: no {CHECKPOINT} there")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's message for a foreign file is long and its advice wrong here
        what = "it is empty" if path.stat().st_size == 0 else "not a torch.save file, or cut short"
        raise ConfigError(
            f"--resume {directory}: {path} is not a readable checkpoint ({what}: {type(error).__name__})"
        ) from None
    missing = [key for key in _SAVED_KEYS if not isinstance(saved, dict) or key not in saved]
    if missing or not isinstance(saved["config"], dict) or not isinstance(saved["epoch"], int):
        raise ConfigError(
            f"--resume {directory}: {path} is a torch file but not a train checkpoint "
            f"(expected the keys {', '.join(_SAVED_KEYS)}, missing {', '.join(missing) or 'none'})"
        )
    differ = [
        f"--{key.replace('_', '-')} {saved['config'].get(key, _ABSENT.get(key))!r} -> {getattr(args, key)!r}"
        for key in RESUME_KEYS
        if saved["config"].get(key, _ABSENT.get(key)) != getattr(args, key)
    ]
    if differ:
        raise ConfigError(
            "--resume expects the options of the run it continues; these differ: " + "; ".join(differ)
        )
    return saved


def restore(
    saved: dict[str, Any], trainees: list[Trainee], device: torch.device
) -> tuple[list[dict[str, Any]], int]:
    """Load every trainee's state and the RNG state; returns (history so far, epochs done).

    Raises:
        ConfigError: the checkpoint's states do not fit the run's models.
    """
    try:
        for trainee in trainees:
            trainee.load_state(saved["trainees"][trainee.name])
        torch.set_rng_state(saved["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"--resume: the checkpoint's states do not fit this run ({reason})") from None
    if device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    return saved["history"], saved["epoch"]


def rewrite_outputs(out: Path, saved: dict[str, Any], *, with_checkpoint: bool) -> None:
    """``model.pt`` and ``metrics.json`` (and ``checkpoint.pt`` when asked) as of the checkpoint's epoch."""
    config = saved["config"]
    first, states = next(iter(saved["trainees"].items()))
    state = states["model"]
    if first != "manual":  # the native twin's keys: model.pt holds BackpropMLP's
        model = BackpropMLP(config["sizes"], activation=config["activation"], dropout=config["dropout"])
        state = model.state_dict_from_sequential(state)
    if with_checkpoint:
        write_torch(saved, out / CHECKPOINT)
    write_torch(state, out / MODEL)
    write_json({"config": config, "epochs": saved["history"]}, out / METRICS)


def check_out(out: Path) -> None:
    """Check that ``--out`` is, or can be made, a writable folder; nothing is created.

    Raises:
        ConfigError: ``out`` is a file, lies below a file, or its folder is not writable.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out expected a folder, got the file {out}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out expected a folder, got {out}, below the file {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out expected a writable folder, got {out} ({existing} is not writable)")


class RunFolder:
    """``--out`` held for one run (rank 0): locked, cleaned of killed writes, not replaced by mistake.

    Args:
        out: the folder, or None for a run that writes nothing.
        resume: the ``--resume`` folder, or None; a checkpoint in ``out`` is this run's only if they agree.
        overwrite: remove another run's files from ``out`` instead of refusing.

    Raises (on entering):
        ConfigError: another live run holds ``out``, ``out`` cannot be written, or it holds another
            run's checkpoint without ``overwrite``.
    """

    def __init__(self, out: Path | None, *, resume: Path | None, overwrite: bool) -> None:
        self.out, self.resume, self.overwrite = out, resume, overwrite
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunFolder:
        if self.out is None:
            return self
        self._created = [f for f in (self.out, *self.out.parents) if not f.exists()]  # deepest first
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as error:
            self.__exit__(None, None, None)
            raise ConfigError(f"--out {self.out}: cannot write there ({error.strerror or error})") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        remove_temporaries(self.out, RUN_FILES)
        ours = self.resume is not None and self.resume.resolve() == self.out.resolve()
        if (self.out / CHECKPOINT).exists() and not ours:
            if not self.overwrite:
                self.__exit__(None, None, None)
                raise ConfigError(
                    f"--out {self.out} holds another run's {CHECKPOINT}: pass --resume {self.out} to "
                    "continue it, or --overwrite to replace it"
                )
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.out / name).unlink()
        return self

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(
                    f"--out {self.out} is in use by another run (pid {holder}, see {path}); wait for it "
                    "to end or choose another --out"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by its last holder meanwhile
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.out / LOCK)
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # only when empty: a run that failed before writing anything
            try:
                folder.rmdir()
            except OSError:
                break


def write_epoch(
    out: Path,
    trainees: list[Trainee],
    history: list[dict[str, Any]],
    config: dict[str, Any],
    epoch: int,
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> None:
    """checkpoint.pt (with ``extra``'s entries, e.g. ``"dp"``), then model.pt and metrics.json, atomically."""
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    write_torch(
        {
            "epoch": epoch,
            "config": config,
            "history": history,
            "rng": rng,
            "trainees": {t.name: t.state() for t in trainees},
            **(extra or {}),
        },
        out / CHECKPOINT,
    )
    write_torch(trainees[0].mlp_state_dict(), out / MODEL)
    write_json({"config": config, "epochs": history}, out / METRICS)


def write_curves(out: Path, history: list[dict[str, Any]], backends: list[str]) -> str:
    """``curves.png`` (loss and accuracy against epoch); returns the line to print about the files."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: skipped curves.png (pip install 'torch-backprop[plot]')"
    private = all("privacy" in row for row in history)
    figure = Figure(figsize=(13.5 if private else 9, 3.5), layout="constrained")
    loss_axes, accuracy_axes, *rest = figure.subplots(1, 3 if private else 2)
    epochs = [row["epoch"] for row in history]
    if private:
        (epsilon_axes,) = rest
        epsilon_axes.plot(epochs, [row["privacy"]["epsilon"] for row in history], marker="o", markersize=3)
        delta = history[-1]["privacy"]["delta"]
        epsilon_axes.set(xlabel="epoch", ylabel="ε", title=f"privacy spent (δ = {delta:g})")
        epsilon_axes.grid(alpha=0.3)
    for backend, style in zip(backends, ("-", "--")[: len(backends)], strict=True):
        label = f"{backend} backward" if len(backends) > 1 else None
        rows = [row[backend] for row in history]
        for split, color in (("train", "C0"), ("test", "C1")):
            loss_axes.plot(
                epochs,
                [r[f"{split}_loss"] for r in rows],
                style,
                color=color,
                label=f"{split} ({backend})" if label else split,
            )
        accuracy_axes.plot(
            epochs, [100 * r["test_accuracy"] for r in rows], style, marker="o", markersize=3, label=label
        )
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss_axes.legend()
    if len(backends) > 1:
        accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    write_figure(figure, out / CURVES)
    return f"wrote {out / METRICS}, {out / MODEL}, {out / CHECKPOINT}, {out / CURVES}"
