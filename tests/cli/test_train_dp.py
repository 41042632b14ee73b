"""``train --dp``: ε equal to Opacus's accountants, exact resume, one-line refusals, the twin, DDP."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _train_helpers import torchrun_two_processes

from torch_backprop import BackpropMLP
from torch_backprop.cli import main, private, run_folder

opacus = pytest.importorskip("opacus")
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

# --dataset fake with 96 samples and --batch-size 32: 3 steps per epoch, q = 1/3
FAKE = (
    "train --dataset fake --fake-size 96 --limit-test 32 --hidden 16 --batch-size 32 --optimizer sgd".split()
)
# Two processes on half of each Poisson batch against one on all of it: the clipped sums are added
# in another order (gloo all-reduce), a few float32 ulps per step.
DISTRIBUTED_ATOL = 1e-5


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def opacus_epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = create_accountant(mechanism)
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_epsilon_per_epoch_equals_opacus_for_the_same_sigma_rate_and_steps(accountant, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*FAKE, "--epochs", "2", "--dp", "--noise-multiplier", "1.1", "--accountant", accountant]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = metrics(out)["epochs"]
    delta = 10.0**-2  # the default for N = 96: the largest power of ten below 1/96
    for epoch, row in enumerate(rows, 1):
        privacy = row["privacy"]
        assert privacy["steps"] == 3 * epoch and privacy["sample_rate"] == pytest.approx(1 / 3)
        assert privacy["delta"] == delta and privacy["noise_multiplier"] == 1.1
        expected = opacus_epsilon(accountant, 1.1, 1 / 3, 3 * epoch, delta)
        assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert f"epoch {epoch}/2  ε = {expected:.3f} spent at δ = 0.01" in printed
    assert rows[1]["privacy"]["epsilon"] > rows[0]["privacy"]["epsilon"]
    assert (out / "curves.png").exists()


def test_a_target_epsilon_is_spent_by_the_last_epoch(tmp_path):
    out = tmp_path / "run"
    assert (
        main([*FAKE, "--epochs", "2", "--dp", "--target-epsilon", "4", "--delta", "1e-3", "--out", str(out)])
        == 0
    )
    privacy = metrics(out)["epochs"][-1]["privacy"]
    sigma = get_noise_multiplier(
        target_epsilon=4, target_delta=1e-3, sample_rate=1 / 3, steps=6, accountant="prv"
    )
    assert privacy["noise_multiplier"] == sigma
    assert 4 - 0.011 < privacy["epsilon"] <= 4  # Opacus's search stops within epsilon_tolerance 0.01


def test_default_delta_is_below_one_over_n():
    for n, delta in ((96, 1e-2), (8000, 1e-4), (10_000, 1e-5), (60_000, 1e-5)):
        assert private.default_delta(n) == pytest.approx(delta) and private.default_delta(n) < 1 / n


@pytest.mark.parametrize(
    "backend, style",
    [("manual", ["--clipping", "flat"]), ("manual", ["--clipping", "adaptive"]), ("autograd", [])],
    ids=["manual-flat", "manual-adaptive", "autograd-opacus"],
)
def test_a_killed_and_resumed_run_spends_the_same_epsilon_and_ends_the_same(
    backend, style, tmp_path, monkeypatch
):
    options = [*FAKE, "--epochs", "3", "--dp", "--noise-multiplier", "0.9", "--backend", backend, *style]
    assert main([*options, "--out", str(tmp_path / "straight")]) == 0

    real_write = run_folder.write_epoch

    def crash_after_first_epoch(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "write_epoch", crash_after_first_epoch)
    interrupted = tmp_path / "interrupted"
    assert main([*options, "--out", str(interrupted)]) == 130
    monkeypatch.setattr(run_folder, "write_epoch", real_write)
    assert main([*options, "--resume", str(interrupted)]) == 0

    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(interrupted / "model.pt", weights_only=True)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    first, second = metrics(tmp_path / "straight")["epochs"], metrics(interrupted)["epochs"]
    assert [r["privacy"] for r in first] == [r["privacy"] for r in second]
    assert [r[backend] for r in first] == [r[backend] for r in second]


def test_secure_mode_draws_unseeded_noise_and_resumes_its_epsilon(tmp_path):
    # os.urandom: two runs with the same --seed differ (a seeded run repeats itself, see above), and a
    # resumed secure run continues the accountant.
    options = [*FAKE, "--dp", "--noise-multiplier", "1", "--secure-mode", "--accountant", "rdp"]
    for name in ("a", "b"):
        assert main([*options, "--epochs", "1", "--out", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("a", "b"))
    assert not torch.equal(a["layers.0.weight"], b["layers.0.weight"])
    assert main([*options, "--epochs", "2", "--resume", str(tmp_path / "a")]) == 0
    rows = metrics(tmp_path / "a")["epochs"]
    assert [r["privacy"]["steps"] for r in rows] == [3, 6]
    assert rows[1]["privacy"]["epsilon"] == pytest.approx(
        opacus_epsilon("rdp", 1.0, 1 / 3, 6, 1e-2), rel=1e-9
    )


def test_resume_with_a_target_epsilon_and_more_epochs_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    options = [*FAKE, "--dp", "--target-epsilon", "5", "--accountant", "rdp"]
    assert main([*options, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*options, "--epochs", "2", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume expected σ = " in err and "--noise-multiplier" in err and err.count("\n") == 1


def test_the_twin_through_opacus_takes_the_same_steps(tmp_path):
    # Same Poisson batches, the same clipping (Opacus divides by norm + 1e-6), noise σ = 1e-4: the two
    # backends' parameters may differ only by the noise, ~σ C / B per step, and float32 rounding.
    runs = {}
    for backend in ("manual", "autograd"):
        out = tmp_path / backend
        options = [*FAKE, "--epochs", "2", "--dp", "--noise-multiplier", "1e-4", "--accountant", "rdp"]
        assert main([*options, "--max-grad-norm", "0.5", "--backend", backend, "--out", str(out)]) == 0
        runs[backend] = torch.load(out / "model.pt", weights_only=True)
    torch.manual_seed(0)
    untrained = BackpropMLP([784, 16, 10]).state_dict()  # what --seed 0 initialises; the runs moved from it
    for name in runs["manual"]:
        torch.testing.assert_close(runs["autograd"][name], runs["manual"][name], rtol=0, atol=1e-4)
        assert not torch.equal(runs["manual"][name], untrained[name])


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--dp", "--target-epsilon", "0"],
            "argument --target-epsilon: expected a finite number > 0, got '0'",
        ),
        (
            ["--dp", "--target-epsilon", "-1"],
            "argument --target-epsilon: expected a finite number > 0, got '-1'",
        ),
        (
            ["--dp", "--noise-multiplier", "1", "--delta", "0"],
            "argument --delta: expected a finite number > 0 and < 1",
        ),
        (
            ["--dp", "--noise-multiplier", "1", "--delta", "1"],
            "argument --delta: expected a finite number > 0 and < 1",
        ),
        (["--dp", "--noise-multiplier", "nan"], "argument --noise-multiplier: expected a finite number > 0"),
        (
            ["--dp", "--noise-multiplier", "1", "--max-grad-norm", "0"],
            "argument --max-grad-norm: expected a finite",
        ),
        (["--target-epsilon", "3"], "--target-epsilon expected --dp with it, got no --dp"),
        (["--secure-mode"], "--secure-mode expected --dp with it, got no --dp"),
        (["--dp"], "--dp expected exactly one of --target-epsilon and --noise-multiplier, got neither"),
        (
            ["--dp", "--target-epsilon", "1e-3", "--delta", "1e-10", "--accountant", "rdp"],
            "--target-epsilon 0.001 cannot be reached in 1 epoch(s) (3 steps at sample rate 0.3333",
        ),
        (["--dp", "--noise-multiplier", "1", "--amp", "bf16"], "--dp expected --amp off"),
        (["--dp", "--noise-multiplier", "1", "--compare-autograd"], "got --compare-autograd"),
        (["--dp", "--noise-multiplier", "1", "--backend", "autograd", "--clipping", "layer-wise"], "Opacus"),
        (["--dp", "--noise-multiplier", "1", "--backend", "autograd", "--secure-mode"], "torchcsprng"),
        (["--dp", "--noise-multiplier", "1", "--groups", "0,1"], "--groups expected --clipping group-wise"),
        (["--dp", "--noise-multiplier", "1", "--clipping", "group-wise"], "expected --groups 0,K,..."),
        (["--dp", "--noise-multiplier", "1", "--clipping", "group-wise", "--groups", "0,2"], "below 2"),
        (
            ["--dp", "--noise-multiplier", "1", "--max-grad-norm", "1,2"],
            "expected 1 threshold for --clipping flat",
        ),
        (
            ["--dp", "--noise-multiplier", "1", "--clipping", "per_layer", "--max-grad-norm", "1,2"],
            "or 4 (one",
        ),
        (
            ["--dp", "--noise-multiplier", "2.5", "--clipping", "adaptive"],
            "expected σ below 2 × --unclipped-num",
        ),
        (["--dp", "--noise-multiplier", "1", "--unclipped-num-std", "2"], "expected --clipping adaptive"),
    ],
)
def test_bad_dp_options_are_one_line_exit_2_before_any_data(options, message, no_data, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        status = main([*FAKE, "--epochs", "1", *options, "--out", str(out)])
    except SystemExit as exited:  # argparse's types
        status = exited.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


def test_dp_without_opacus_says_how_to_install_it(no_data, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import fails as if not installed
    assert main([*FAKE, "--dp", "--noise-multiplier", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--dp needs Opacus" in err and "pip install 'torch-backprop[dp]'" in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_processes_take_the_one_process_dp_steps(tmp_path):
    # torchrun: every process draws the same global Poisson batch and takes half; dp_sgd_step sums the
    # clipped sums and draws the noise once, so the parameters equal those of one process.
    common = [*FAKE, "--epochs", "2", "--dp", "--noise-multiplier", "1.0", "--accountant", "rdp"]
    result = torchrun_two_processes([*common, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=DISTRIBUTED_ATOL)
    assert metrics(tmp_path / "two")["config"]["world_size"] == 2
    epsilons = [[r["privacy"]["epsilon"] for r in metrics(tmp_path / k)["epochs"]] for k in ("one", "two")]
    assert epsilons[0] == epsilons[1] and all(math.isfinite(e) for e in epsilons[0])


def test_every_dp_option_must_be_repeated_on_resume():
    assert {"dp", *private._DP_OPTIONS} <= set(run_folder.RESUME_KEYS)
