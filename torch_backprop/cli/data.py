"""Datasets for the ``train`` command: torchvision image sets as normalised, flattened tensors.

Each dataset is loaded once through ``torchvision.datasets`` (downloaded into a cache directory
when missing), normalised with its usual per-channel mean and standard deviation (what
``transforms.Normalize`` after ``ToTensor`` gives) and flattened, so that an MLP with
``sizes[0] = channels * height * width`` reads it. The result is an in-memory
``TensorDataset``: on a small machine that is much faster than a per-sample PIL pipeline.

``mnist-10k`` is the official MNIST test set, shipped inside the package (``mnist_10k/``: the two
gzip-compressed IDX files, their SHA-256 checksums and CC BY-SA 3.0 licence note): train on the
first 8,000 images, test on the last 2,000, with no download. Each file's checksum is verified
before it is read.

Every failure to find or read the files raises :class:`DataError`, whose message says where the
files were looked for, what is missing and how to proceed; the command prints it without a traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "default_data_root",
    "expected_files",
    "load_dataset",
    "read_idx",
    "shipped_mnist_10k",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before loading it.

    Attributes:
        name: the ``--dataset`` name.
        shape: (channels, height, width) of one image.
        num_classes: number of labels.
        mean: per-channel mean of the training images in [0, 1] (the usual published figure).
        std: per-channel standard deviation, likewise.
        train_size: training samples of the full set (``fake``: ``--fake-size``, so ``None``).
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None = None

    @property
    def in_features(self) -> int:
        """``channels * height * width``: the MLP's ``sizes[0]``."""
        channels, height, width = self.shape
        return channels * height * width


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 60000),
        DatasetInfo("mnist-10k", (1, 28, 28), 10, (0.1307,), (0.3081,), 8000),  # MNIST_10K_SPLIT
        DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), 60000),
        DatasetInfo("kmnist", (1, 28, 28), 10, (0.1918,), (0.3483,), 60000),
        DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50000),
        DatasetInfo("fake", (1, 28, 28), 10, (0.5,), (0.5,)),
    ]
}

# torchvision class name for the sets torchvision downloads itself.
_TORCHVISION_CLASS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
}
# The official MNIST test-set files and their SHA-256 (see mnist_10k/README.md).
MNIST_10K_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
MNIST_10K_SPLIT = 8000  # first 8,000 images train, the rest (2,000) test


class DataError(RuntimeError):
    """The dataset could not be found, downloaded or read; the message says what to do."""


def default_data_root() -> Path:
    """``$TORCH_BACKPROP_DATA`` if set, else ``$XDG_CACHE_HOME/torch_backprop`` (``~/.cache/...``)."""
    if os.environ.get("TORCH_BACKPROP_DATA"):
        return Path(os.environ["TORCH_BACKPROP_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_backprop"


def shipped_mnist_10k() -> Path:
    """The folder inside the package that holds the MNIST test set (``mnist-10k``'s default root)."""
    return Path(__file__).resolve().parent.parent / "mnist_10k"


def expected_files(name: str, root: str | os.PathLike[str]) -> list[Path]:
    """The files ``load_dataset(name, root)`` reads (empty for ``fake``)."""
    root = Path(root)
    if name == "mnist-10k":
        first = next(iter(MNIST_10K_SHA256))
        folder = root if (root / first).exists() else root / "MNIST" / "raw"
        return [folder / f for f in MNIST_10K_SHA256]
    if name == "cifar10":
        from torchvision.datasets import CIFAR10

        return [root / CIFAR10.base_folder / f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
    if name in _TORCHVISION_CLASS:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
        return [root / cls.__name__ / "raw" / os.path.splitext(f)[0] for f, _ in cls.resources]
    return []


def _normalise(images: Tensor, info: DatasetInfo) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C*H*W), as ``ToTensor`` then ``Normalize(mean, std)``."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((images.float() / 255 - mean) / std).flatten(1)


def _as_nchw(data: object) -> Tensor:
    images = torch.as_tensor(data)
    if images.dim() == 3:  # (N, H, W), the MNIST family
        return images.unsqueeze(1)
    return images.permute(0, 3, 1, 2)  # (N, H, W, C), CIFAR


def _failure(name: str, root: Path, reason: str) -> DataError:
    files = expected_files(name, root)
    missing = [str(f) for f in files if not f.exists()]
    lines = [f"cannot load dataset {name!r} from {root}: {reason}"]
    if missing:
        lines.append("missing: " + ", ".join(missing))
    elif files and name != "mnist-10k":
        lines.append(
            "the files are there but could not be read (corrupt or truncated?): delete them to "
            "download them again"
        )
    if name == "mnist-10k":
        lines.append(
            "to proceed: leave out --data-root to read the copy shipped with torch_backprop (reinstall "
            "the package if that copy fails its checksum), or run with --dataset fake"
        )
    else:
        lines.append(
            "to proceed: put the files there (or pass --data-root DIR where they are), "
            "or run offline with --dataset fake"
        )
    if name == "mnist":
        lines.append(
            "real MNIST digits with no download: --dataset mnist-10k (the 10,000-digit test set shipped "
            "with torch_backprop: train on the first 8,000, test on the last 2,000)"
        )
    return DataError("\n".join(lines))


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """A uint8 IDX file (gzip-compressed when its name ends in ``.gz``) as a tensor of its dimensions.

    The format: two zero bytes, the type byte 0x08 (uint8), the number of dimensions, each dimension
    as a big-endian int32, then the data.

    Raises:
        ValueError: not a uint8 IDX file, or its data is shorter or longer than its dimensions say.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path.name}: not a uint8 IDX file (header {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path.name}: IDX header cut short ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    size, given = math.prod(dims), len(data) - header
    if given != size:
        raise ValueError(f"{path.name}: IDX dimensions {dims} need {size} bytes of data, got {given}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_mnist_10k(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    image_file, label_file = expected_files("mnist-10k", root)
    if not (image_file.exists() and label_file.exists()):
        raise _failure(
            "mnist-10k",
            root,
            "the MNIST test-set files are not there (no download for this set: it ships with "
            "torch_backprop; leave out --data-root to use the shipped copy)",
        )
    for path in (image_file, label_file):
        digest = _sha256(path)
        if digest != MNIST_10K_SHA256[path.name]:
            raise _failure(
                "mnist-10k",
                root,
                f"{path.name} is not the official MNIST file: SHA-256 {digest}, expected "
                f"{MNIST_10K_SHA256[path.name]}",
            )
    try:
        images, labels = read_idx(image_file), read_idx(label_file)
    except (OSError, ValueError) as error:
        raise _failure("mnist-10k", root, f"{type(error).__name__}: {error}") from None
    split = MNIST_10K_SPLIT
    images = _as_nchw(images)
    return images[:split], labels[:split], images[split:], labels[split:]


def _idx_problem(files: list[Path]) -> str | None:
    """What is wrong with the first of ``files`` that is not a readable IDX file, or None."""
    for path in files:
        if path.exists():
            try:
                read_idx(path)
            except (OSError, ValueError) as error:
                return str(error)
    return None


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints each mirror it tries
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=download)
    except Exception as error:  # network errors, checksum errors, unreadable files: all one message
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0].rstrip(':') if lines else ''}"
        if len(lines) > 1:  # torchvision lists each mirror it tried; the last error says why
            reason += f" ({lines[-1]})"
        if not lines and name != "cifar10":  # torchvision's IDX reader asserts with no message
            reason = _idx_problem(expected_files(name, root)) or reason
        raise _failure(name, root, reason) from None
    return (
        _as_nchw(train.data),
        torch.as_tensor(train.targets),
        _as_nchw(test.data),
        torch.as_tensor(test.targets),
    )


def _load_fake(size: int, test_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    info = DATASETS["fake"]
    splits = []
    # FakeData draws item i from torch.manual_seed(i + random_offset): the train items take the
    # seeds start .. start + size - 1 and the test items the next test_size, so no image is in both.
    start = seed * (size + test_size)
    for count, offset in ((size, start), (test_size, start + size)):
        fake = FakeData(count, image_size=info.shape, num_classes=info.num_classes, random_offset=offset)
        pairs = [(pil_to_tensor(image), label) for image, label in fake]
        images = (
            torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0, *info.shape, dtype=torch.uint8)
        )
        splits += [images, torch.tensor([int(p[1]) for p in pairs], dtype=torch.int64)]
    return splits[0], splits[1], splits[2], splits[3]


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
    fake_size: int = 1024,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """The train and test sets of ``name`` as ``TensorDataset(features, labels)``.

    Args:
        name: a key of :data:`DATASETS`.
        root: where the files are (and go); default :func:`default_data_root`, and for
            ``mnist-10k`` the copy shipped inside the package (:func:`shipped_mnist_10k`).
        download: fetch the files when missing (the sets torchvision can download).
        limit_train: keep only the first this many training samples.
        limit_test: keep only the first this many test samples.
        fake_size: number of training samples of ``fake`` (the test set gets a quarter, at least 1).
        seed: which images ``fake`` draws (its train and test images never coincide).

    Returns:
        ``(train, test, info)``; features are float32 ``(N, info.in_features)``, labels int64 ``(N,)``.

    Raises:
        ValueError: unknown name.
        DataError: files missing or unreadable (the message says where and how to proceed).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    info = DATASETS[name]
    if root is not None:
        root = Path(root).expanduser()
    else:
        root = shipped_mnist_10k() if name == "mnist-10k" else default_data_root()
    if name == "fake":
        test_size = max(1, fake_size // 4)
        if limit_train is not None:
            fake_size = min(fake_size, limit_train)
        if limit_test is not None:
            test_size = min(test_size, limit_test)
        train_x, train_y, test_x, test_y = _load_fake(fake_size, test_size, seed)
    elif name == "mnist-10k":
        train_x, train_y, test_x, test_y = _load_mnist_10k(root)
    else:
        train_x, train_y, test_x, test_y = _load_torchvision(name, root, download)
    if limit_train is not None:
        train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    if limit_test is not None:
        test_x, test_y = test_x[:limit_test], test_y[:limit_test]
    train = TensorDataset(_normalise(train_x, info), train_y.long())
    test = TensorDataset(_normalise(test_x, info), test_y.long())
    return train, test, info
