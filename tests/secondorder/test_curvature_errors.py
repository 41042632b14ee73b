"""curvature refuses every way its backward could go wrong silently, and leaves no stale attributes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _curvature_helpers import LOSSES, assert_relative, make_data, make_model, ours
from torch import nn

from torch_backprop import BackpropMLP, curvature, ggn_vector_product, per_sample
from torch_backprop.activations import Activation
from torch_backprop.secondorder.curvature import QUANTITIES


def attributes(model: nn.Module) -> list[str]:
    return [f"{n}.{q}" for n, p in model.named_parameters() for q in QUANTITIES if hasattr(p, q)]


def untouched(model: BackpropMLP) -> bool:
    """No phase, no hook left behind on the model or its parameters."""
    hooks = model._forward_pre_hooks or model._forward_hooks
    return (
        model.backward_phase is None and not hooks and not any(p._backward_hooks for p in model.parameters())
    )


@pytest.fixture
def case():
    model = make_model("tanh")
    x, y = make_data("ce-mean")
    return model, nn.CrossEntropyLoss(), x, y


def test_forward_before_the_block_raises_at_the_backward(case):
    model, loss_function, x, y = case
    out = model(x)
    with pytest.raises(RuntimeError, match="did not come through the curvature phase"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            loss_function(out, y).backward()
    assert attributes(model) == [] and untouched(model)


def test_backward_after_the_block_raises(case):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="closed before the backward of its latest forward"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            loss = loss_function(model(x), y)
    with pytest.raises(RuntimeError, match="after its with block closed"):
        loss.backward()
    assert attributes(model) == [] and untouched(model)


def test_a_block_without_backward_raises(case):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="no backward went through the block"):
        with curvature(model, loss_function, "kflr"):
            with torch.no_grad():
                model(x)


@pytest.mark.parametrize(
    "loss",
    [
        lambda out, y, lf: F.cross_entropy(out, y),  # a functional loss: the module never sees it
        lambda out, y, lf: nn.CrossEntropyLoss()(out, y),  # another module instance
        lambda out, y, lf: lf(out[:4], y[:4]),  # part of the output
        lambda out, y, lf: lf(out, y) + 0.1 * out.square().sum(),  # an added term in the output
        lambda out, y, lf: 2 * lf(out, y),  # scaled
        lambda out, y, lf: lf(out, y) + lf(out, (y + 1) % 3),  # the module twice, other targets
    ],
    ids=["functional", "other-instance", "slice", "added-term", "scaled", "called-twice"],
)
def test_a_backward_that_is_not_the_watched_loss_raises_and_clears(case, loss):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="was not called on the model's output|is not that of"):
        with curvature(model, loss_function, ["diag_ggn_exact", "kfac"]):
            loss_function(model(x), y).backward()  # a good backward first: its attributes must go
            assert len(attributes(model)) == 12
            loss(model(x), y, loss_function).backward()
    assert attributes(model) == [] and untouched(model)


def test_the_model_used_twice_before_one_backward_raises(case):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="ran forward again before the backward"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            first, second = model(x), model(x)
            (loss_function(first, y) + loss_function(second, y)).backward()
    assert attributes(model) == [] and untouched(model)


def test_per_sample_opened_inside_raises_at_the_forward(case):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="open per_sample first"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            with per_sample(model):
                loss_function(model(x), y).backward()
    assert attributes(model) == [] and untouched(model)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_per_sample_opened_first_composes(case):
    model, loss_function, x, y = case
    expected, _ = ours(model, loss_function, x, y, ["diag_ggn_exact", "kflr"])
    with per_sample(model, loss_reduction="mean"):
        loss_function(model(x), y).backward()
    alone = [p.grad_sample.clone() for p in model.parameters()]
    model.zero_grad()
    with per_sample(model, loss_reduction="mean") as ps:
        with curvature(model, loss_function, ["diag_ggn_exact", "kflr"]):
            loss_function(model(x), y).backward()
    assert ps.norms is not None
    for p, g in zip(model.parameters(), alone, strict=True):
        torch.testing.assert_close(p.grad_sample, g, rtol=1e-12, atol=1e-12)
    for name in expected:
        for p, e in zip(model.parameters(), expected[name], strict=True):
            assert_relative(getattr(p, name), e, name)


def test_blocks_do_not_nest(case):
    model, loss_function, x, y = case
    with pytest.raises(RuntimeError, match="do not nest"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            with curvature(model, loss_function, "kfac"):
                pass
    assert untouched(model)


def test_stale_attributes_are_removed_on_entry(case):
    model, loss_function, x, y = case
    ours(model, loss_function, x, y, "diag_ggn_exact")
    model.layers[0].weight.requires_grad_(False)
    ours(model, loss_function, x, y, "diag_ggn_exact")
    assert not hasattr(model.layers[0].weight, "diag_ggn_exact")  # frozen now: nothing, not the old value


def test_each_backward_replaces_the_attributes(case):
    model, loss_function, x, y = case
    x2, y2 = x[:5].flip(0), y[:5].flip(0)
    expected, _ = ours(model, loss_function, x2, y2, "diag_ggn_exact_batch")
    with curvature(model, loss_function, "diag_ggn_exact_batch") as block:
        loss_function(model(x), y).backward()
        loss_function(model(x2), y2).backward()
    assert block.backward_calls == 2
    for p, e in zip(model.parameters(), expected["diag_ggn_exact_batch"], strict=True):
        assert_relative(p.diag_ggn_exact_batch, e, "latest backward")


def _no_second_derivative() -> Activation:
    return Activation("square", lambda z: z * z, lambda z: 2 * z, "z")


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda m: curvature(m.to_sequential(), nn.MSELoss(), "kflr"),
            TypeError,
            "expects a torch_backprop.BackpropMLP",
        ),
        (lambda m: curvature(m, nn.NLLLoss(), "kflr"), TypeError, "supports the losses"),
        (lambda m: curvature(m, nn.CrossEntropyLoss(reduction="none"), "kflr"), ValueError, "reduction"),
        (lambda m: curvature(m, nn.CrossEntropyLoss(weight=torch.ones(3)), "kflr"), ValueError, "weights"),
        (lambda m: curvature(m, nn.CrossEntropyLoss(label_smoothing=0.1), "kflr"), ValueError, "smoothing"),
        (lambda m: curvature(m, nn.MSELoss(), "diag_ggn"), ValueError, "quantities among"),
        (lambda m: curvature(m, nn.MSELoss(), []), ValueError, "quantities among"),
        (lambda m: curvature(m, nn.MSELoss(), "kfac", mc_samples=0), ValueError, "positive integer"),
        (lambda m: curvature(m, nn.MSELoss(), "kfac", mc_samples=True), ValueError, "positive integer"),
        (lambda m: curvature(m, nn.MSELoss(), "kfac", generator=0), TypeError, "torch.Generator"),
        (
            lambda m: curvature(BackpropMLP([4, 5, 3], _no_second_derivative()), nn.MSELoss(), "diag_h"),
            ValueError,
            "σ''",
        ),
        (lambda m: curvature(m.requires_grad_(False), nn.MSELoss(), "kflr"), ValueError, "trainable"),
    ],
    ids=[
        "sequential",
        "nll-loss",
        "reduction-none",
        "class-weights",
        "label-smoothing",
        "unknown-quantity",
        "no-quantity",
        "mc-zero",
        "mc-bool",
        "generator",
        "no-second-derivative",
        "all-frozen",
    ],
)
def test_bad_arguments_raise_before_any_state_changes(build, error, match):
    model = make_model("tanh")
    with pytest.raises(error, match=match):
        build(model)
    assert untouched(model)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (lambda y: torch.full_like(y, -100), "class targets in"),
        (lambda y: F.one_hot(y, 3).double(), "class-index targets"),
    ],
    ids=["ignore-index", "probabilities"],
)
def test_targets_without_curvature_raise_at_the_loss(case, target, match):
    model, loss_function, x, y = case
    with pytest.raises(ValueError, match=match):
        with curvature(model, loss_function, "diag_ggn_exact"):
            loss_function(model(x), target(y)).backward()
    assert attributes(model) == [] and untouched(model)


def test_input_without_a_batch_or_an_empty_batch_raises(case):
    model, loss_function, x, y = case
    with pytest.raises(ValueError, match="non-empty batch"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            loss_function(model(x[0]), y[0]).backward()
    with pytest.raises(ValueError, match="non-empty batch"):
        with curvature(model, loss_function, "diag_ggn_exact"):
            loss_function(model(x[:0]), y[:0]).backward()


def test_mse_target_of_another_shape_raises():
    model = make_model("tanh")
    x, y = make_data("mse-mean")
    loss_function = nn.MSELoss()
    with (
        pytest.raises(ValueError, match="MSE target in the shape"),
        pytest.warns(UserWarning, match="broadcast"),
    ):
        with curvature(model, loss_function, "kflr"):
            loss_function(model(x), y[:, :1]).backward()  # PyTorch broadcasts the target, with a warning


def test_ggn_vector_product_refuses_bad_vectors_and_dropout():
    model = make_model("tanh")
    x, _ = make_data("ce-mean")
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        ggn_vector_product(model, nn.CrossEntropyLoss(), x, [torch.zeros(2)])
    model = make_model("tanh", dropout=0.5).train()
    vector = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        ggn_vector_product(model, nn.CrossEntropyLoss(), x, vector)


@pytest.mark.parametrize("batch", [1, 4])
def test_nothing_is_written_into_the_parameters(batch):
    # A view of W^(l) (HD3's identity columns) is contiguous for one row: it must not be written into.
    model = make_model("sigmoid", dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_data("ce-mean", batch=batch)
    ours(model, LOSSES["ce-mean"](), x, y, list(QUANTITIES))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_loss_module_called_on_something_else_is_ignored(case):
    # Only calls on the model's output count; a loss on other tensors in the block is not an error.
    model, loss_function, x, y = case
    with curvature(model, loss_function, "diag_ggn_exact"):
        loss_function(torch.randn(7, 3, dtype=x.dtype), y)
        loss_function(model(x), y).backward()
    assert len(attributes(model)) == 6


def test_all_losses_pass_the_gradient_check_in_float32():
    for loss in LOSSES:
        model = make_model("relu").float()
        x, y = make_data(loss)
        x = x.float()
        y = y if loss.startswith("ce") else y.float()
        ours(model, LOSSES[loss](), x, y, "diag_ggn_exact")
