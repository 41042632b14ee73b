"""``train --dp``'s sampling is Opacus's ``make_private``'s, held against it where N is not a multiple of B.

Opacus's convention (``PrivacyEngine.make_private`` with Poisson sampling) for a ``DataLoader`` of
batch size B over N samples: ⌈N/B⌉ steps per epoch, q = 1/len(data_loader) = 1/⌈N/B⌉, and the
expected batch ⌊N q⌋ by which the noisy sum is averaged. With N = 100 and B = 32: 4 steps, q = 1/4
and an expected batch of 25, where B/N = 0.32 and B = 32 would be wrong; a multiple of B (the other
tests' N = 96) cannot tell them apart.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_backprop.cli import main, train
from torch_backprop.cli.command import build_parser

opacus = pytest.importorskip("opacus")

SAMPLES, BATCH, SIGMA, DELTA = 100, 32, 1.1, 1e-3
OPTIONS = [
    *("--dataset", "fake", "--fake-size", str(SAMPLES), "--limit-test", "16", "--hidden", "8"),
    *("--batch-size", str(BATCH), "--optimizer", "sgd", "--epochs", "1"),
    *("--dp", "--noise-multiplier", str(SIGMA), "--delta", str(DELTA), "--accountant", "prv"),
]


def make_private():
    """Opacus's own set-up on a DataLoader of the same N and B: (privacy engine, optimizer, data loader)."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(SAMPLES, 4, generator=generator), torch.randint(2, (SAMPLES,), generator=generator)
    )
    model = nn.Linear(4, 2)
    engine = opacus.PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off", Opacus's reminder
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=BATCH),
            noise_multiplier=SIGMA,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
    return engine, module, optimizer, loader


def test_sample_rate_expected_batch_and_steps_are_make_privates(tmp_path):
    _, subcommands = build_parser(["train"])
    args = subcommands["train"].parse_args([*OPTIONS, "--out", str(tmp_path / "run")])
    train.validate(args)
    plan = args.dp_plan
    _, _, optimizer, loader = make_private()
    assert SAMPLES % BATCH != 0
    assert plan["sample_rate"] == loader.sample_rate == 0.25  # 1/⌈100/32⌉, not 32/100
    assert plan["expected_batch_size"] == optimizer.expected_batch_size == 25  # ⌊100 · 1/4⌋, not 32
    assert plan["steps_per_epoch"] == len(loader) == 4
    assert not (tmp_path / "run").exists()  # checking the options wrote nothing


def test_epsilon_after_an_epoch_is_make_privates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *OPTIONS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Poisson sampling q = 0.25, 4 steps per epoch, expected batch 25;" in printed
    (row,) = json.loads((out / "metrics.json").read_text())["epochs"]

    engine, module, optimizer, loader = make_private()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in loader:  # one epoch of Opacus's own DP-SGD: its accountant steps once per step
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
        expected = engine.get_epsilon(delta=DELTA)
    assert row["privacy"]["steps"] == sum(steps for _, _, steps in engine.accountant.history) == 4
    assert row["privacy"]["sample_rate"] == engine.accountant.history[0][1]
    assert row["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
