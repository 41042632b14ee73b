"""curvature's quantities against BackPACK on the native twin, curvlinops, and torch.func in float64."""

from __future__ import annotations

import pytest
import torch
from _curvature_helpers import (
    DTYPE,
    LOSSES,
    FuncReference,
    assert_relative,
    backpack_run,
    call_loss,
    make_data,
    make_model,
    ours,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_backprop import ggn_vector_product
from torch_backprop.activations import available_activations, get_activation
from torch_backprop.secondorder.products import output_jacobians

backpack = pytest.importorskip("backpack")
from backpack import extensions as bp  # noqa: E402

# BackPACK's hooks warn when the input does not require grad; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

BACKPACK_ACTIVATIONS = ["identity", "relu", "leaky_relu", "elu", "sigmoid", "tanh"]
OTHER_ACTIVATIONS = ["gelu", "gelu_tanh", "silu", "softplus"]
assert set(BACKPACK_ACTIVATIONS + OTHER_ACTIVATIONS) == set(available_activations())
EXACT = {
    "diag_ggn_exact": bp.DiagGGNExact,
    "diag_ggn_exact_batch": bp.BatchDiagGGNExact,
    "kflr": bp.KFLR,
    "diag_h": bp.DiagHessian,
    "diag_h_batch": bp.BatchDiagHessian,
}
KRONECKER_ACTIVATIONS = ["identity", "relu", "sigmoid", "tanh"]  # BackPACK's KFLR/KFAC modules


def curvlinops_kflr(model, loss_function, x, y) -> list:
    """KFLR's [G, A] / [G] per parameter from curvlinops (type-2 Fisher, KFAC "expand")."""
    curvlinops = pytest.importorskip("curvlinops")
    from backpack.custom_module.permute import Permute

    twin = model.to_sequential()
    if x.dim() == 3 and isinstance(loss_function, nn.CrossEntropyLoss):  # classes in dimension 1
        twin = nn.Sequential(*twin, Permute(0, 2, 1))
    kfac = curvlinops.KFACLinearOperator(
        twin,
        loss_function,
        list(twin.parameters()),
        [(x, y)],
        fisher_type=curvlinops.FisherType.TYPE2,
        kfac_approx=curvlinops.KFACType.EXPAND,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    expected = []
    for name, module in twin.named_children():
        if isinstance(module, nn.Linear):
            G, A = kfac._gradient_covariances[name], kfac._input_covariances[name]
            expected += [[G, A]] + ([[G]] if module.bias is not None else [])
    return expected


def assert_all(got: dict, expected: dict, rtol: float | None = None) -> None:
    for name, values in expected.items():
        for k, (a, e) in enumerate(zip(got[name], values, strict=True)):
            kwargs = {} if rtol is None else {"rtol": rtol}
            assert_relative(a, e, f"{name} of trainable parameter {k}", **kwargs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", BACKPACK_ACTIVATIONS)
def test_exact_quantities_match_backpack(activation, loss, bias):
    model = make_model(activation, bias=bias)
    x, y = make_data(loss)
    got, _ = ours(model, LOSSES[loss](), x, y, list(EXACT))
    names = [n for n in EXACT if n != "kflr" or activation in KRONECKER_ACTIVATIONS]
    expected = backpack_run(model, loss, x, y, [EXACT[n]() for n in names], names)
    if "kflr" not in names:  # BackPACK has no KFLR through this activation
        expected["kflr"] = curvlinops_kflr(model, LOSSES[loss](), x, y)
    assert_all(got, expected)


@pytest.mark.parametrize("sizes", [[4, 3], [4, 6, 3], [3, 5, 6, 4, 3, 2]], ids=["depth1", "depth2", "depth5"])
@pytest.mark.parametrize("output_activation", [None, "sigmoid"], ids=["linear-out", "sigmoid-out"])
def test_depths_and_output_activation_match_backpack(sizes, output_activation):
    model = make_model("tanh", sizes=sizes, output_activation=output_activation)
    x, y = make_data("mse-mean", sizes=sizes)
    got, _ = ours(model, LOSSES["mse-mean"](), x, y, list(EXACT))
    assert_all(got, backpack_run(model, "mse-mean", x, y, [ext() for ext in EXACT.values()], list(EXACT)))


def test_dropout_in_training_matches_backpack_with_the_same_masks():
    # BackpropMLP draws its dropout masks as nn.Dropout does, so the same seed gives the same masks.
    model = make_model("sigmoid", dropout=0.3).train()
    x, y = make_data("ce-mean", batch=12)
    names = ["diag_ggn_exact", "kflr", "diag_h"]
    torch.manual_seed(4)
    got, _ = ours(model, LOSSES["ce-mean"](), x, y, names)
    expected = backpack_run(model, "ce-mean", x, y, [EXACT[n]() for n in names], names, seed=4)
    assert_all(got, expected)
    assert not torch.equal(
        got["diag_ggn_exact"][0], ours(model.eval(), LOSSES["ce-mean"](), x, y, names)[0]["diag_ggn_exact"][0]
    )


def test_frozen_layer_gets_nothing_and_the_rest_match_backpack():
    model = make_model("tanh")
    model.layers[1].weight.requires_grad_(False)
    model.layers[0].bias.requires_grad_(False)
    x, y = make_data("ce-sum")
    got, _ = ours(model, LOSSES["ce-sum"](), x, y, list(EXACT))
    assert_all(got, backpack_run(model, "ce-sum", x, y, [ext() for ext in EXACT.values()], list(EXACT)))
    for name in EXACT:
        assert not hasattr(model.layers[1].weight, name) and not hasattr(model.layers[0].bias, name)


def test_recompute_model_matches_backpack():
    model = make_model("sigmoid", recompute=True)
    x, y = make_data("mse-sum")
    got, _ = ours(model, LOSSES["mse-sum"](), x, y, list(EXACT))
    assert_all(got, backpack_run(model, "mse-sum", x, y, [ext() for ext in EXACT.values()], list(EXACT)))


def test_float32_matches_backpack_to_float32_round_off():
    model = make_model("relu").float()
    x, y = make_data("ce-mean")
    x = x.float()
    names = ["diag_ggn_exact", "kflr"]
    got, _ = ours(model, LOSSES["ce-mean"](), x, y, names)
    assert got["diag_ggn_exact"][0].dtype == torch.float32
    assert_all(got, backpack_run(model, "ce-mean", x, y, [EXACT[n]() for n in names], names), rtol=1e-5)


@pytest.mark.parametrize("activation", available_activations())
def test_float32_matches_the_float64_reference_for_every_activation(activation):
    # float32 takes other kernels (oneDNN's GELU backward does not broadcast over the K columns)
    model = make_model(activation)
    x, y = make_data("ce-mean")
    expected = FuncReference(model, LOSSES["ce-mean"](), x, y).ggn_diagonal()
    got, _ = ours(model.float(), LOSSES["ce-mean"](), x.float(), y, "diag_ggn_exact")
    for k, (a, e) in enumerate(zip(got["diag_ggn_exact"], expected, strict=True)):
        assert_relative(a.double(), e, f"float32 diag_ggn_exact {k}", rtol=1e-5)


@pytest.mark.parametrize("loss", ["ce-mean", "ce-sum"])
def test_rows_per_sample_match_backpack_cross_entropy(loss):
    # (B, T, n_0) input: T rows per sample. BackPACK needs the classes in dimension 1 (Permute).
    model = make_model("sigmoid")
    x, y = make_data(loss, batch=3, steps=4)
    names = ["diag_ggn_exact", "diag_ggn_exact_batch"]
    got, _ = ours(model, LOSSES[loss](), x, y, names)
    assert_all(got, backpack_run(model, loss, x, y, [EXACT[n]() for n in names], names))


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_rows_per_sample_match_torch_func(activation, loss):
    # BackPACK has no MSE with (B, T, C) and no Hessian through its Permute: torch.func instead.
    model = make_model(activation)
    x, y = make_data(loss, batch=3, steps=2)
    names = ["diag_ggn_exact", "diag_ggn_exact_batch", "diag_h", "diag_h_batch"]
    got, _ = ours(model, LOSSES[loss](), x, y, names)
    reference = FuncReference(model, LOSSES[loss](), x, y)
    expected = {
        "diag_ggn_exact": reference.ggn_diagonal(),
        "diag_ggn_exact_batch": reference.ggn_diagonal(per_sample=True),
        "diag_h": reference.hessian_diagonal(),
        "diag_h_batch": reference.hessian_diagonal(per_sample=True),
    }
    assert_all(got, expected)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", OTHER_ACTIVATIONS)
def test_activations_backpack_lacks_match_curvlinops_and_torch_func(activation, loss):
    curvlinops = pytest.importorskip("curvlinops")
    model = make_model(activation)
    x, y = make_data(loss)
    loss_function = LOSSES[loss]()
    got, _ = ours(model, loss_function, x, y, ["diag_ggn_exact", "diag_h"])
    twin = model.to_sequential()
    params = list(twin.parameters())
    ggn = curvlinops.GGNLinearOperator(twin, loss_function, params, [(x, y)], check_deterministic=False)
    diagonal = (ggn @ torch.eye(ggn.shape[1], dtype=DTYPE)).diagonal()
    expected = list(diagonal.split([p.numel() for p in params]))
    expected = [d.reshape(p.shape) for d, p in zip(expected, params, strict=True)]
    assert_all(
        got,
        {"diag_ggn_exact": expected, "diag_h": FuncReference(model, loss_function, x, y).hessian_diagonal()},
    )


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_kronecker_factors_with_rows_per_sample_match_curvlinops(loss):
    # curvlinops' KFAC "expand" treats the T rows as samples, as CV5 does (BackPACK has 2-D input only).
    model = make_model("tanh")
    x, y = make_data(loss, batch=3, steps=4)
    got, _ = ours(model, LOSSES[loss](), x, y, "kflr")
    assert_all(got, {"kflr": curvlinops_kflr(model, LOSSES[loss](), x, y)})


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    activations=st.lists(st.sampled_from(available_activations()), min_size=4, max_size=4),
    loss=st.sampled_from(list(LOSSES)),
    bias=st.booleans(),
    batch=st.integers(1, 4),
    steps=st.sampled_from([None, 1, 3]),
)
def test_random_architectures_match_torch_func(widths, activations, loss, bias, batch, steps):
    sizes = [3, *widths[:-1], 2 if loss.startswith("ce") else widths[-1]]
    hidden = activations[: len(sizes) - 2]
    model = make_model(
        hidden, sizes=sizes, bias=bias, output_activation=activations[-1] if loss.startswith("mse") else None
    )
    x, y = make_data(loss, batch=batch, steps=steps, sizes=sizes)
    names = ["diag_ggn_exact", "diag_ggn_exact_batch", "diag_h"]
    got, _ = ours(model, LOSSES[loss](), x, y, names)
    reference = FuncReference(model, LOSSES[loss](), x, y)
    expected = {
        "diag_ggn_exact": reference.ggn_diagonal(),
        "diag_ggn_exact_batch": reference.ggn_diagonal(per_sample=True),
        "diag_h": reference.hessian_diagonal(),
    }
    assert_all(got, expected, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Monte Carlo quantities: BackPACK's draws, the same formula with our draws, convergence.


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_monte_carlo_equals_backpack_with_the_same_draws(loss, mc_samples):
    # Both draw with torch.multinomial / torch.normal from the global generator, so the same seed
    # gives the same labels. BackPACK's MSE draws use the standard deviation √½ rounded to float32
    # (a float32 scalar tensor), so its MSE values differ from the exact √½ by ~3e-8 relative.
    rtol = 1e-10 if loss.startswith("ce") else 1e-6
    model = make_model("tanh")
    x, y = make_data(loss)
    for name, extension in [
        ("diag_ggn_mc", bp.DiagGGNMC),
        ("diag_ggn_mc_batch", bp.BatchDiagGGNMC),
        ("kfac", bp.KFAC),
    ]:
        torch.manual_seed(11)
        got, _ = ours(model, LOSSES[loss](), x, y, name, mc_samples=mc_samples)
        expected = backpack_run(model, loss, x, y, [extension(mc_samples=mc_samples)], [name], seed=11)
        assert_all(got, expected, rtol=rtol)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_monte_carlo_equals_the_formula_with_its_own_draws(loss):
    model = make_model("softplus")
    x, y = make_data(loss, batch=3, steps=2)
    generator = torch.Generator().manual_seed(5)
    names = ["diag_ggn_mc", "diag_ggn_mc_batch"]
    got, block = ours(model, LOSSES[loss](), x, y, names, mc_samples=4, generator=generator)
    reference = FuncReference(model, LOSSES[loss](), x, y)
    draws = block.sampled_targets
    assert draws.shape[:2] == (4, 6)
    expected = {
        "diag_ggn_mc": reference.sampled_ggn_diagonal(draws),
        "diag_ggn_mc_batch": reference.sampled_ggn_diagonal(draws, per_sample=True),
    }
    assert_all(got, expected)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_monte_carlo_converges_to_the_exact_diagonal(loss):
    # The relative error of an M-sample mean falls like 1/√M; with a fixed seed, 40,000 draws per
    # row bring it well under 5% while 10 draws stay far from it.
    model = make_model("tanh")
    x, y = make_data(loss)
    exact, _ = ours(model, LOSSES[loss](), x, y, "diag_ggn_exact")
    errors = {}
    for mc_samples in (10, 40_000):
        generator = torch.Generator().manual_seed(0)
        mc, _ = ours(model, LOSSES[loss](), x, y, "diag_ggn_mc", mc_samples=mc_samples, generator=generator)
        errors[mc_samples] = max(
            ((a - e).norm() / e.norm()).item()
            for a, e in zip(mc["diag_ggn_mc"], exact["diag_ggn_exact"], strict=True)
        )
    assert errors[40_000] < 0.05 < errors[10]


def test_generator_makes_the_draws_reproducible():
    model = make_model("relu")
    x, y = make_data("ce-mean")
    runs = [
        ours(
            model, LOSSES["ce-mean"](), x, y, "kfac", mc_samples=2, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][1].sampled_targets, runs[1][1].sampled_targets)
    assert_all(runs[0][0], runs[1][0])


# ---------------------------------------------------------------------------------------------
# Products without a backward: G v against BackPACK's and curvlinops', Jacobians against jacrev.


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "gelu"])
def test_ggn_vector_product_matches_backpack_and_curvlinops(activation, loss):
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    model = make_model(activation)
    model.layers[1].bias.requires_grad_(False)
    x, y = make_data(loss)
    loss_function = LOSSES[loss]()
    twin = model.to_sequential()
    params = [p for p in twin.parameters() if p.requires_grad]
    vector = [torch.randn_like(p) for p in params]
    got = ggn_vector_product(model, loss_function, x, vector)
    out = twin(x)
    expected = ggn_vector_product_from_plist(call_loss(loss_function, out, y), out, params, vector)
    for k, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert_relative(a, e, f"G v, parameter {k}")
    curvlinops = pytest.importorskip("curvlinops")
    ggn = curvlinops.GGNLinearOperator(twin, loss_function, params, [(x, y)], check_deterministic=False)
    for k, (a, e) in enumerate(zip(got, ggn @ vector, strict=True)):
        assert_relative(a, e, f"G v (curvlinops), parameter {k}")


def test_ggn_vector_product_with_rows_per_sample_matches_curvlinops():
    curvlinops = pytest.importorskip("curvlinops")
    model = make_model("tanh")
    x, y = make_data("mse-mean", batch=3, steps=2)
    twin = model.to_sequential()
    vector = [torch.randn_like(p) for p in twin.parameters()]
    got = ggn_vector_product(model, nn.MSELoss(), x, vector)
    ggn = curvlinops.GGNLinearOperator(
        twin, nn.MSELoss(), list(twin.parameters()), [(x, y)], check_deterministic=False
    )
    for k, (a, e) in enumerate(zip(got, ggn @ vector, strict=True)):
        assert_relative(a, e, f"G v, parameter {k}")


def test_output_jacobians_match_jacrev():
    model = make_model("silu")
    model.layers[0].weight.requires_grad_(False)
    x, _ = make_data("ce-mean")
    twin = model.to_sequential()
    trainable = {n: p.detach() for n, p in twin.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in twin.named_parameters() if not p.requires_grad}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(twin, {**p, **frozen}, (x,)))(trainable)
    expected = torch.cat([j.flatten(2) for j in jac.values()], dim=2)
    out, got = output_jacobians(model, x)
    assert_relative(out, twin(x).detach(), "output")
    assert_relative(got, expected, "Jacobian")


@pytest.mark.parametrize("activation", available_activations())
def test_second_derivatives_match_autograd(activation):
    act = get_activation(activation)
    z = torch.linspace(-4, 4, 81, dtype=DTYPE) + 0.0125  # off the kinks at 0
    saved = {"h": act.fn(z), "z": z, "none": z}[act.derivative_from]
    expected = torch.func.vmap(torch.func.grad(torch.func.grad(act.fn)))(z)
    torch.testing.assert_close(act.second_derivative(saved), expected, rtol=1e-12, atol=1e-14)
