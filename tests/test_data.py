from __future__ import annotations

import pytest
import torch
import torchvision
from _train_helpers import SHARED_MNIST_10K, synthetic_digits, write_idx, write_synthetic_mnist
from torchvision import transforms

from torch_backprop.data import DATASETS, DataError, load_dataset


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


def test_corrupt_files_are_one_clear_message(tmp_path):
    raw = write_synthetic_mnist(tmp_path, train=8, test=8)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="could not be read") as caught:
        load_dataset("mnist", tmp_path)
    assert "--dataset fake" in str(caught.value)


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py") as caught:
        load_dataset("cifar10", tmp_path, download=False)
    assert "data_batch_1" in str(caught.value)


def test_mnist_10k_splits_first_8000_and_last(tmp_path):
    images, labels = synthetic_digits(8050, seed=4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    train, test, info = load_dataset("mnist-10k", tmp_path)
    assert len(train) == 8000 and len(test) == 50
    assert torch.equal(test.tensors[1], labels[8000:].long())
    expected = (images[8000].float().flatten() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(test.tensors[0][0], expected)


def test_mnist_10k_missing_says_where(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist-10k", tmp_path)


@pytest.mark.skipif(not SHARED_MNIST_10K.is_dir(), reason="../shared/data/mnist-10k is absent")
def test_real_mnist_10k_folder():
    train, test, info = load_dataset("mnist-10k", SHARED_MNIST_10K)
    assert (len(train), len(test)) == (8000, 2000)
    assert set(test.tensors[1].unique().tolist()) == set(range(10))
    # Normalised with MNIST's published statistics, the pixels are roughly standardised.
    assert abs(train.tensors[0].mean().item()) < 0.05 and abs(train.tensors[0].std().item() - 1) < 0.05


def test_every_dataset_has_consistent_statistics():
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.shape[0]
