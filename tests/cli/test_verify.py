"""The verify command: passes on good models, fails on a broken σ', and its δ norms are the chain rule's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_backprop import BackpropMLP
from torch_backprop.activations import Activation
from torch_backprop.cli import main
from torch_backprop.cli.verify import delta_norms, output_deltas
from torch_backprop.core import activations


@pytest.mark.parametrize(
    "options",
    [
        ["--sizes", "12,16,5"],
        ["--sizes", "10,8,8,3", "--activation", "tanh", "--show-deltas"],
        ["--sizes", "6,7,9,4", "--activation", "gelu,sigmoid", "--no-bias", "--dtype", "float32"],
        ["--sizes", "5,6,2", "--activation", "softplus", "--output-activation", "sigmoid", "--show-deltas"],
        ["--sizes", "784,256,10", "--batch-size", "4", "--show-deltas"],
    ],
    ids=[
        "relu-depth2",
        "tanh-depth3-deltas",
        "gelu-sigmoid-nobias-float32",
        "softplus-sigmoid-out",
        "mnist-shape",
    ],
)
def test_verify_passes_on_good_models(options, capsys):
    assert main(["verify", *options]) == 0
    out = capsys.readouterr().out
    depth = len(options[1].split(",")) - 1
    for k in range(depth):
        assert f"∂W^({k})" in out
    assert "∂x" in out and "gradcheck (float64" in out and "passed" in out and "verify: OK" in out
    if "--show-deltas" in options:
        for k in range(1, depth + 1):
            assert f"δ^({k})" in out


def _broken_tanh() -> Activation:
    # σ'(z) should be 1 - h²; this "forgets" the square, so only the manual backward is wrong
    # (the native twin's nn.Tanh differentiates correctly).
    return Activation("tanh", torch.tanh, lambda h: 1 - h, "h", module=nn.Tanh)


def test_verify_fails_on_a_broken_backward(monkeypatch, capsys):
    monkeypatch.setitem(activations._REGISTRY, "tanh", _broken_tanh)
    assert main(["verify", "--sizes", "8,6,3", "--activation", "tanh", "--show-deltas"]) == 1
    out = capsys.readouterr().out
    assert "gradients: MISMATCH" in out and "deltas: MISMATCH" in out
    assert "gradcheck" in out and "FAILED" in out and "verify: FAILED" in out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sizes", "8"], "argument --sizes: expected at least 2 sizes such as 784,256,10, got '8'"),
        (["--sizes", "3,0,2"], "argument --sizes: expected positive sizes (0 is not), got '3,0,2'"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
        (["--activation", "nope"], "argument --activation: unknown activation 'nope'"),
    ],
    ids=["one-size", "zero-size", "batch", "activation"],
)
def test_verify_refuses_bad_values_in_one_line(options, message, monkeypatch, capsys):
    monkeypatch.setattr(BackpropMLP, "__init__", _no_model)
    with pytest.raises(SystemExit) as exited:
        main(["verify", *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"torch-backprop verify: {message}")
    assert err.endswith(" (see torch-backprop verify --help)\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--sizes", "8,6,6,3", "--activation", "tanh,relu,relu"],
            "--activation expected 1 name or 2 (one per hidden layer of --sizes 8,6,6,3), got 3: "
            "tanh,relu,relu",
        ),
        (
            ["--sizes", "2,3", "--activation", "relu"],
            "--activation sets the hidden layers' activation, but --sizes 2,3 has none",
        ),
    ],
    ids=["list-length", "no-hidden-layer"],
)
def test_verify_refuses_activations_that_do_not_fit_the_sizes(options, message, monkeypatch, capsys):
    monkeypatch.setattr(BackpropMLP, "__init__", _no_model)
    assert main(["verify", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torch-backprop verify: {message}") and err.count("\n") == 1


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the options were checked")


def test_verify_without_hidden_layers_runs_with_its_output_activation(capsys):
    assert main(["verify", "--sizes", "2,3", "--output-activation", "tanh", "--no-gradcheck"]) == 0
    assert "activations [tanh]" in capsys.readouterr().out


def test_delta_norms_equal_an_independent_hand_written_chain_rule():
    torch.manual_seed(0)
    model = BackpropMLP([5, 7, 6, 3], activation="tanh", dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)

    def loss_fn(output):
        return 0.5 * ((output - target) ** 2).sum()  # the slides' Q(h - y)

    manual, native = delta_norms(model, x, loss_fn)
    # Independent reference: δ^(l) = ∂Q/∂z^(l) by autograd on a forward written out by hand.
    h, z_list = x.clone().requires_grad_(), []
    for k, layer in enumerate(model.layers):
        z = h @ layer.weight.detach().T + layer.bias.detach()
        z.retain_grad()
        z_list.append(z)
        h = torch.tanh(z) if k < len(model.layers) - 1 else z
    loss_fn(h).backward()
    for k, z in enumerate(z_list):
        torch.testing.assert_close(manual[k], z.grad, msg=f"delta^({k + 1}), manual")
        torch.testing.assert_close(native[k], z.grad, msg=f"delta^({k + 1}), native")
    assert all(p.grad is None for p in model.parameters())


def test_output_deltas_are_the_slides_bp1_in_closed_form():
    """δ^(L) of the fused node equals (softmax(h) - onehot(y)) / N ⊙ σ'_L and 2 (h - y) / (N C) ⊙ σ'_L."""
    torch.manual_seed(0)
    model = BackpropMLP([5, 7, 3], activation="tanh", output_activation="tanh", dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    starts = {name: (ours, theirs) for name, ours, theirs in output_deltas(model, x, seed=3)}
    generator = torch.Generator().manual_seed(3)
    y = torch.randint(3, (4,), generator=generator)
    values = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        h = model(x)
    sigma_prime = 1 - h.square()
    expected = {
        "cross_entropy": (torch.softmax(h, 1) - nn.functional.one_hot(y, 3)) / 4 * sigma_prime,
        "mse_loss": 2 * (h - values) / 12 * sigma_prime,
    }
    for name, value in expected.items():
        ours, theirs = starts[name]
        torch.testing.assert_close(ours, value, msg=f"{name}: slides' δ^(L)")
        torch.testing.assert_close(theirs, value, msg=f"{name}: autograd's δ^(L)")
    assert set(starts) == {"cross_entropy", "mse_loss", "binary_cross_entropy_with_logits"}


def test_verify_show_deltas_prints_bp1_both_ways(capsys):
    assert main(["verify", "--sizes", "6,8,4", "--show-deltas", "--no-gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "slides' BP1" in out and "binary_cross_entropy_with_logits" in out
