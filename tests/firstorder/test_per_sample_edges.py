"""Every path off per_sample's main road is exact or a clear error, never a silently wrong result."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from _per_sample_helpers import (
    BATCH,
    DTYPE,
    SIZES,
    TOL,
    batch_loss,
    flat_norms,
    loop_grads,
    make_data,
    make_model,
    ordinary_grads,
)
from conftest import assert_close

from torch_backprop import per_sample


def no_gradient_written(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was written"
        assert not hasattr(p, "grad_sample"), f"{name}.grad_sample was written"


def test_a_double_backward_in_the_loss_is_refused_before_any_gradient() -> None:
    # ℓ_b = CE_b + 0.7 ‖∂CE_b/∂x_b‖²: an input-gradient penalty (create_graph=True inside the loss).
    model = make_model("tanh")
    x, y = make_data((BATCH,))
    x.requires_grad_(True)
    with per_sample(model, loss_reduction="sum", max_grad_norm=0.05) as ps:
        with pytest.raises(RuntimeError, match="double backward"):
            ce = F.cross_entropy(model(x), y, reduction="sum")
            (grad_x,) = torch.autograd.grad(ce, x, create_graph=True)
            (ce + 0.7 * grad_x.square().sum()).backward()
    no_gradient_written(model)
    assert ps.norms is None


def test_forward_before_the_block_backward_inside_is_refused() -> None:
    model = make_model("relu")
    x, y = make_data((8,))
    loss = F.cross_entropy(model(x), y, reduction="sum")
    with per_sample(model, loss_reduction="sum", max_grad_norm=1e-3) as ps:
        with pytest.raises(RuntimeError, match="forward ran before the block"):
            loss.backward()
    no_gradient_written(model)
    assert ps.norms is None


def test_the_model_called_twice_before_one_backward_is_refused() -> None:
    model = make_model("sigmoid")
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=0.1) as ps:
        loss = batch_loss(model(x), y, "sum") + batch_loss(model(x.flip(0)), y, "sum")
        with pytest.raises(RuntimeError, match="2 forward calls"):
            loss.backward()
    no_gradient_written(model)
    assert ps.norms is None


@pytest.mark.parametrize("clip", [None, 0.1], ids=["grad_sample", "clipped"])
def test_a_parameter_used_outside_the_model_is_refused(clip: float | None) -> None:
    # Weight decay written into the loss: the per-sample gradient no longer is the recursion's.
    model = make_model("tanh")
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=clip):
        loss = batch_loss(model(x), y, "sum") + 0.1 * model.layers[1].weight.square().sum()
        with pytest.raises(RuntimeError, match="layers.1.weight also receives gradient"):
            loss.backward()
    assert not hasattr(model.layers[1].weight, "grad_sample")


def test_a_second_backward_through_the_same_forward_is_refused() -> None:
    model = make_model("tanh")
    x, y = make_data((BATCH,))
    with per_sample(model, loss_reduction="sum") as ps:
        loss = batch_loss(model(x), y, "sum")
        loss.backward(retain_graph=True)
        first = [p.grad_sample.clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="same forward call"):
            loss.backward()
    for p, g in zip(model.parameters(), first, strict=True):
        assert_close(p.grad_sample, g, TOL, "grad_sample after the refused backward")
    assert ps.norms.shape == (BATCH,)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_taken_inside_a_block_is_a_plain_model(how: str) -> None:
    model = make_model("relu")
    x, y = make_data((8,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=1e-3):
        if how == "deepcopy":
            twin_copy = copy.deepcopy(model)
        elif how == "pickle":
            twin_copy = pickle.loads(pickle.dumps(model))
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            twin_copy = torch.load(buffer, weights_only=False)
    assert twin_copy.backward_phase is None
    batch_loss(twin_copy(x), y, "sum").backward()
    for p, expected in zip(twin_copy.parameters(), ordinary_grads(model, x, y, "sum"), strict=True):
        assert_close(p.grad, expected, TOL, "gradient of the copy (unclipped, as native)")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_time_first_input_with_batch_first_false(reduction: str) -> None:
    # (T, B, F): the sample is the second dimension, as Opacus's batch_first=False says.
    model = make_model("gelu")
    steps, batch = 3, 4
    x = torch.randn(steps, batch, SIZES[0], dtype=DTYPE)
    y = torch.randint(SIZES[-1], (steps, batch))
    per_sample_first = loop_grads(model, x.transpose(0, 1), y.transpose(0, 1), reduction)
    with per_sample(model, loss_reduction=reduction, batch_first=False) as ps:
        batch_loss(model(x), y, reduction).backward()
    for (name, p), expected in zip(model.named_parameters(), per_sample_first, strict=True):
        assert p.grad_sample.shape == (batch, *p.shape)
        assert_close(p.grad_sample, expected, TOL, f"{name}.grad_sample")
    assert_close(ps.norms, flat_norms(per_sample_first), TOL, "norms")


def test_time_first_clipping_matches_the_loop() -> None:
    model = make_model("tanh")
    steps, batch, clip = 2, 5, 0.05
    x = torch.randn(steps, batch, SIZES[0], dtype=DTYPE)
    y = torch.randint(SIZES[-1], (steps, batch))
    loop = loop_grads(model, x.transpose(0, 1), y.transpose(0, 1), "sum")
    factor = (clip / flat_norms(loop)).clamp(max=1.0)
    with per_sample(model, loss_reduction="sum", max_grad_norm=clip, batch_first=False):
        batch_loss(model(x), y, "sum").backward()
    for p, g in zip(model.parameters(), loop, strict=True):
        assert_close(p.grad, torch.einsum("b,b...->...", factor, g), TOL, "clipped sum")


def test_batch_first_false_needs_a_time_dimension() -> None:
    model = make_model()
    with per_sample(model, batch_first=False), pytest.raises(ValueError, match="batch_first=False"):
        model(torch.randn(BATCH, SIZES[0], dtype=DTYPE))


def test_hooks_on_a_layer_refuse_per_sample() -> None:
    model = make_model()
    model.layers[0].register_forward_hook(lambda module, args, output: None)
    x, _ = make_data((BATCH,))
    with per_sample(model), pytest.raises(RuntimeError, match=r"layers\[0\] has forward hooks"):
        model(x)


@pytest.mark.parametrize("transform", ["vmap", "compile"])
def test_transforms_inside_the_block_are_refused(transform: str) -> None:
    model = make_model()
    x, _ = make_data((BATCH,))
    with per_sample(model), pytest.raises(RuntimeError, match="torch.func transforms or torch.compile"):
        if transform == "vmap":
            torch.func.vmap(model)(x[:, None])
        else:
            torch.compile(model, backend="eager", fullgraph=True)(x)


def test_an_exception_between_forward_and_backward_leaves_nothing_behind() -> None:
    model = make_model()
    x, y = make_data((BATCH,))
    with pytest.raises(KeyError), per_sample(model, max_grad_norm=1.0):
        loss = batch_loss(model(x), y, "mean")
        raise KeyError("user code failed")
    assert model.backward_phase is None
    with pytest.raises(RuntimeError, match="after its with block closed"):
        loss.backward()
    no_gradient_written(model)
