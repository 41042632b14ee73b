"""Hooks on a BackpropMLP's layers fire as on the native twin's, with the same tensors, or it says why not."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOLERANCE, assert_close, run_and_grad
from torch import nn
from torch.nn.utils import parametrize, prune

from torch_backprop import BackpropMLP

DTYPE = torch.float64
TOL = GRAD_TOLERANCE[DTYPE]


def make_pair(**kwargs) -> tuple[BackpropMLP, nn.Sequential]:
    model = BackpropMLP([5, 7, 6, 3], activation="tanh", dtype=DTYPE, **kwargs)
    return model, model.to_sequential()


def linears(twin: nn.Sequential) -> list[nn.Linear]:
    return [m for m in twin if isinstance(m, nn.Linear)]


def fused(output: torch.Tensor) -> bool:
    return "MLPFunction" in type(output.grad_fn).__name__


def assert_same_run(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> None:
    out, grads = run_and_grad(model, x)
    out_twin, grads_twin = run_and_grad(twin, x)
    assert_close(out, out_twin, TOL, "output")
    for k, (g, ref) in enumerate(zip(grads, grads_twin, strict=True)):
        assert_close(g, ref, TOL, f"gradient {k}")


def test_forward_and_backward_hooks_see_the_twins_tensors() -> None:
    model, twin = make_pair()
    seen: dict[str, list[tuple[str, torch.Tensor]]] = {"model": [], "twin": []}
    for key, layers in (("model", list(model.layers)), ("twin", linears(twin))):
        for k, layer in enumerate(layers):
            layer.register_forward_pre_hook(
                lambda m, args, key=key, k=k: seen[key].append((f"pre{k}", args[0]))
            )
            layer.register_forward_hook(lambda m, args, out, key=key, k=k: seen[key].append((f"out{k}", out)))
            layer.register_full_backward_hook(
                lambda m, gin, gout, key=key, k=k: seen[key].append((f"grad{k}", gout[0]))
            )
    x = torch.randn(4, 5, dtype=DTYPE, requires_grad=True)
    assert_same_run(model, twin, x)
    assert [name for name, _ in seen["model"]] == [name for name, _ in seen["twin"]]
    assert len(seen["model"]) == 3 * 3
    for (name, t), (_, ref) in zip(seen["model"], seen["twin"], strict=True):
        assert_close(t, ref, TOL, name)


def test_a_hook_that_changes_the_output_changes_it_as_on_the_twin() -> None:
    model, twin = make_pair()
    for layer in (model.layers[1], linears(twin)[1]):
        layer.register_forward_hook(lambda m, args, out: 2.0 * out + 1.0)
    assert_same_run(model, twin, torch.randn(4, 5, dtype=DTYPE, requires_grad=True))


def test_without_hooks_the_fused_stack_runs_again() -> None:
    model, _ = make_pair()
    x = torch.randn(4, 5, dtype=DTYPE)
    handle = model.layers[2].register_forward_hook(lambda m, args, out: None)
    assert not fused(model(x))
    handle.remove()
    assert fused(model(x))


def test_global_module_hooks_fire_for_the_layers() -> None:
    model, _ = make_pair()
    calls: list[type] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: calls.append(type(m)))
    try:
        model(torch.randn(2, 5, dtype=DTYPE))
    finally:
        handle.remove()
    assert calls.count(nn.Linear) == 3


@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_a_pruned_layer_behaves_as_the_pruned_twin(amount: float) -> None:
    model, twin = make_pair()
    for layer in (model.layers[0], linears(twin)[0]):
        prune.l1_unstructured(layer, "weight", amount=amount)
    x = torch.randn(4, 5, dtype=DTYPE, requires_grad=True)
    assert_same_run(model, twin, x)
    for layer in (model.layers[0], linears(twin)[0]):  # pruning again changes the mask in place
        torch.manual_seed(0)
        prune.random_unstructured(layer, "weight", amount=0.2)
    assert_same_run(model, twin, x)


def test_a_parametrized_layer_stays_on_the_fused_stack() -> None:
    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).t()

    model = BackpropMLP([4, 4, 2], dtype=DTYPE)
    twin = model.to_sequential()
    for layer in (model.layers[0], twin[0]):
        parametrize.register_parametrization(layer, "weight", Symmetric())
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    assert fused(model(x))
    assert_same_run(model, twin, x)


def test_a_layer_that_overrides_forward_runs_its_own_forward() -> None:
    class Scaled(nn.Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 3.0 * super().forward(input)

    model, twin = make_pair()
    scaled = Scaled(7, 6, dtype=DTYPE)
    scaled.load_state_dict(model.layers[1].state_dict())
    model.layers[1] = scaled
    twin[2] = Scaled(7, 6, dtype=DTYPE)
    twin[2].load_state_dict(scaled.state_dict())
    assert_same_run(model, twin, torch.randn(4, 5, dtype=DTYPE, requires_grad=True))


def test_dropout_on_the_layer_by_layer_path_draws_as_the_twin() -> None:
    model, twin = make_pair(dropout=0.4)
    for layer in (model.layers[0], linears(twin)[0]):
        layer.register_forward_hook(lambda m, args, out: None)
    x = torch.randn(6, 5, dtype=DTYPE, requires_grad=True)
    torch.manual_seed(3)
    out, grads = run_and_grad(model.train(), x)
    torch.manual_seed(3)
    out_twin, grads_twin = run_and_grad(twin.train(), x)
    assert_close(out, out_twin, TOL, "output with dropout")
    for g, ref in zip(grads, grads_twin, strict=True):
        assert_close(g, ref, TOL, "gradient with dropout")
