"""dp_sgd_step: Opacus's DPOptimizer semantics, and a refusal for every gradient that was not clipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _per_sample_helpers import BATCH, DTYPE, SIZES, TOL, batch_loss, clipped_reference, loop_grads, make_data
from _per_sample_helpers import make_model as make_mlp
from conftest import assert_close
from torch import nn

from torch_backprop import BackpropMLP, dp_sgd_step, per_sample

ROOT = Path(__file__).resolve().parents[2]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


class HeadNet(nn.Module):
    """A convolution whose head is a BackpropMLP, as in the MNIST CNN example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, dtype=DTYPE)
        self.head = BackpropMLP([2 * (SIZES[0] - 2), 5, 3], dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x[:, None])).flatten(1))


def test_noise_on_an_unclipped_convolution_is_refused_and_names_it() -> None:
    net = HeadNet()
    x, y = make_data((BATCH,))
    with per_sample(net.head, loss_reduction="sum", max_grad_norm=1e-3):
        F.cross_entropy(net(x), y, reduction="sum").backward()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    with pytest.raises(RuntimeError) as refused:
        dp_sgd_step(net, sgd(net), 1.0, 1e-3, BATCH)
    assert str(refused.value) == (
        "dp_sgd_step: .grad is not the clipped sum of one per_sample block: the gradients of conv.weight, "
        "conv.bias got no clipped backward (they are outside the per_sample block's model, or the "
        "backward ran outside the block): run the forward and backward of every trainable parameter "
        "inside per_sample(model, max_grad_norm=...)"
    )
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


def test_a_plain_backward_outside_any_block_is_refused() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    batch_loss(model(x), y, "mean").backward()
    with pytest.raises(
        RuntimeError, match=r"the gradients of layers\.0\.weight, layers\.0\.bias, .* got no clipped"
    ):
        dp_sgd_step(model, sgd(model), 1.0, 1.0, BATCH)


def test_a_plain_backward_after_the_clipped_one_is_refused() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=0.1):
        batch_loss(model(x), y, "mean").backward()
    batch_loss(model(x), y, "mean").backward()  # adds an unclipped gradient
    with pytest.raises(
        RuntimeError, match=r"layers\.2\.bias changed after the clipped backward \(an unclipped"
    ):
        dp_sgd_step(model, sgd(model), 1.0, 0.1, BATCH)


def test_gradients_changed_after_clipping_are_refused() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=0.1):
        batch_loss(model(x), y, "mean").backward()
    model.layers[2].bias.grad.mul_(2.0)
    with pytest.raises(RuntimeError) as refused:
        dp_sgd_step(model, sgd(model), 1.0, 0.1, BATCH)
    message = str(refused.value)
    assert "the gradients of layers.2.bias changed after the clipped backward" in message
    assert "call dp_sgd_step right after the clipped backward" in message and "layers.0" not in message


def test_a_second_step_on_the_same_gradients_is_refused() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=0.1):
        batch_loss(model(x), y, "mean").backward()
    optimizer = sgd(model)
    dp_sgd_step(model, optimizer, 1.0, 0.1, BATCH)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="were already noised and stepped on by dp_sgd_step") as refused:
        dp_sgd_step(model, optimizer, 1.0, 0.1, BATCH)
    assert "call optimizer.zero_grad() and run a new clipped backward first" in str(refused.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with per_sample(model, max_grad_norm=0.1):  # a new clipped backward without zero_grad(): stale
        batch_loss(model(x), y, "mean").backward()
    with pytest.raises(RuntimeError, match="were not zeroed before the clipped backward"):
        dp_sgd_step(model, optimizer, 1.0, 0.1, BATCH)
    optimizer.zero_grad()
    with per_sample(model, max_grad_norm=0.1):
        batch_loss(model(x), y, "mean").backward()
    dp_sgd_step(model, optimizer, 1.0, 0.1, BATCH)  # zeroed, clipped again: a new step


def test_a_threshold_other_than_the_clipping_one_is_refused() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=0.1):
        batch_loss(model(x), y, "mean").backward()
    with pytest.raises(RuntimeError, match="clipped with max_grad_norm=0.1, not 1.0") as refused:
        dp_sgd_step(model, sgd(model), 1.0, 1.0, BATCH)
    assert str(refused.value).endswith("pass max_grad_norm=0.1, or clip with 1.0")


def test_gradients_left_from_an_unclipped_block_are_named_as_the_cause() -> None:
    # the first DP-SGD example of docs/per_sample.md, before it zeroed the gradients between its blocks
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="mean"):  # per-sample gradients, no clipping
        batch_loss(model(x), y, "mean").backward()
    with per_sample(model, loss_reduction="sum", max_grad_norm=1.0):
        batch_loss(model(x), y, "sum").backward()
    with pytest.raises(RuntimeError) as refused:
        dp_sgd_step(model, sgd(model), 1.0, 1.0, BATCH, loss_reduction="mean")
    message = str(refused.value)
    assert (
        "layers.0.weight, layers.0.bias, layers.1.weight, layers.1.bias, layers.2.weight, layers.2.bias"
        in message
    )
    assert "were not zeroed before the clipped backward" in message and "changed after" not in message
    assert message.endswith("call optimizer.zero_grad() before the per_sample block")


def test_sums_clipped_by_different_rules_are_named_as_the_cause() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=0.1):
        batch_loss(model(x), y, "sum").backward()
    with per_sample(model, loss_reduction="sum", max_grad_norm=0.2):
        batch_loss(model(x), y, "sum").backward()
    with pytest.raises(RuntimeError, match="were clipped by per_sample blocks with different rules"):
        dp_sgd_step(model, sgd(model), 1.0, 0.1, BATCH)


def test_a_parameter_without_gradient_is_named_as_the_cause() -> None:
    model = make_mlp()
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=0.1):
        batch_loss(model(x), y, "sum").backward()
    model.layers[1].weight.grad = None
    with pytest.raises(
        RuntimeError, match=r"the gradients of layers\.1\.weight are None \(no backward reached"
    ):
        dp_sgd_step(model, sgd(model), 1.0, 0.1, BATCH)


def test_means_over_different_batch_sizes_are_refused() -> None:
    model = make_mlp()
    (x1, y1), (x2, y2) = make_data((BATCH,)), make_data((3,))
    with per_sample(model, loss_reduction="mean", max_grad_norm=0.1):
        batch_loss(model(x1), y1, "mean").backward()
        batch_loss(model(x2), y2, "mean").backward()
    with pytest.raises(RuntimeError, match=r"batches of \[3, 5\] samples"):
        dp_sgd_step(model, sgd(model), 1.0, 0.1, BATCH + 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_virtual_batches_are_one_logical_batch(reduction: str) -> None:
    # Two backward calls in one block (sum) or equal halves (mean): the clipped sum of all
    # samples, noised once, as one backward over the whole batch would give.
    model, clip = make_mlp("relu"), 0.05
    x, y = make_data((2 * BATCH,))
    expected = clipped_reference(loop_grads(model, x, y, "sum"), clip, "sum")
    with per_sample(model, loss_reduction=reduction, max_grad_norm=clip):
        for part in (slice(0, BATCH), slice(BATCH, 2 * BATCH)):
            batch_loss(model(x[part]), y[part], reduction).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_sgd_step(model, optimizer, 0.0, clip, 2 * BATCH, loss_reduction="mean")
    for p, g in zip(model.parameters(), expected, strict=True):
        assert_close(p.grad, g / (2 * BATCH), TOL, "averaged clipped sum")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_step_equals_opacus_dp_optimizer(reduction: str) -> None:
    # Opacus: GradSampleModule + DPOptimizer on the native twin, the same noise generator seed.
    opacus = pytest.importorskip("opacus")
    model, clip, sigma = make_mlp("tanh"), 0.2, 1.3
    x, y = make_data((BATCH,))
    twin = model.to_sequential()
    gsm = opacus.GradSampleModule(twin, loss_reduction=reduction)
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(twin.parameters(), lr=0.5),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=BATCH,
        loss_reduction=reduction,
        generator=torch.Generator().manual_seed(7),
    )
    batch_loss(gsm(x), y, reduction).backward()
    optimizer.step()
    with per_sample(model, loss_reduction=reduction, max_grad_norm=clip):
        batch_loss(model(x), y, reduction).backward()
    dp_sgd_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        sigma,
        clip,
        BATCH,
        torch.Generator().manual_seed(7),
    )
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        # Opacus clips by C / (‖g_b‖ + 1e-6), this package by exactly C / ‖g_b‖: 1e-6 relative.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_an_empty_poisson_batch_steps_with_noise_alone() -> None:
    model, clip, sigma = make_mlp(), 0.5, 2.0
    x, y = make_data((0,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=clip):
        batch_loss(model(x), y, "sum").backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_sgd_step(model, optimizer, sigma, clip, 4, torch.Generator().manual_seed(0), loss_reduction="mean")
    generator = torch.Generator().manual_seed(0)
    for p, b in zip(model.parameters(), before, strict=True):
        noise = torch.randn(p.shape, generator=generator, dtype=DTYPE)
        assert_close(p.detach(), b - sigma * clip * noise / 4, TOL, "noise-only step")


def run(*args: str, torchrun: bool = False) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [
        *(launcher if torchrun else [sys.executable]),
        str(ROOT / "tests" / "firstorder" / "_dp_distributed.py"),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_take_the_one_process_step(tmp_path: Path) -> None:
    # Same global batches, the noise drawn once (rank 0) with the same generator: equal parameters.
    run(str(tmp_path / "one.pt"))
    run(str(tmp_path / "two.pt"), torchrun=True)
    run(str(tmp_path / "ddp.pt"), "ddp-no-sync", torchrun=True)
    run(str(tmp_path / "averaged.pt"), "ddp", torchrun=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    for name in ("two", "ddp"):
        other = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-12)
    refusal = torch.load(tmp_path / "averaged.pt", weights_only=True)
    assert isinstance(refusal, str) and "DDP's averaging" in refusal
