"""The train command end to end on small synthetic MNIST files: files, backends, resume, errors, DDP."""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.datasets.mnist
from _train_helpers import torchrun_two_processes, write_synthetic_mnist

from torch_backprop import BackpropMLP
from torch_backprop.cli import main, run_folder
from torch_backprop.cli.data import load_dataset

# Lockstep divergence: both backends run the same float32 products on the same batches, so they
# may differ only by summation order inside the kernels; a few float32 ulps of the weights (~1e-7)
# compounded over the run. Observed: exactly 0 on CPU.
LOCKSTEP_ATOL = 1e-5
# One process on a global batch vs two processes on half-batches each (gloo all-reduce of the mean
# gradient): the per-rank sums are added in another order, ~1e-7 per step in float32.
DISTRIBUTED_ATOL = 1e-5


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_synthetic_mnist(root, train=256, test=64)
    return root


def synthetic_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "mnist",
        "--data-root",
        str(root),
        "--hidden",
        "32",
        "--batch-size",
        "32",
        "--out",
        str(out),
        *extra,
    ]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_short_run_lowers_the_loss_and_writes_files(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(synthetic_args(mnist_root, out, "--epochs", "3")) == 0
    printed = capsys.readouterr()
    rows = metrics(out)["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    first, last = rows[0]["manual"], rows[-1]["manual"]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_loss"] < first["test_loss"] < 2.5  # ln(10) = 2.30 is chance
    assert last["test_accuracy"] > 0.5
    assert "epoch 3/3" in printed.out and "test acc" in printed.out
    assert "it/s" not in printed.err and "batch/s" not in printed.err  # no progress bar without a tty
    config = metrics(out)["config"]
    assert config["sizes"] == [784, 32, 10] and config["optimizer"] == "adam"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "model.pt", "checkpoint.pt", "curves.png"}


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_model_pt_loads_with_weights_only_and_reproduces_the_accuracy(mnist_root, tmp_path, backend):
    out = tmp_path / backend
    assert main(synthetic_args(mnist_root, out, "--epochs", "1", "--backend", backend)) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    model = BackpropMLP(metrics(out)["config"]["sizes"])
    model.load_state_dict(state)
    _, test, _ = load_dataset("mnist", mnist_root, download=False)
    features, labels = test.tensors
    with torch.no_grad():
        accuracy = (model.eval()(features).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(metrics(out)["epochs"][-1][backend]["test_accuracy"])
    torch.load(out / "checkpoint.pt", weights_only=True)


def test_both_backends_train_identically_from_the_same_seed(mnist_root, tmp_path):
    for backend in ("manual", "autograd"):
        assert (
            main(synthetic_args(mnist_root, tmp_path / backend, "--epochs", "2", "--backend", backend)) == 0
        )
    manual = torch.load(tmp_path / "manual" / "model.pt", weights_only=True)
    native = torch.load(tmp_path / "autograd" / "model.pt", weights_only=True)
    for name in manual:
        torch.testing.assert_close(manual[name], native[name], rtol=0, atol=LOCKSTEP_ATOL)


def test_compare_autograd_reports_a_small_divergence(mnist_root, tmp_path, capsys):
    out = tmp_path / "compare"
    args = synthetic_args(
        mnist_root,
        out,
        "--epochs",
        "2",
        "--compare-autograd",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--activation",
        "tanh",
    )
    assert main(args) == 0
    rows = metrics(out)["epochs"]
    assert all(0 <= r["max_param_difference"] <= LOCKSTEP_ATOL for r in rows)
    assert "max |parameter difference| manual vs autograd" in capsys.readouterr().out
    # The reported figure is the difference of the two trained models, checked here independently.
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    manual = checkpoint["trainees"]["manual"]["model"]
    native = checkpoint["trainees"]["autograd"]["model"]
    largest = max(
        (manual[f"layers.{k}.{kind}"] - native[f"{2 * k}.{kind}"]).abs().max().item()
        for k in range(2)
        for kind in ("weight", "bias")
    )
    assert largest == pytest.approx(rows[-1]["max_param_difference"])


def test_resume_reproduces_an_uninterrupted_run_exactly(mnist_root, tmp_path, monkeypatch):
    options = [
        "--epochs",
        "3",
        "--dropout",
        "0.2",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "--lr-schedule",
        "cosine",
    ]
    assert main(synthetic_args(mnist_root, tmp_path / "straight", *options)) == 0

    real_write = run_folder.write_epoch
    calls = []

    def crash_after_first_epoch(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(run_folder, "write_epoch", crash_after_first_epoch)
    interrupted = tmp_path / "interrupted"
    assert main(synthetic_args(mnist_root, interrupted, *options)) == 130
    assert calls == [1] and metrics(interrupted)["epochs"][-1]["epoch"] == 1
    monkeypatch.setattr(run_folder, "write_epoch", real_write)
    assert main(synthetic_args(mnist_root, interrupted, *options, "--resume", str(interrupted))) == 0

    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(interrupted / "model.pt", weights_only=True)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    first, second = metrics(tmp_path / "straight")["epochs"], metrics(interrupted)["epochs"]
    assert [r["manual"] for r in first] == [r["manual"] for r in second]


def test_resume_refuses_different_options(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(synthetic_args(mnist_root, out, "--epochs", "1")) == 0
    assert main(synthetic_args(mnist_root, out, "--epochs", "2", "--lr", "0.5", "--resume", str(out))) == 2
    assert "--lr" in capsys.readouterr().err


def test_offline_download_failure_prints_one_message_without_traceback(tmp_path, monkeypatch, capsys):
    # torchvision's real download loop runs (every mirror), each attempt failing as it does offline,
    # whether or not this machine has a network.
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    root = tmp_path / "empty"
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/mnist-TIME, goes here
    assert main(["train", "--data-root", str(root), "--epochs", "1"]) == 2  # returned, not raised
    captured = capsys.readouterr()
    message = captured.err
    assert "Traceback" not in message
    assert captured.out.startswith("no --out given: the run's files go to runs/mnist-")
    assert not (tmp_path / "runs").exists()  # the run folder it made, and runs/, are gone with the run
    assert message.count("torch-backprop train:") == 1
    assert "cannot load dataset 'mnist'" in message and "Name or service not known" in message
    assert str(root) in message and "train-images-idx3-ubyte" in message  # where, and what is missing
    assert "--data-root" in message and "--dataset fake" in message  # how to proceed
    assert "--dataset mnist-10k" in message and "shipped" in message  # and how to run on real digits


def test_curves_are_skipped_with_a_notice_without_matplotlib(mnist_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(synthetic_args(mnist_root, out, "--epochs", "1")) == 0
    assert "matplotlib is not installed: skipped curves.png" in capsys.readouterr().out
    assert not (out / "curves.png").exists() and (out / "model.pt").exists()


def test_fake_dataset_amp_bf16_and_sgd_schedule(tmp_path):
    out = tmp_path / "fake"
    args = [
        "train",
        "--dataset",
        "fake",
        "--fake-size",
        "128",
        "--hidden",
        "16,16",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--amp",
        "bf16",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--lr-schedule",
        "step",
        "--lr-step-size",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = metrics(out)["epochs"]
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.005)
    assert all(torch.isfinite(torch.tensor(r["manual"]["train_loss"])) for r in rows)


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    common = [
        "--dataset",
        "fake",
        "--fake-size",
        "64",
        "--limit-test",
        "16",
        "--hidden",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
    ]
    result = torchrun_two_processes(["train", *common, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path / "two")["config"]["world_size"] == 2
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=DISTRIBUTED_ATOL)
    assert not torch.equal(one["layers.0.weight"], BackpropMLP([784, 16, 10]).layers[0].weight)


@pytest.mark.slow
def test_real_mnist_10k_one_epoch(tmp_path):
    out = tmp_path / "real"
    options = "--dataset mnist-10k --epochs 1 --limit-train 2000 --hidden 64 --batch-size 32".split()
    assert main(["train", *options, "--out", str(out)]) == 0  # the digits shipped in the package
    rows = metrics(out)["epochs"]
    assert rows[0]["manual"]["test_accuracy"] > 0.8  # chance is 0.1; real digits, 2,000 for training
    assert metrics(out)["config"]["limit_train"] == 2000


def test_fake_test_accuracy_stays_at_chance_after_memorising_the_training_set(tmp_path):
    # Random images with random labels: nothing carries over to unseen images, so test accuracy is
    # chance (0.1; sd 0.027 over 128 test images), however well the training set is learnt. When the
    # test set was the training set shifted by one image it rose with the training accuracy.
    out = tmp_path / "fake"
    options = "--dataset fake --fake-size 512 --hidden 128 --batch-size 32 --epochs 6 --lr 3e-3".split()
    assert main(["train", *options, "--out", str(out)]) == 0
    last = metrics(out)["epochs"][-1]["manual"]
    assert last["train_loss"] < 0.5  # memorised (chance: ln 10 = 2.3)
    assert last["test_accuracy"] < 0.25
