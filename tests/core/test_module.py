"""BackpropMLP as an nn.Module: construction, conversion, serialisation, and its errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_matches_native
from torch import nn

from torch_backprop import BackpropMLP, available_activations, get_activation


def test_layers_are_plain_linear_with_native_initialisation():
    torch.manual_seed(5)
    model = BackpropMLP([7, 5, 3])
    torch.manual_seed(5)
    native = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    assert isinstance(model.layers, nn.ModuleList)
    assert all(type(layer) is nn.Linear for layer in model.layers)
    for p, q in zip(model.parameters(), native.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_keys_and_round_trip_with_weights_only():
    model = BackpropMLP([4, 6, 2], "tanh")
    assert list(model.state_dict()) == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    assert model.state_dict()["layers.0.weight"].shape == (6, 4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = BackpropMLP([4, 6, 2], "tanh")
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 4)
    assert torch.equal(model(x), other(x))


def test_whole_model_pickles_and_deepcopies():
    model = BackpropMLP(
        [4, 6, 2], get_activation("leaky_relu", negative_slope=0.2), output_activation="sigmoid"
    )
    x = torch.randn(3, 4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        assert other.activations == model.activations
        assert torch.equal(other(x), model(x))
        assert other.layers[0].weight.data_ptr() != model.layers[0].weight.data_ptr()


def test_optimizer_and_to_and_reset_parameters():
    model = BackpropMLP([4, 6, 2]).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.layers[0].weight.clone()
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.layers[0].weight)
    model.reset_parameters()
    assert not torch.equal(before, model.layers[0].weight)


def test_factory_kwargs():
    model = BackpropMLP([4, 6, 2], device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in model.parameters())
    meta = BackpropMLP([4, 6, 2], device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_no_bias():
    model = BackpropMLP([4, 6, 2], bias=False, dtype=torch.float64)
    assert all(layer.bias is None for layer in model.layers)
    assert_matches_native(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))


def test_extra_repr_shows_sizes_and_activations():
    text = repr(BackpropMLP([784, 256, 10], "tanh", output_activation="sigmoid", dropout=0.1))
    assert "sizes=[784, 256, 10]" in text and "activations=[tanh, sigmoid]" in text and "dropout=0.1" in text


def test_to_sequential_shares_nothing_and_mirrors_the_structure():
    model = BackpropMLP([4, 6, 5, 2], "gelu", output_activation="sigmoid", dropout=0.2).eval()
    model.layers[1].weight.requires_grad_(False)
    seq = model.to_sequential()
    assert [type(m) for m in seq] == [
        nn.Linear,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
        nn.Sigmoid,
    ]
    assert not seq.training
    assert not seq[3].weight.requires_grad
    seq[0].weight.data.zero_()
    assert model.layers[0].weight.abs().sum() > 0


@pytest.mark.parametrize("name", available_activations())
def test_from_sequential_round_trip(name):
    model = BackpropMLP([4, 6, 5, 2], name, output_activation=name, dtype=torch.float64)
    back = BackpropMLP.from_sequential(model.to_sequential())
    assert back.sizes == model.sizes and back.activations == model.activations
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_from_sequential_of_a_hand_written_stack():
    seq = nn.Sequential(
        nn.Linear(4, 8),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.3),
        nn.Linear(8, 8),
        nn.ELU(0.7),
        nn.Dropout(0.3),
        nn.Linear(8, 3),
    ).double()
    model = BackpropMLP.from_sequential(seq)
    assert model.dropout == 0.3 and model.sizes == [4, 8, 8, 3]
    assert model.activations[0] == get_activation("leaky_relu", negative_slope=0.1)
    assert model.layers[0].weight.dtype == torch.float64
    model.eval()
    seq.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), seq(x))


@pytest.mark.parametrize(
    "seq,error,match",
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
            TypeError,
            "module 1.*BatchNorm1d",
        ),
        (
            nn.Sequential(nn.ReLU(), nn.Linear(4, 2)),
            TypeError,
            "expects nn.Linear first, got ReLU at index 0",
        ),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 2)), ValueError, "Linear 1 takes 4 inputs.*gives 3"),
        (
            nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 2)),
            TypeError,
            "second activation",
        ),
        (
            nn.Sequential(
                nn.Linear(4, 3), nn.Dropout(0.1), nn.Linear(3, 3), nn.Dropout(0.2), nn.Linear(3, 1)
            ),
            ValueError,
            "one dropout rate",
        ),
        (
            nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Dropout(0.1)),
            ValueError,
            "after every hidden layer",
        ),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False)), ValueError, "bias"),
        (nn.Sequential(), ValueError, "at least one nn.Linear"),
    ],
    ids=[
        "unsupported",
        "starts-with-activation",
        "widths",
        "two-activations",
        "two-rates",
        "output-dropout",
        "mixed-bias",
        "empty",
    ],
)
def test_from_sequential_errors(seq, error, match):
    with pytest.raises(error, match=match):
        BackpropMLP.from_sequential(seq)


def test_from_sequential_rejects_non_sequential():
    with pytest.raises(TypeError, match="expects an nn.Sequential, got Linear"):
        BackpropMLP.from_sequential(nn.Linear(3, 2))


# Errors for bad input: raised before any work, nothing modified.


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sizes": [5]}, ValueError, r"at least 2 entries \(in, out\), got \[5\]"),
        ({"sizes": []}, ValueError, "at least 2 entries"),
        ({"sizes": [5, 0, 2]}, ValueError, r"positive integer sizes, got \[5, 0, 2\]"),
        ({"sizes": [5, -3]}, ValueError, "positive integer sizes"),
        ({"sizes": [5, 2.5]}, ValueError, "positive integer sizes"),
        (
            {"sizes": [4, 3], "activation": "swish"},
            ValueError,
            "unknown activation 'swish'; expected one of: .*relu",
        ),
        ({"sizes": [4, 3, 2], "output_activation": "nope"}, ValueError, "unknown activation 'nope'"),
        ({"sizes": [4, 3, 3, 2], "activation": ["relu"]}, ValueError, "list of 2 activations .*got 1"),
        ({"sizes": [4, 3, 2], "dropout": 1.0}, ValueError, r"dropout in \[0, 1\), got 1.0"),
        ({"sizes": [4, 3, 2], "dropout": -0.1}, ValueError, "dropout in"),
        ({"sizes": [4, 3, 2], "activation": 3}, TypeError, "an activation must be"),
        (
            {"sizes": [4, 3, 2], "activation": nn.BatchNorm1d(3)},
            TypeError,
            "unsupported activation module BatchNorm1d",
        ),
    ],
    ids=[
        "one-size",
        "no-sizes",
        "zero",
        "negative",
        "float",
        "unknown",
        "unknown-output",
        "list-length",
        "dropout-1",
        "dropout-neg",
        "activation-type",
        "activation-module",
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BackpropMLP(**kwargs)


def test_unknown_activation_message_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        BackpropMLP([3, 2], "nope")
    for name in available_activations():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "make_input,error,match",
    [
        (lambda: torch.randn(3, 100), ValueError, r"last dimension 784 \(sizes\[0\]\), got 100"),
        (lambda: torch.randn(100), ValueError, "last dimension 784 .*got 100"),
        (lambda: torch.ones(3, 784, dtype=torch.int64), TypeError, "floating-point input .*got torch.int64"),
        (lambda: torch.ones(3, 784, dtype=torch.bool), TypeError, "floating-point input .*got torch.bool"),
        (
            lambda: torch.randn(3, 784, dtype=torch.float64),
            TypeError,
            "dtype torch.float32 .*got torch.float64",
        ),
        (lambda: torch.randn(3, 784, device="meta"), ValueError, "input on cpu .*got input on meta"),
        (lambda: torch.tensor(1.0), ValueError, "0-d tensor"),
        (lambda: [[0.0] * 784], TypeError, "torch.Tensor input, got list"),
    ],
    ids=["last-dim", "last-dim-1d", "int", "bool", "dtype", "device", "scalar", "not-tensor"],
)
def test_forward_errors_name_expected_and_got_and_change_nothing(make_input, error, match):
    model = BackpropMLP([784, 16, 10])
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        model(make_input())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_errors_are_not_asserts():
    # `python -O` strips asserts; the checks must be real exceptions (AssertionError is not one).
    with pytest.raises(ValueError):
        BackpropMLP([784, 10])(torch.randn(2, 3))


class _Double(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrized_and_reassigned_weights_are_the_ones_used():
    # BackpropMLP reads plain layers' parameters from their registry; a parametrized layer
    # (torch.nn.utils.parametrize) must still give its computed weight, and a reassigned
    # parameter must replace the old one.
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = BackpropMLP([5, 4, 3], "tanh", dtype=torch.float64)
    model.layers[1].weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    native = model.to_sequential()
    parametrize.register_parametrization(model.layers[0], "weight", _Double())
    parametrize.register_parametrization(native[0], "weight", _Double())
    assert_matches_native(model, torch.randn(6, 5, dtype=torch.float64), twin=native)


@pytest.mark.parametrize(
    "activation, dropout, bias",
    [("relu", 0.0, True), (["tanh", "identity"], 0.3, True), ("identity", 0.0, False)],
    ids=["relu", "tanh-identity-dropout", "identity-nobias"],
)
def test_state_dict_converts_to_and_from_the_twins_keys(tmp_path, activation, dropout, bias):
    torch.manual_seed(0)
    model = BackpropMLP([5, 4, 3, 2], activation=activation, dropout=dropout, bias=bias)
    twin_state = model.to_sequential().state_dict()  # the reference: the twin's own keys and values
    converted = model.state_dict_to_sequential()
    assert list(converted) == list(twin_state)
    assert all(torch.equal(converted[k], twin_state[k]) for k in twin_state)
    back = model.state_dict_from_sequential(twin_state)
    assert list(back) == list(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    # a saved model.pt into a freshly built twin (other weights): same outputs as the model
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = BackpropMLP([5, 4, 3, 2], activation=activation, dropout=dropout, bias=bias).to_sequential()
    fresh.load_state_dict(
        model.state_dict_to_sequential(torch.load(tmp_path / "model.pt", weights_only=True))
    )
    x = torch.randn(7, 5)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_state_dict_conversion_refuses_foreign_keys():
    model = BackpropMLP([5, 4, 2])
    with pytest.raises(
        ValueError, match=r"expected the state_dict keys of to_sequential\(\).*got \['1.weight'\]"
    ):
        model.state_dict_from_sequential({"0.weight": torch.zeros(4, 5), "1.weight": torch.zeros(2, 4)})
