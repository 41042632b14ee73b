"""BackPACK's first-order quantities: extend() on a BackpropMLP, and per_sample's own, against BackPACK.

The cases are BackPACK's Linear settings (``test/extensions/firstorder/firstorder_settings.py``:
the example, classification and regression, one to three additional input dimensions), with each
``Sequential`` of ``Linear``/activation layers replaced by a BackpropMLP; the reference is BackPACK
on the native twin.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from torch import nn

from torch_backprop import BackpropMLP, per_sample

backpack = pytest.importorskip("backpack")
from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance  # noqa: E402

DTYPE = torch.float64
EXACT = (1e-12, 1e-12)
QUANTITIES = ("grad_batch", "batch_l2", "sum_grad_squared", "variance")


def classification(shape: tuple[int, ...], classes: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(classes, shape)


def regression(shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: torch.rand(*shape, dtype=DTYPE)


CE, MSE = nn.CrossEntropyLoss, nn.MSELoss
# (id, input shape, sizes, hidden activation, flatten, loss, reduction, target)
SETTINGS = [
    ("example", (3, 10), [10, 5], "identity", False, CE, "sum", classification((3,), 5)),
    ("linear-linear", (3, 10), [10, 7, 5], "identity", False, CE, "mean", classification((3,), 5)),
    ("linear-relu", (3, 10), [10, 7, 5], "relu", False, CE, "sum", classification((3,), 5)),
    ("linear-sigmoid", (3, 10), [10, 7, 5], "sigmoid", False, MSE, "mean", regression((3, 5))),
    ("one-additional-mse", (3, 4, 5), [5, 3, 2], "identity", False, MSE, "mean", regression((3, 4, 2))),
    ("two-additional-mse", (3, 4, 2, 5), [5, 3, 2], "sigmoid", False, MSE, "mean", regression((3, 4, 2, 2))),
    ("three-additional-mse", (3, 4, 2, 3, 5), [5, 3, 2], "identity", False, MSE, "sum",
     regression((3, 4, 2, 3, 2))),
    ("one-additional-ce", (3, 4, 5), [5, 3, 2], "identity", True, CE, "mean", classification((3,), 8)),
    ("two-additional-ce", (3, 4, 2, 5), [5, 3, 2], "sigmoid", True, CE, "mean", classification((3,), 16)),
    ("three-additional-ce", (3, 4, 2, 3, 5), [5, 3, 2], "relu", True, CE, "sum", classification((3,), 48)),
]  # fmt: skip


def build(setting: tuple) -> tuple[BackpropMLP, nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    _, shape, sizes, activation, flatten, loss, reduction, target = setting
    torch.manual_seed(0)
    mlp = BackpropMLP(sizes, activation=activation, dtype=DTYPE)
    x = torch.rand(*shape, dtype=DTYPE)
    return mlp, (nn.Flatten() if flatten else nn.Identity()), x, target(), loss(reduction=reduction)


def backpack_quantities(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: nn.Module) -> list[dict]:
    net, loss = backpack.extend(net), backpack.extend(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # containers without a first-order extension
        with backpack.backpack(BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()):
            loss(net(x), y).backward()
    return [{name: getattr(p, name) for name in QUANTITIES} | {"grad": p.grad} for p in net.parameters()]


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_backpack_extend_on_a_backprop_mlp_matches_the_twin(setting: tuple) -> None:
    mlp, tail, x, y, loss = build(setting)
    twin = nn.Sequential(mlp.to_sequential(), tail)
    ours = backpack_quantities(nn.Sequential(mlp, tail), x, y, loss)
    reference = backpack_quantities(twin, x, y, loss)
    for k, (q, ref) in enumerate(zip(ours, reference, strict=True)):
        for name in ref:
            assert_close(q[name], ref[name], EXACT, f"parameter {k}: {name}")


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_per_sample_first_order_quantities_match_backpack(setting: tuple) -> None:
    mlp, tail, x, y, loss = build(setting)
    reference = backpack_quantities(nn.Sequential(mlp.to_sequential(), tail), x, y, loss)
    flags = dict.fromkeys(QUANTITIES, True)
    with per_sample(mlp, loss_reduction=loss.reduction, grad_sample=False, **flags):
        loss(tail(mlp(x)), y).backward()
    for k, (p, ref) in enumerate(zip(mlp.parameters(), reference, strict=True)):
        assert not hasattr(p, "grad_sample")
        assert_close(p.grad, ref["grad"], EXACT, f"parameter {k}: grad")
        for name in QUANTITIES:
            assert_close(getattr(p, name), ref[name], EXACT, f"parameter {k}: {name}")


def test_without_grad_batch_no_per_sample_tensor_is_built() -> None:
    # SumGradSquared and Variance for 2-D input come from (δ²)ᵀ(h²): watch the allocations.
    mlp = BackpropMLP([64, 128, 10], dtype=torch.float32)
    x, y = torch.randn(256, 64), torch.randint(10, (256,))
    per_sample_bytes = 256 * 128 * 64 * 4
    with per_sample(mlp, grad_sample=False, sum_grad_squared=True, variance=True, batch_l2=True):
        with torch.profiler.profile(profile_memory=True) as profile:
            nn.functional.cross_entropy(mlp(x), y).backward()
    largest = max((event.cpu_memory_usage for event in profile.events()), default=0)
    assert 0 < largest < per_sample_bytes / 4
    assert mlp.layers[0].weight.sum_grad_squared.shape == (128, 64)
