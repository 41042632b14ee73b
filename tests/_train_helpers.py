"""Helpers for the train/data/verify/examples tests: synthetic MNIST IDX files, example loading."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, data: Tensor) -> None:
    """An IDX file of uint8 ``data``: magic 0x0000080D (0x08 = uint8, D = ndim), big-endian dims, bytes."""
    data = data.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, data.dim()]) + struct.pack(f">{data.dim()}i", *data.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + data.numpy().tobytes())


def synthetic_digits(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` learnable 28x28 uint8 images: class k lights rows 2k+4, 2k+5; plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 80, (count, 28, 28), generator=generator)
    rows = torch.arange(28)
    band = (rows.unsqueeze(0) // 2 - 2) == labels.unsqueeze(1)  # (count, 28)
    images = torch.where(band.unsqueeze(2), torch.full_like(images, 230), images)
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_synthetic_mnist(root: Path, folder: str = "MNIST", train: int = 256, test: int = 64) -> Path:
    """The four MNIST IDX files under ``root/folder/raw``, as ``torchvision.datasets.MNIST`` reads them."""
    raw = root / folder / "raw"
    for split, count, seed in (("train", train, 1), ("test", test, 2)):
        images, labels = synthetic_digits(count, seed)
        image_file, label_file = MNIST_FILES[split]
        write_idx(raw / image_file, images)
        write_idx(raw / label_file, labels)
    return raw


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def torchrun_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m torch_backprop ARGS`` under ``torchrun --nproc-per-node 2`` (one thread each)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "torch_backprop", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
