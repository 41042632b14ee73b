"""Dataset loading: torchvision's sets, the shipped MNIST test set, and one clear error per failure."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch
import torchvision
from _train_helpers import synthetic_digits, write_idx, write_synthetic_mnist
from torchvision import transforms
from torchvision.datasets.mnist import read_image_file, read_label_file

from torch_backprop.cli.data import (
    DATASETS,
    MNIST_10K_SHA256,
    DataError,
    load_dataset,
    read_idx,
    shipped_mnist_10k,
)


@pytest.mark.parametrize(
    "name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")]
)
def test_idx_files_load_through_torchvision_and_match_its_transforms(tmp_path, name, folder):
    write_synthetic_mnist(tmp_path, folder, train=40, test=12)
    train, test, info = load_dataset(name, tmp_path, download=False)
    assert train.tensors[0].shape == (40, 784) and test.tensors[0].shape == (12, 784)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    # Reference: torchvision's own per-sample pipeline, ToTensor then Normalize with the same stats.
    cls = getattr(torchvision.datasets, folder)
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    reference = cls(str(tmp_path), train=False, download=False, transform=pipeline)
    for i in (0, 5, 11):
        image, label = reference[i]
        torch.testing.assert_close(test.tensors[0][i], image.flatten())
        assert test.tensors[1][i].item() == label


def test_limits_keep_the_first_samples(tmp_path):
    write_synthetic_mnist(tmp_path, train=40, test=12)
    full, _, _ = load_dataset("mnist", tmp_path, download=False)
    train, test, _ = load_dataset("mnist", tmp_path, download=False, limit_train=7, limit_test=3)
    assert len(train) == 7 and len(test) == 3
    torch.testing.assert_close(train.tensors[0], full.tensors[0][:7])


def test_fake_is_deterministic_and_shaped():
    a_train, a_test, info = load_dataset("fake", fake_size=16, seed=3)
    b_train, _, _ = load_dataset("fake", fake_size=16, seed=3)
    assert a_train.tensors[0].shape == (16, info.in_features) and len(a_test) == 4
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert set(a_train.tensors[1].tolist()) <= set(range(10))


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_fake_test_set_shares_no_image_with_the_training_set(seed):
    train, test, _ = load_dataset("fake", fake_size=64, seed=seed)
    train_x, test_x = train.tensors[0], test.tensors[0]
    assert len(test) == 16
    assert not torch.equal(test_x[0], train_x[1])  # torchvision seeds item i with i + offset: no shift by one
    # every test image against every training image: the nearest one is far (they are random draws)
    assert torch.cdist(test_x, train_x).min() > 1.0


def test_download_failure_is_one_clear_message(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n"
            "<urlopen error [Errno -2] Name or service not known>"
        )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message  # where it looked
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message  # what is missing
    assert "--data-root" in message and "--dataset fake" in message  # how to proceed
    assert "Name or service not known" in message  # why
    assert "--dataset mnist-10k" in message  # real digits with no download


def test_corrupt_files_are_one_clear_message(tmp_path):
    raw = write_synthetic_mnist(tmp_path, train=8, test=8)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="could not be read") as caught:
        load_dataset("mnist", tmp_path)
    assert "--dataset fake" in str(caught.value)


def test_random_bytes_in_place_of_an_idx_file_say_why(tmp_path):
    raw = write_synthetic_mnist(tmp_path, train=8, test=8)
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(range(7, 250)) * 10)
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", tmp_path)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte: not a uint8 IDX file (header 0708090a)" in message
    assert "AssertionError: \n" not in message


def test_a_cut_short_mnist_10k_copy_gets_no_advice_to_download(tmp_path):
    for name in MNIST_10K_SHA256:
        shutil.copy(shipped_mnist_10k() / name, tmp_path / name)
    image_file = tmp_path / next(iter(MNIST_10K_SHA256))
    image_file.write_bytes(image_file.read_bytes()[:5000])
    with pytest.raises(DataError) as caught:
        load_dataset("mnist-10k", tmp_path)
    message = str(caught.value)
    assert "is not the official MNIST file" in message and "download" not in message
    assert "leave out --data-root" in message


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py") as caught:
        load_dataset("cifar10", tmp_path, download=False)
    assert "data_batch_1" in str(caught.value)


@pytest.fixture(scope="module")
def unpacked_mnist_10k(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped files decompressed by gzip and read by torchvision's own IDX reader."""
    folder = tmp_path_factory.mktemp("unpacked")
    tensors = []
    for name, reader in zip(MNIST_10K_SHA256, (read_image_file, read_label_file), strict=True):
        target = folder / name.removesuffix(".gz")
        with gzip.open(shipped_mnist_10k() / name, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
        tensors.append(reader(str(target)))
    return tensors[0], tensors[1]


def test_shipped_mnist_10k_splits_first_8000_and_last_2000(unpacked_mnist_10k):
    images, labels = unpacked_mnist_10k
    train, test, info = load_dataset("mnist-10k")  # no root: the copy inside the package
    assert images.shape == (10000, 28, 28) and (len(train), len(test)) == (8000, 2000)
    assert torch.equal(train.tensors[1], labels[:8000]) and torch.equal(test.tensors[1], labels[8000:])
    for features, index in ((train.tensors[0][0], 0), (test.tensors[0][-1], 9999)):
        expected = (images[index].float().flatten() / 255 - info.mean[0]) / info.std[0]
        torch.testing.assert_close(features, expected)
    assert set(test.tensors[1].unique().tolist()) == set(range(10))
    # Normalised with MNIST's published statistics, the pixels are roughly standardised.
    assert abs(train.tensors[0].mean().item()) < 0.05 and abs(train.tensors[0].std().item() - 1) < 0.05


def test_mnist_10k_reads_the_gzip_files_from_a_given_root(tmp_path, unpacked_mnist_10k):
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout, as a download leaves it
    raw.mkdir(parents=True)
    for name in MNIST_10K_SHA256:
        shutil.copy(shipped_mnist_10k() / name, raw / name)
    _, test, _ = load_dataset("mnist-10k", tmp_path)
    assert torch.equal(test.tensors[1], unpacked_mnist_10k[1][8000:])


def test_mnist_10k_refuses_a_file_that_fails_its_checksum(tmp_path):
    for name in MNIST_10K_SHA256:
        shutil.copy(shipped_mnist_10k() / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as file:
        data = bytearray(file.read())
    data[-1] = (data[-1] + 1) % 10  # one label changed: still a valid IDX file
    with gzip.open(labels, "wb") as file:
        file.write(bytes(data))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not the official MNIST file") as caught:
        load_dataset("mnist-10k", tmp_path)
    assert MNIST_10K_SHA256["t10k-labels-idx1-ubyte.gz"] in str(caught.value)
    assert "leave out --data-root" in str(caught.value)


def test_mnist_10k_missing_says_where(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz") as caught:
        load_dataset("mnist-10k", tmp_path)
    assert str(tmp_path) in str(caught.value)


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_read_idx_matches_torchvision(tmp_path, compressed):
    images, labels = synthetic_digits(5, seed=3)
    for name, data, reader in (("images", images, read_image_file), ("labels", labels, read_label_file)):
        raw = tmp_path / f"{name}-idx"
        write_idx(raw, data)
        path = raw
        if compressed:
            path = tmp_path / f"{name}-idx.gz"
            path.write_bytes(gzip.compress(raw.read_bytes()))
        assert torch.equal(read_idx(path).long(), reader(str(raw)).long())


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "images-idx"
    write_idx(path, synthetic_digits(3, seed=0)[0])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"need 2352 bytes of data, got 2351"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # type 0x0D: float32
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        read_idx(path)


def test_every_dataset_has_consistent_statistics():
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.shape[0]
