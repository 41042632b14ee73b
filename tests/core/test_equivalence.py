"""The gradient-equivalence grid: BackpropMLP against native autograd on its twin (to_sequential)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_native
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_backprop import BackpropMLP, available_activations, get_activation
from torch_backprop.core.phases import dropout_masks

# Widths per depth, each with a width-1 layer somewhere (hidden or output).
SIZES = {
    1: [4, 1],
    2: [5, 1, 3],
    3: [3, 6, 1, 2],
    4: [6, 4, 1, 5, 1],
    5: [2, 7, 3, 1, 4, 3],
}
ACTIVATIONS = [
    "identity",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "gelu_tanh",
    "silu",
    "sigmoid",
    "tanh",
    "softplus",
]


def test_grid_covers_every_registered_activation():
    assert set(ACTIVATIONS) == set(available_activations())


def _grid():
    for activation in ACTIVATIONS:
        for depth in SIZES:
            for bias in (True, False):
                for output in (None, activation):
                    ident = f"{activation}-depth{depth}-{'bias' if bias else 'nobias'}-out_{output or 'none'}"
                    yield pytest.param(activation, depth, bias, output, id=ident)


@pytest.mark.parametrize("activation,depth,bias,output_activation", list(_grid()))
def test_grid_float64(activation, depth, bias, output_activation):
    model = BackpropMLP(
        SIZES[depth], activation, output_activation=output_activation, bias=bias, dtype=torch.float64
    )
    x = torch.randn(7, SIZES[depth][0], dtype=torch.float64, requires_grad=True)
    assert_matches_native(model, x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [1, 3])
def test_grid_float32(activation, depth):
    model = BackpropMLP(SIZES[depth], activation, output_activation="tanh", dtype=torch.float32)
    x = torch.randn(16, SIZES[depth][0], requires_grad=True)
    assert_matches_native(model, x)


def test_float32_wide_layers():
    # Wider layers sum over more terms: the float32 tolerance must still hold.
    model = BackpropMLP([784, 256, 128, 10])
    assert_matches_native(model, torch.randn(64, 784))


@pytest.mark.parametrize(
    "shape",
    [(6, 5), (5,), (3, 4, 5), (0, 5), (2, 0, 5), (2, 3, 2, 5)],
    ids=["B-F", "F", "A-B-F", "empty-B", "A-empty-F", "A-B-C-F"],
)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["x_grad", "x_nograd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_input_shapes(shape, requires_grad, dtype):
    model = BackpropMLP([5, 4, 3], "tanh", dtype=dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=requires_grad)
    assert_matches_native(model, x)
    assert model(x).shape == (*shape[:-1], 3)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_input(layout):
    model = BackpropMLP([5, 4, 3], "gelu", dtype=torch.float64)
    base = torch.randn(5, 12, dtype=torch.float64)
    x = {
        "transposed": base[:, :6].t(),  # (6, 5), column-major
        "strided": torch.randn(6, 10, dtype=torch.float64)[:, ::2],
        "expanded": torch.randn(1, 5, dtype=torch.float64).expand(6, 5),
    }[layout]
    assert not x.is_contiguous()
    assert_matches_native(model, x.requires_grad_())


@pytest.mark.parametrize("frozen", [(0,), (1,), (2,), (0, 1), (0, 2), (0, 1, 2)], ids=str)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_nograd"])
def test_frozen_layers(frozen, x_grad):
    model = BackpropMLP([4, 5, 6, 3], "sigmoid", dtype=torch.float64)
    for k in frozen:
        model.layers[k].requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
    if len(frozen) == 3 and not x_grad:
        assert not model(x).requires_grad
        return
    assert_matches_native(model, x)


def test_frozen_bias_only():
    model = BackpropMLP([4, 5, 3], "elu", dtype=torch.float64)
    model.layers[0].bias.requires_grad_(False)
    model.layers[1].weight.requires_grad_(False)
    assert_matches_native(model, torch.randn(5, 4, dtype=torch.float64))


def test_frozen_layers_get_no_gradient():
    model = BackpropMLP([4, 5, 3], dtype=torch.float64)
    model.layers[0].requires_grad_(False)
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert model.layers[0].weight.grad is None and model.layers[0].bias.grad is None
    assert model.layers[1].weight.grad is not None


def test_per_layer_activation_list():
    model = BackpropMLP(
        [3, 4, 4, 4, 2], ["relu", "tanh", "gelu"], output_activation="sigmoid", dtype=torch.float64
    )
    assert [a.name for a in model.activations] == ["relu", "tanh", "gelu", "sigmoid"]
    assert_matches_native(model, torch.randn(5, 3, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize(
    "activation",
    [
        get_activation("leaky_relu", negative_slope=0.2),
        get_activation("leaky_relu", negative_slope=-0.5),  # σ' then comes from z, not h
        get_activation("leaky_relu", negative_slope=0.0),
        get_activation("elu", alpha=0.5),
        get_activation("elu", alpha=-1.0),
        get_activation("softplus", beta=2.0, threshold=1.0),
        torch.nn.LeakyReLU(0.3),
        torch.nn.GELU(approximate="tanh"),
    ],
    ids=str,
)
def test_parametrised_activations(activation):
    model = BackpropMLP([3, 6, 6, 2], activation, output_activation=activation, dtype=torch.float64)
    assert_matches_native(model, torch.randn(8, 3, dtype=torch.float64, requires_grad=True))


def test_relu_at_exact_zero_matches_native():
    # σ'(0) for ReLU is 0 in native autograd (threshold_backward); with biases zero and inputs zero
    # every pre-activation is exactly 0.
    model = BackpropMLP([3, 4, 2], "relu", dtype=torch.float64)
    torch.nn.init.zeros_(model.layers[0].bias)
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    assert_matches_native(model, x)


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softplus"])
def test_dropout_in_training_matches_native_with_same_seed(activation, recompute):
    # nn.Dropout draws its mask with bernoulli_(1 - p) on a tensor of the hidden shape, and so does
    # BackpropMLP, so the same seed gives the same masks on the CPU.
    model = BackpropMLP(
        [6, 8, 8, 3], activation, dropout=0.4, recompute=recompute, dtype=torch.float64
    ).train()
    twin = model.to_sequential()
    x = torch.randn(10, 6, dtype=torch.float64)
    upstream = torch.randn(10, 3, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)
    grads = torch.autograd.grad(out, list(model.parameters()), upstream)
    torch.manual_seed(3)
    ref = twin(x)
    ref_grads = torch.autograd.grad(ref, list(twin.parameters()), upstream)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for (name, _), grad, expected in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12, msg=name)
    assert (out != model.eval()(x)).any()  # dropout really was active in training


def test_dropout_inactive_in_eval():
    model = BackpropMLP([6, 50, 40], "relu", dropout=0.5, dtype=torch.float64).eval()
    x = torch.randn(200, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), model(x))
    assert_matches_native(model, x)


def test_dropout_masks_drop_p_and_scale_the_rest():
    masks = dropout_masks(400, [500], 0.3, torch.float64, torch.device("cpu"))
    (mask,) = masks
    assert set(mask.unique().tolist()) == {0.0, 1 / 0.7}
    assert abs((mask == 0).double().mean().item() - 0.3) < 0.01  # 200,000 draws: σ ≈ 0.001


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    batch=st.integers(0, 6),
    data=st.data(),
)
def test_random_architectures(sizes, batch, data):
    depth = len(sizes) - 1
    hidden = data.draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=depth - 1, max_size=depth - 1))
    output = data.draw(st.sampled_from([None, *ACTIVATIONS]))
    bias = data.draw(st.booleans())
    lead = data.draw(st.sampled_from([(batch,), (), (2, batch)]))
    model = BackpropMLP(sizes, hidden, output_activation=output, bias=bias, dtype=torch.float64)
    x = torch.randn(*lead, sizes[0], dtype=torch.float64, requires_grad=data.draw(st.booleans()))
    assert_matches_native(model, x)
