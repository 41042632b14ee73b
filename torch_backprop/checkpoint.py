"""The files of a training run: checkpoint state for ``--resume``, ``model.pt``, ``metrics.json``, curves.

After every epoch rank 0 writes, each atomically (:mod:`torch_backprop.files`), ``checkpoint.pt``
(every backend's model, optimiser, schedule and scaler state, the RNG state, the history and the
run's options), then ``model.pt`` (a ``BackpropMLP`` state_dict, whichever backend trained it) and
``metrics.json`` (the options and every epoch's figures); at the end ``curves.png``. A crash
between two epochs leaves the previous epoch's files, from which ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cli import ConfigError
from .files import write_figure, write_json, write_torch

if TYPE_CHECKING:
    from .training import Trainee

__all__ = [
    "CHECKPOINT",
    "CURVES",
    "METRICS",
    "MODEL",
    "RESUME_KEYS",
    "load_checkpoint",
    "restore",
    "run_config",
    "write_curves",
    "write_epoch",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.json"
CURVES = "curves.png"

# Options that must agree between a run and its --resume (the rest, e.g. --epochs, may change).
RESUME_KEYS = (
    "dataset", "hidden", "activation", "dropout", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "lr_schedule", "lr_step_size", "lr_gamma", "seed", "amp", "backend",
    "compare_autograd", "limit_train", "limit_test", "fake_size",
)  # fmt: skip


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
        ConfigError: no checkpoint there, or options in :data:`RESUME_KEYS` that differ.
    """
    path = directory / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"--resume {directory}: no {CHECKPOINT} there")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    differ = [
        f"--{key.replace('_', '-')} {saved['config'].get(key)!r} -> {getattr(args, key)!r}"
        for key in RESUME_KEYS
        if saved["config"].get(key) != getattr(args, key)
    ]
    if differ:
        raise ConfigError(
            "--resume expects the options of the run it continues; these differ: " + "; ".join(differ)
        )
    return saved


def restore(
    saved: dict[str, Any], trainees: list[Trainee], device: torch.device
) -> tuple[list[dict[str, Any]], int]:
    """Load every trainee's state and the RNG state; returns (history so far, epochs done)."""
    for trainee in trainees:
        trainee.load_state(saved["trainees"][trainee.name])
    torch.set_rng_state(saved["rng"]["torch"])
    if device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    return saved["history"], saved["epoch"]


def write_epoch(
    out: Path,
    trainees: list[Trainee],
    history: list[dict[str, Any]],
    config: dict[str, Any],
    epoch: int,
    device: torch.device,
) -> None:
    """checkpoint.pt, then model.pt and metrics.json, each atomically."""
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
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
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
