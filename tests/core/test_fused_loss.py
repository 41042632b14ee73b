"""The losses inside the stack (``BackpropMLP.loss``, ``functional.mlp_loss``) equal F's on the twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close
from torch import nn
from torch.func import grad, vmap

from torch_backprop import BackpropMLP, available_activations, per_sample
from torch_backprop.functional import mlp_loss

SIZES = [5, 7, 6, 4]
LOSSES = ("cross_entropy", "mse_loss", "binary_cross_entropy_with_logits")


def make_target(
    loss: str, lead: tuple[int, ...], dtype: torch.dtype, classes: int = SIZES[-1]
) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(classes, lead)
    if loss == "mse_loss":
        return torch.randn(*lead, classes, dtype=torch.float64).to(dtype)
    return torch.rand(*lead, classes, dtype=torch.float64).to(dtype)


def native_loss(loss: str, out: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
    """The reference: the F function on the twin's output (cross-entropy on its rows, classes last)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), **options)
    return getattr(F, loss)(out, y, **options)


def assert_loss_matches(model: BackpropMLP, x: torch.Tensor, y: torch.Tensor, loss: str, **options) -> None:
    """Loss value first, then ∂x and every parameter gradient, against native autograd on the twin."""
    dtype = model.layers[0].weight.dtype
    twin = model.to_sequential()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = model.loss(x_ours, y, loss, **options)
    ref = native_loss(loss, twin(x_ref), y, **options)
    assert_close(ours, ref, OUTPUT_TOLERANCE[dtype], "loss")
    ours_grads = torch.autograd.grad(ours, [x_ours, *model.parameters()])
    ref_grads = torch.autograd.grad(ref, [x_ref, *twin.parameters()])
    names = ["input"] + [name for name, _ in model.named_parameters()]
    for name, g, r in zip(names, ours_grads, ref_grads, strict=True):
        assert_close(g, r, GRAD_TOLERANCE[dtype], name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("output", ["identity", "same"], ids=["out-identity", "out-same"])
@pytest.mark.parametrize("activation", available_activations())
@pytest.mark.parametrize("loss", LOSSES)
def test_every_activation_float64(loss, activation, output, bias):
    model = BackpropMLP(
        SIZES,
        activation=activation,
        output_activation=activation if output == "same" else None,
        bias=bias,
        dtype=torch.float64,
    )
    x = torch.randn(9, SIZES[0], dtype=torch.float64)
    assert_loss_matches(model, x, make_target(loss, (9,), torch.float64), loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("loss", LOSSES)
def test_lower_precision(loss, activation, dtype):
    model = BackpropMLP(SIZES, activation=activation, dtype=dtype)
    x = torch.randn(16, SIZES[0], dtype=torch.float64).to(dtype)
    assert_loss_matches(model, x, make_target(loss, (16,), dtype), loss)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_extra_leading_dimensions_and_reductions(loss, reduction):
    model = BackpropMLP(SIZES, activation="silu", dtype=torch.float64)
    lead = (3, 2, 4)
    x = torch.randn(*lead, SIZES[0], dtype=torch.float64)
    assert_loss_matches(model, x, make_target(loss, lead, torch.float64), loss, reduction=reduction)


@pytest.mark.parametrize("create_graph", [False, True], ids=["grad", "create_graph"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_empty_batch_equals_F(loss, reduction, create_graph):
    """An empty batch: the same value as F on the twin (nan for a mean), zero-sized gradients."""
    model = BackpropMLP(SIZES, activation="tanh", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(0, SIZES[0], dtype=torch.float64)
    y = make_target(loss, (0,), torch.float64)
    ours = model.loss(x, y, loss, reduction=reduction)
    ref = native_loss(loss, twin(x), y, reduction=reduction)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()), create_graph=create_graph)
    ref_grads = torch.autograd.grad(ref, list(twin.parameters()), create_graph=create_graph)
    for g, r in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, equal_nan=True)


def test_one_unbatched_sample():
    model = BackpropMLP(SIZES, dtype=torch.float64)
    x = torch.randn(SIZES[0], dtype=torch.float64)
    assert_loss_matches(model, x, torch.tensor(2), "cross_entropy")
    assert_loss_matches(model, x, make_target("mse_loss", (), torch.float64), "mse_loss")


@pytest.mark.parametrize(
    "options",
    [
        {"ignore_index": 1},
        {"label_smoothing": 0.2},
        {"weight": "rand"},
        {"weight": "rand", "label_smoothing": 0.1, "ignore_index": 0},
        {"weight": "rand", "label_smoothing": 0.3, "ignore_index": 2, "reduction": "sum"},
    ],
    ids=["ignore", "smoothing", "weight", "all-mean", "all-sum"],
)
def test_cross_entropy_options(options):
    options = dict(options)
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(SIZES[-1], dtype=torch.float64) + 0.1
    model = BackpropMLP(SIZES, activation="tanh", dtype=torch.float64)
    x = torch.randn(4, 5, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (4, 5))
    y[0, :2] = options.get("ignore_index", 0)  # some ignored rows whichever index is ignored
    assert_loss_matches(model, x, y, "cross_entropy", **options)


def test_default_ignore_index_pads():
    model = BackpropMLP(SIZES, dtype=torch.float64)
    x = torch.randn(8, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (8,))
    y[3] = -100
    assert_loss_matches(model, x, y, "cross_entropy")


def test_binary_cross_entropy_weights():
    model = BackpropMLP(SIZES, activation="elu", dtype=torch.float64)
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    y = make_target("binary_cross_entropy_with_logits", (6,), torch.float64)
    for options in (
        {"pos_weight": torch.rand(SIZES[-1], dtype=torch.float64) * 3},
        {"weight": torch.rand(6, SIZES[-1], dtype=torch.float64), "reduction": "sum"},
        {"weight": torch.rand(SIZES[-1], dtype=torch.float64), "pos_weight": torch.rand(SIZES[-1]).double()},
    ):
        assert_loss_matches(model, x, y, "binary_cross_entropy_with_logits", **options)


def test_loss_modules_and_functions_as_names():
    model = BackpropMLP(SIZES, dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (6,))
    module = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    assert_close(model.loss(x, y, module), module(twin(x), y), OUTPUT_TOLERANCE[torch.float64], "loss")
    assert_close(model.loss(x, y, F.cross_entropy), F.cross_entropy(twin(x), y), (1e-12, 1e-12), "loss")
    t = torch.randn(6, SIZES[-1], dtype=torch.float64)
    assert_close(model.loss(x, t, nn.MSELoss()), F.mse_loss(twin(x), t), (1e-12, 1e-12), "loss")
    assert_close(model.loss(x, t, "mse"), F.mse_loss(twin(x), t), (1e-12, 1e-12), "loss")


def test_one_autograd_node_for_stack_and_loss():
    model = BackpropMLP(SIZES)
    loss = model.loss(torch.randn(3, SIZES[0]), torch.randint(SIZES[-1], (3,)))
    assert "FusedLoss" in type(loss.grad_fn).__name__
    assert all("AccumulateGrad" in type(fn).__name__ for fn, _ in loss.grad_fn.next_functions if fn)


def test_dropout_matches_the_twin_with_the_same_masks():
    model = BackpropMLP(SIZES, dropout=0.3, dtype=torch.float64).train()
    twin = model.to_sequential()
    x = torch.randn(10, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (10,))
    torch.manual_seed(5)
    ours = model.loss(x, y)
    ours.backward()
    torch.manual_seed(5)
    ref = F.cross_entropy(model(x), y)  # the unfused stack draws the same masks from the same seed
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_close(ours, ref, (1e-12, 1e-12), "loss")
    for p, r in zip(model.parameters(), ref_grads, strict=True):
        assert_close(p.grad, r, (1e-12, 1e-12), "gradient")
    del twin


# -- bad input: a clear error, nothing computed ---------------------------------------------------


@pytest.mark.parametrize(
    ("target", "loss", "options", "error", "match"),
    [
        ("class", "hinge", {}, ValueError, "expects a loss among"),
        ("class", F.nll_loss, {}, TypeError, "expects a loss name"),
        ("class", "cross_entropy", {"reduction": "none"}, ValueError, "'mean' or 'sum'"),
        ("float", "cross_entropy", {}, TypeError, "class probabilities are not fused"),
        ("int32", "cross_entropy", {}, TypeError, "int64"),
        ("wide", "cross_entropy", {}, ValueError, "target of shape"),
        ("class", "mse", {}, TypeError, "dtype"),
        ("float-narrow", "mse", {}, ValueError, "the output's shape"),
        ("class", "cross_entropy", {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ("float", "mse", {"ignore_index": 0}, ValueError, "cross_entropy's"),
        ("class", "cross_entropy", {"pos_weight": torch.ones(4)}, ValueError, "pos_weight"),
        ("class", "cross_entropy", {"weight": torch.ones(3)}, ValueError, "weight of shape"),
    ],
)
def test_bad_input_raises_before_anything_changes(target, loss, options, error, match):
    model = BackpropMLP(SIZES)
    x = torch.randn(6, SIZES[0])
    y = {
        "class": torch.randint(SIZES[-1], (6,)),
        "float": torch.randn(6, SIZES[-1]),
        "int32": torch.randint(SIZES[-1], (6,), dtype=torch.int32),
        "wide": torch.randint(SIZES[-1], (6, 2)),
        "float-narrow": torch.randn(6, 1),
    }[target]
    with pytest.raises(error, match=match):
        model.loss(x, y, loss, **options)
    assert all(p.grad is None for p in model.parameters())


def test_bad_model_input_raises():
    model = BackpropMLP(SIZES)
    with pytest.raises(ValueError, match="last dimension 5"):
        model.loss(torch.randn(3, 4), torch.randint(4, (3,)))


# -- fallbacks where the fused node cannot be exact --------------------------------------------------


def test_target_that_requires_grad_gets_its_gradient():
    model = BackpropMLP(SIZES, dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = torch.randn(5, SIZES[-1], dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(model.loss(x, y, "mse"), [y])
    (ref,) = torch.autograd.grad(F.mse_loss(twin(x), y), [y])
    assert_close(ours, ref, (1e-12, 1e-12), "target gradient")


def test_autocast_takes_the_native_loss_and_matches():
    model = BackpropMLP(SIZES)
    twin = model.to_sequential()
    x, y = torch.randn(8, SIZES[0]), torch.randint(SIZES[-1], (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model.loss(x, y)
        ref = F.cross_entropy(twin(x), y)
    assert_close(ours.float(), ref.float(), OUTPUT_TOLERANCE[torch.bfloat16], "loss")


# -- double backward, torch.func, torch.compile ------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_and_gradgradcheck(loss):
    torch.manual_seed(0)
    weights = [
        torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
        for n_in, n_out in zip(SIZES[:-1], SIZES[1:], strict=True)
    ]
    biases = [torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True) for w in weights]
    x = torch.randn(3, SIZES[0], dtype=torch.float64, requires_grad=True)
    y = make_target(loss, (3,), torch.float64)

    def f(x, *params):
        return mlp_loss(x, y, params[:3], params[3:], ["tanh", "softplus", "sigmoid"], loss)

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(f, (x, *weights, *biases))


@pytest.mark.parametrize("loss", LOSSES)
def test_double_backward_matches_the_twin(loss):
    model = BackpropMLP(SIZES, activation="gelu", output_activation="tanh", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    y = make_target(loss, (6,), torch.float64)

    def penalty(module, value):
        grads = torch.autograd.grad(value, list(module.parameters()), create_graph=True)
        return sum(g.square().sum() for g in grads)

    ours = torch.autograd.grad(penalty(model, model.loss(x, y, loss)), list(model.parameters()))
    ref = torch.autograd.grad(penalty(twin, native_loss(loss, twin(x), y)), list(twin.parameters()))
    for name, g, r in zip([n for n, _ in model.named_parameters()], ours, ref, strict=True):
        assert_close(g, r, GRAD_TOLERANCE[torch.float64], name)


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_func_grad_and_per_sample_vmap(loss):
    model = BackpropMLP(SIZES, activation="tanh", dtype=torch.float64)
    twin = model.to_sequential()
    acts = list(model.activations)
    weights = tuple(layer.weight.detach() for layer in model.layers)
    biases = tuple(layer.bias.detach() for layer in model.layers)
    x = torch.randn(5, SIZES[0], dtype=torch.float64)
    y = make_target(loss, (5,), torch.float64)

    def ours(params, x, y):
        return mlp_loss(x, y, params[0], params[1], acts, loss)

    whole = grad(ours)((weights, biases), x, y)
    ref = torch.autograd.grad(native_loss(loss, twin(x), y), list(twin.parameters()))
    flat = [g for pair in zip(*whole, strict=True) for g in pair]  # layer by layer: weight, bias
    for g, r in zip(flat, ref, strict=True):
        assert_close(g, r, GRAD_TOLERANCE[torch.float64], "torch.func.grad")

    per_sample_grads = vmap(grad(ours), in_dims=(None, 0, 0))((weights, biases), x, y)
    per_sample_flat = [g for pair in zip(*per_sample_grads, strict=True) for g in pair]
    for b in range(5):
        ref_b = torch.autograd.grad(native_loss(loss, twin(x[b]), y[b]), list(twin.parameters()))
        for g, r in zip(per_sample_flat, ref_b, strict=True):
            assert_close(g[b], r, GRAD_TOLERANCE[torch.float64], f"vmap(grad) sample {b}")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_loss"])
def test_torch_compile(loss):
    model = BackpropMLP(SIZES, activation="gelu")
    twin = model.to_sequential()
    x = torch.randn(8, SIZES[0])
    y = make_target(loss, (8,), torch.float32)
    compiled = torch.compile(lambda x, y: model.loss(x, y, loss))
    ours = compiled(x, y)
    ours.backward()
    ref = native_loss(loss, twin(x), y)
    ref.backward()
    assert_close(ours, ref, OUTPUT_TOLERANCE[torch.float32], "loss")
    for (name, p), r in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, r.grad, GRAD_TOLERANCE[torch.float32], name)


# -- per_sample: the same per-sample loss terms ---------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_per_sample_gradients_match_a_loop_on_the_twin(loss, reduction):
    model = BackpropMLP(SIZES, activation="tanh", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(4, 3, SIZES[0], dtype=torch.float64)  # 4 samples of 3 rows
    y = make_target(loss, (4, 3), torch.float64)
    with per_sample(model, loss_reduction=reduction):
        model.loss(x, y, loss, reduction=reduction).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        loop = torch.stack(
            [
                torch.autograd.grad(native_loss(loss, twin(x[b]), y[b], reduction=reduction), q)[0]
                for b in range(4)
            ]
        )
        assert_close(p.grad_sample, loop, GRAD_TOLERANCE[torch.float64], name)


def test_per_sample_clipping_matches_a_clipped_loop():
    model = BackpropMLP(SIZES, activation="relu", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(6, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (6,))
    threshold = 0.05
    with per_sample(model, loss_reduction="mean", max_grad_norm=threshold) as ps:
        model.loss(x, y).backward()
    per = [
        torch.autograd.grad(F.cross_entropy(twin(x[b : b + 1]), y[b : b + 1]), list(twin.parameters()))
        for b in range(6)
    ]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in per])
    assert_close(ps.norms, norms, GRAD_TOLERANCE[torch.float64], "norms")
    factors = (threshold / norms).clamp(max=1)
    for k, (name, p) in enumerate(model.named_parameters()):
        expected = sum(factors[b] * per[b][k] for b in range(6)) / 6
        assert_close(p.grad, expected, GRAD_TOLERANCE[torch.float64], name)


def test_per_sample_refuses_a_loss_that_is_not_its_reduction():
    model = BackpropMLP(SIZES, dtype=torch.float64)
    x = torch.randn(4, SIZES[0], dtype=torch.float64)
    y = torch.randint(SIZES[-1], (4,))
    with per_sample(model, loss_reduction="mean"):
        with pytest.raises(ValueError, match="loss_reduction='mean'"):
            model.loss(x, y, reduction="sum")
        with pytest.raises(ValueError, match="no mean of per-sample terms"):
            model.loss(x, y, weight=torch.rand(SIZES[-1], dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss", LOSSES)
def test_upstream_gradient_and_a_second_backward_through_the_same_node(loss):
    """3 Q backpropagated twice (retain_graph): 6 times the twin's gradients; nothing saved is overwritten."""
    model = BackpropMLP(SIZES, activation="sigmoid", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(7, SIZES[0], dtype=torch.float64)
    y = make_target(loss, (7,), torch.float64)
    value = 3 * model.loss(x, y, loss, reduction="sum")
    value.backward(retain_graph=True)
    value.backward()
    ref = torch.autograd.grad(native_loss(loss, twin(x), y, reduction="sum"), list(twin.parameters()))
    for (name, p), r in zip(model.named_parameters(), ref, strict=True):
        assert_close(p.grad, 6 * r, GRAD_TOLERANCE[torch.float64], name)
