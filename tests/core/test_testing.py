"""The checking helpers: compare_gradients, assert_gradients_match, and the conventions verify shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_backprop import BackpropMLP
from torch_backprop.testing import (
    assert_gradients_match,
    compare_gradients,
    format_table,
    seeded_loss,
    tolerances,
)


def test_compare_gradients_reports_every_tensor():
    model = BackpropMLP([4, 5, 2], dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    rows = compare_gradients(model, model.to_sequential(), x)
    assert [r.name for r in rows] == [
        "output",
        "input[0]",
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    assert all(r.max_abs < 1e-12 and r.max_rel < 1e-12 for r in rows)
    assert rows[2].shape == (5, 4)


def test_compare_gradients_measures_a_known_difference():
    model = BackpropMLP([4, 2], "identity", dtype=torch.float64)
    reference = model.to_sequential()
    with torch.no_grad():
        reference[0].bias += 0.5  # output off by exactly 0.5; gradients unchanged
    rows = {r.name: r for r in compare_gradients(model, reference, torch.randn(3, 4, dtype=torch.float64))}
    assert rows["output"].max_abs == pytest.approx(0.5)
    assert rows["layers.0.weight"].max_abs == 0


def test_assert_gradients_match_passes_and_fails_with_a_table():
    model = BackpropMLP([4, 5, 2], "tanh")
    x = torch.randn(3, 4)
    assert_gradients_match(model, model.to_sequential(), x)
    wrong = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))  # other weights
    with pytest.raises(AssertionError, match=r"(?s)mismatched: output.*layers.0.weight.*max abs err"):
        assert_gradients_match(model, wrong, x)


def test_parameter_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="4 trainable parameters but reference has 2"):
        compare_gradients(BackpropMLP([4, 5, 2]), nn.Linear(4, 2), torch.randn(3, 4))


def test_seeded_loss_backpropagates_its_fixed_random_weights():
    output = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(seeded_loss(7)(output), output)
    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(grad, expected)
    (other,) = torch.autograd.grad(seeded_loss(8)(output), output)
    assert not torch.equal(other, grad)


def test_tolerances_are_torch_testings_defaults_unless_given():
    # The documented defaults of torch.testing.assert_close.
    assert tolerances(torch.float64) == (1e-7, 1e-7)
    assert tolerances(torch.float32) == (1.3e-6, 1e-5)
    assert tolerances(torch.bfloat16) == (1.6e-2, 1e-5)
    assert tolerances(torch.float16) == (1e-3, 1e-5)
    assert tolerances(torch.float64, rtol=0.5) == (0.5, 1e-7)  # each missing one filled alone
    assert tolerances(torch.float32, atol=0.25) == (1.3e-6, 0.25)


def test_format_table_aligns_and_underlines():
    table = format_table([["tensor", "shape", "err"], ["∂W^(0)", "(5, 4)", "1.0e-03"], ["∂x", "(3,)", "2"]])
    assert table.splitlines() == [
        "tensor  shape       err",
        "------  ------  -------",
        "∂W^(0)  (5, 4)  1.0e-03",
        "∂x      (3,)          2",
    ]


def test_a_mismatch_under_active_dropout_hints_at_eval():
    torch.manual_seed(0)
    model = BackpropMLP([6, 5, 3], dropout=0.5)
    x = torch.randn(8, 6)
    with pytest.raises(AssertionError, match=r"hint: dropout is active.*call \.eval\(\)"):
        assert_gradients_match(model, model.to_sequential(), x)
    errors = assert_gradients_match(model.eval(), model.to_sequential(), x)  # the hint's advice works
    assert all(e.max_abs <= 1e-5 for e in errors)


def test_a_mismatch_without_dropout_gives_no_hint():
    model = BackpropMLP([6, 5, 3])
    reference = BackpropMLP([6, 5, 3]).to_sequential()  # other weights
    with pytest.raises(AssertionError) as caught:
        assert_gradients_match(model, reference, torch.randn(4, 6))
    assert "hint" not in str(caught.value)
