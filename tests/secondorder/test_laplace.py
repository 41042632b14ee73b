"""BackpropGGN gives laplace-torch the posterior precisions its BackPACK and curvlinops backends give."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_backprop import BackpropMLP

laplace = pytest.importorskip("laplace")
pytest.importorskip("backpack")
from laplace.curvature import BackPackGGN, CurvlinopsGGN  # noqa: E402

from torch_backprop.laplace import BackpropGGN, split_last_layer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
DTYPE = torch.float64
RTOL = 1e-10  # float64, as for the curvature tests


def make_case(likelihood: str, activation: str = "tanh", sizes=(6, 8, 7, 3)):
    torch.manual_seed(0)
    model = BackpropMLP(list(sizes), activation=activation, dtype=DTYPE)
    x = torch.randn(40, sizes[0], dtype=DTYPE)
    y = (
        torch.randint(sizes[-1], (40,))
        if likelihood == "classification"
        else torch.randn(40, sizes[-1], dtype=DTYPE)
    )
    return model, DataLoader(TensorDataset(x, y), batch_size=16), x


def precision(la) -> torch.Tensor:
    matrix = la.posterior_precision
    return matrix if isinstance(matrix, torch.Tensor) else matrix.to_matrix()


def fitted(model, likelihood, subset, structure, backend, loader, **kwargs):
    la = laplace.Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure=structure, backend=backend, **kwargs
    )
    la.fit(loader)
    return la


def assert_same_posterior(la, reference, x) -> None:
    expected = precision(reference)
    error = (precision(la) - expected).abs().max().item()
    assert error <= RTOL * expected.abs().max().item(), f"posterior precision differs by {error:.3g}"
    torch.testing.assert_close(la.loss, reference.loss, rtol=1e-12, atol=1e-12)
    if la.likelihood == "classification":
        prediction = la(x[:5], pred_type="glm", link_approx="probit")
        torch.testing.assert_close(prediction, reference(x[:5], pred_type="glm", link_approx="probit"))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("subset", ["all", "last_layer", "last_layer-split"])
def test_posterior_precision_matches_the_backpack_backend(subset, structure, likelihood):
    model, loader, x = make_case(likelihood)
    ours = split_last_layer(model) if subset.endswith("split") else model
    subset = subset.removesuffix("-split")
    la = fitted(ours, likelihood, subset, structure, BackpropGGN, loader)
    reference = fitted(model.to_sequential(), likelihood, subset, structure, BackPackGGN, loader)
    assert_same_posterior(la, reference, x)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_stochastic_matches_the_backpack_backend_with_the_same_draws(structure):
    # Both draw the labels from the global generator, once per batch, in the same order.
    model, loader, x = make_case("classification")
    twin = model.to_sequential()  # before seeding: building it draws initial weights
    stochastic = {"backend_kwargs": {"stochastic": True}}
    torch.manual_seed(7)
    la = fitted(model, "classification", "all", structure, BackpropGGN, loader, **stochastic)
    torch.manual_seed(7)
    reference = fitted(twin, "classification", "all", structure, BackPackGGN, loader, **stochastic)
    assert_same_posterior(la, reference, x)


def test_full_structure_uses_the_recursion_jacobians_and_matches_curvlinops():
    model, loader, x = make_case("classification", activation="gelu")
    la = fitted(model, "classification", "all", "full", BackpropGGN, loader)
    reference = fitted(model.to_sequential(), "classification", "all", "full", CurvlinopsGGN, loader)
    expected = precision(reference)
    # curvlinops multiplies its operator by a float32 identity: float32 round-off on its side
    assert (precision(la) - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_a_frozen_prefix_before_the_mlp_matches_curvlinops():
    # BackPACK's backend refuses models with frozen parameters; curvlinops' takes them.
    model, loader, x = make_case("classification")
    prefix = nn.Linear(6, 6, dtype=DTYPE).requires_grad_(False)
    ours, twin = nn.Sequential(prefix, model), nn.Sequential(prefix, *model.to_sequential())
    la = fitted(ours, "classification", "all", "diag", BackpropGGN, loader)
    reference = fitted(twin, "classification", "all", "diag", CurvlinopsGGN, loader)
    assert_same_posterior(la, reference, x)


def test_split_last_layer_shares_parameters_and_output():
    model, _, x = make_case("classification")
    split = split_last_layer(model)
    torch.testing.assert_close(split(x), model(x), rtol=0, atol=0)
    assert split[-1] is model.layers[-1] and split[0].layers[0] is model.layers[0]


def test_errors_name_what_is_expected():
    model, loader, _ = make_case("classification")
    trainable_prefix = nn.Sequential(nn.Linear(6, 6, dtype=DTYPE), model)
    with pytest.raises(ValueError, match="every trainable parameter inside the final BackpropMLP"):
        fitted(trainable_prefix, "classification", "all", "diag", BackpropGGN, loader)
    squashed = BackpropMLP([6, 8, 7, 3], activation="tanh", output_activation="sigmoid", dtype=DTYPE)
    with pytest.raises(ValueError, match="not the last layer's W φ"):  # f = σ(W φ + b)
        fitted(squashed, "classification", "last_layer", "diag", BackpropGGN, loader)
    with pytest.raises(TypeError, match="BackpropMLP"):
        fitted(model.to_sequential(), "classification", "all", "diag", BackpropGGN, loader)
    with pytest.raises(ValueError, match="output activation"):
        split_last_layer(BackpropMLP([4, 5, 2], output_activation="sigmoid"))
