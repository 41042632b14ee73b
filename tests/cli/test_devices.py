"""Device choice, one place for the three commands; CUDA asked for where there is none: one clear error."""

from __future__ import annotations

import pytest
import torch

from torch_backprop.cli import main
from torch_backprop.cli.options import select_device


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto", index=1) == torch.device("cpu")


def test_cuda_index_is_the_given_one_unless_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("cuda", index=1) == torch.device("cuda", 1)
    assert select_device("auto", index=1) == torch.device("cuda", 1)
    assert select_device("cuda:0", index=1) == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("choice", ["tpu", "meta", "cuda:x"])
def test_unknown_devices_are_refused(choice):
    with pytest.raises(ValueError, match="--device takes auto, cpu, cuda or cuda:N"):
        select_device(choice)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dataset", "fake", "--device", "cuda"],
        ["verify", "--sizes", "4,3", "--device", "cuda"],
        ["bench", "--quick", "--device", "cuda"],
    ],
    ids=["train", "verify", "bench"],
)
def test_every_command_refuses_cuda_without_cuda(monkeypatch, capsys, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"torch-backprop {argv[0]}: --device cuda was asked for, but CUDA is not available here" in err
    assert "Traceback" not in err
