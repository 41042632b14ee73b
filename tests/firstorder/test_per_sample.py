"""per_sample and dp_sgd_step against independent references.

References: a loop of ordinary backward calls, one sample at a time, on the native twin
(``model.to_sequential()``), and ``torch.func.vmap(grad(...))`` with ``functional_call`` on the twin.
Per-sample gradients follow Opacus: the gradient of sample b's own loss term ℓ_b, where the batch
loss is Σ_b ℓ_b ("sum") or (1/B) Σ_b ℓ_b ("mean").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _per_sample_helpers import (
    BATCH,
    DTYPE,
    SIZES,
    TOL,
    batch_loss,
    clipped_reference,
    flat_norms,
    loop_grads,
    make_data,
    make_model,
    ordinary_grads,
    trainable,
    vmap_grads,
)
from conftest import GRAD_TOLERANCE, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_backprop import BackpropMLP, dp_sgd_step, per_sample
from torch_backprop.activations import available_activations

SHAPES = {"2d": (BATCH,), "3d": (BATCH, 2)}
GRID = [
    pytest.param(act, bias, shape, reduction, id=f"{act}-{'bias' if bias else 'nobias'}-{shape}-{reduction}")
    for act in available_activations()
    for bias in (True, False)
    for shape in SHAPES
    for reduction in ("mean", "sum")
]


@pytest.mark.parametrize(("activation", "bias", "shape", "reduction"), GRID)
def test_grad_sample_matches_loop_and_vmap(activation: str, bias: bool, shape: str, reduction: str) -> None:
    model = make_model(activation, bias)
    x, y = make_data(SHAPES[shape])
    loop, vmapped = loop_grads(model, x, y, reduction), vmap_grads(model, x, y, reduction)
    ordinary = ordinary_grads(model, x, y, reduction)

    with per_sample(model, loss_reduction=reduction) as ps:
        batch_loss(model(x), y, reduction).backward()

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, p, ref_loop, ref_vmap, ref_grad in zip(
        names, trainable(model), loop, vmapped, ordinary, strict=True
    ):
        assert p.grad_sample.shape == (BATCH, *p.shape)
        assert_close(p.grad_sample, ref_loop, TOL, f"{name}.grad_sample (loop)")
        assert_close(p.grad_sample, ref_vmap, TOL, f"{name}.grad_sample (vmap)")
        assert_close(p.grad, ref_grad, TOL, f"{name}.grad")
    assert_close(ps.norms, flat_norms(loop), TOL, "norms")


CLIP_GRID = [
    pytest.param(act, bias, shape, reduction, id=f"{act}-{'bias' if bias else 'nobias'}-{shape}-{reduction}")
    for act in ("relu", "tanh", "gelu", "softplus")
    for bias in (True, False)
    for shape in (*SHAPES, "4d")
    for reduction in ("mean", "sum")
]
CLIP_SHAPES = {**SHAPES, "4d": (BATCH, 2, 3)}


@pytest.mark.parametrize(("activation", "bias", "shape", "reduction"), CLIP_GRID)
def test_clipped_sum_matches_materialised(activation: str, bias: bool, shape: str, reduction: str) -> None:
    model = make_model(activation, bias)
    x, y = make_data(CLIP_SHAPES[shape])
    loop = loop_grads(model, x, y, reduction)
    norms = flat_norms(loop)
    # Below every norm, between them (some samples under, some over) and above every norm.
    for threshold in (0.5 * norms.min().item(), norms.median().item(), 2.0 * norms.max().item()):
        model.zero_grad(set_to_none=True)
        with per_sample(model, loss_reduction=reduction, max_grad_norm=threshold) as ps:
            batch_loss(model(x), y, reduction).backward()
        assert_close(ps.norms, norms, TOL, "norms")
        for (name, p), expected in zip(
            model.named_parameters(), clipped_reference(loop, threshold, reduction), strict=True
        ):
            assert not hasattr(p, "grad_sample"), name
            assert_close(p.grad, expected, TOL, f"{name}.grad clipped at {threshold:.3g}")


def test_clipping_above_every_norm_gives_ordinary_gradient() -> None:
    model = make_model("relu")
    x, y = make_data((BATCH,))
    ordinary = ordinary_grads(model, x, y, "mean")
    with per_sample(model, max_grad_norm=1e6):
        batch_loss(model(x), y, "mean").backward()
    for (name, p), expected in zip(model.named_parameters(), ordinary, strict=True):
        assert_close(p.grad, expected, TOL, name)


@pytest.mark.parametrize("max_grad_norm", [None, 0.1], ids=["grad_sample", "clipped"])
def test_frozen_parameters_are_skipped(max_grad_norm: float | None) -> None:
    model = make_model("tanh")
    model.layers[0].weight.requires_grad_(False)
    model.layers[2].bias.requires_grad_(False)
    x, y = make_data((BATCH,))
    loop = loop_grads(model, x, y, "sum")
    with per_sample(model, loss_reduction="sum", max_grad_norm=max_grad_norm) as ps:
        batch_loss(model(x), y, "sum").backward()
    assert model.layers[0].weight.grad is None and not hasattr(model.layers[0].weight, "grad_sample")
    assert model.layers[2].bias.grad is None and not hasattr(model.layers[2].bias, "grad_sample")
    assert_close(ps.norms, flat_norms(loop), TOL, "norms over trainable parameters")
    if max_grad_norm is not None:
        for p, expected in zip(trainable(model), clipped_reference(loop, max_grad_norm, "sum"), strict=True):
            assert_close(p.grad, expected, TOL, "clipped grad")
    else:
        for p, expected in zip(trainable(model), loop, strict=True):
            assert_close(p.grad_sample, expected, TOL, "grad_sample")


def test_input_gradient_is_the_ordinary_one() -> None:
    model = make_model("silu")
    x, y = make_data((BATCH,))
    twin_x = x.clone().requires_grad_()
    batch_loss(model.to_sequential()(twin_x), y, "mean").backward()
    x.requires_grad_()
    with per_sample(model, max_grad_norm=0.01):
        batch_loss(model(x), y, "mean").backward()
    assert_close(x.grad, twin_x.grad, TOL, "input")


def test_result_does_not_depend_on_batch_split() -> None:
    model = make_model("elu")
    x, y = make_data((6, 2))
    with per_sample(model, loss_reduction="sum") as whole:
        batch_loss(model(x), y, "sum").backward()
    expected = [p.grad_sample.clone() for p in model.parameters()]
    expected_norms = whole.norms
    parts, part_norms = [], []
    for x_part, y_part in ((x[:2], y[:2]), (x[2:], y[2:])):
        with per_sample(model, loss_reduction="sum") as ps:
            batch_loss(model(x_part), y_part, "sum").backward()
        parts.append([p.grad_sample for p in model.parameters()])
        part_norms.append(ps.norms)
    for k, g in enumerate(expected):
        assert_close(torch.cat([parts[0][k], parts[1][k]]), g, TOL, f"parameter {k}")
    assert_close(torch.cat(part_norms), expected_norms, TOL, "norms")


def test_backward_calls_in_one_block_are_new_samples() -> None:
    # Opacus's convention for gradient accumulation: grad_sample and norms are concatenated.
    model = make_model("sigmoid")
    (x1, y1), (x2, y2) = make_data((BATCH,)), make_data((3,))
    loops = [loop_grads(model, x1, y1, "sum"), loop_grads(model, x2, y2, "sum")]
    with per_sample(model, loss_reduction="sum") as ps:
        batch_loss(model(x1), y1, "sum").backward()
        batch_loss(model(x2), y2, "sum").backward()
    for p, first, second in zip(model.parameters(), *loops, strict=True):
        assert_close(p.grad_sample, torch.cat([first, second]), TOL, "grad_sample")
        assert_close(p.grad, first.sum(0) + second.sum(0), TOL, ".grad")
    assert_close(ps.norms, torch.cat([flat_norms(loops[0]), flat_norms(loops[1])]), TOL, "norms")


def test_empty_batch() -> None:
    model = make_model("relu")
    x, y = make_data((0,))
    with per_sample(model, loss_reduction="sum") as ps:
        batch_loss(model(x), y, "sum").backward()
    assert ps.norms.shape == (0,)
    for p in model.parameters():
        assert p.grad_sample.shape == (0, *p.shape)


def test_float32_matches_float64_reference() -> None:
    model = make_model("gelu")
    x, y = make_data((BATCH,))
    loop = loop_grads(model, x, y, "mean")
    model32 = model.float()
    with per_sample(model32) as ps:
        batch_loss(model32(x.float()), y, "mean").backward()
    for p, expected in zip(model32.parameters(), loop, strict=True):
        assert_close(p.grad_sample, expected.float(), GRAD_TOLERANCE[torch.float32], "grad_sample")
    assert_close(ps.norms, flat_norms(loop).float(), GRAD_TOLERANCE[torch.float32], "norms")


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    batch=st.integers(1, 6),
    steps=st.integers(1, 4),
    clip=st.floats(0.05, 5.0),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_clip_like_materialised(
    sizes: list[int], batch: int, steps: int, clip: float, reduction: str, seed: int
) -> None:
    torch.manual_seed(seed)
    model = BackpropMLP(sizes, activation="tanh", dtype=DTYPE)
    x = torch.randn(batch, steps, sizes[0], dtype=DTYPE)
    target = torch.randn(batch, steps, sizes[-1], dtype=DTYPE)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target, reduction=reduction) * (1 if reduction == "sum" else out[0].numel())

    twin = model.to_sequential()
    loop = [
        torch.stack(g)
        for g in zip(
            *(
                torch.autograd.grad(loss(twin(x[b : b + 1]), target[b : b + 1]), list(twin.parameters()))
                for b in range(batch)
            ),
            strict=True,
        )
    ]
    with per_sample(model, loss_reduction=reduction, max_grad_norm=clip) as ps:
        loss(model(x), target).backward()
    assert_close(ps.norms, flat_norms(loop), TOL, "norms")
    for p, expected in zip(model.parameters(), clipped_reference(loop, clip, reduction), strict=True):
        assert_close(p.grad, expected, TOL, "clipped grad")


# Outside the block


def test_outside_the_block_backward_is_ordinary() -> None:
    model = make_model("leaky_relu")
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=0.01):
        batch_loss(model(x), y, "mean").backward()
    assert model.backward_phase is None
    assert len(model._forward_pre_hooks) == 0
    model.zero_grad(set_to_none=True)
    batch_loss(model(x), y, "mean").backward()
    ordinary = ordinary_grads(model, x, y, "mean")
    for (name, p), expected in zip(model.named_parameters(), ordinary, strict=True):
        assert not hasattr(p, "grad_sample"), name
        assert_close(p.grad, expected, TOL, name)


def test_exception_restores_the_model() -> None:
    model = make_model()
    previous = model.backward_phase
    with pytest.raises(KeyError), per_sample(model):
        raise KeyError("inside")
    assert model.backward_phase is previous
    assert len(model._forward_pre_hooks) == 0


def test_backward_after_the_block_is_refused() -> None:
    model = make_model()
    x, y = make_data((BATCH,))
    with per_sample(model, max_grad_norm=1.0):
        loss = batch_loss(model(x), y, "mean")
    with pytest.raises(RuntimeError, match="after its with block"):
        loss.backward()


def test_blocks_do_not_nest() -> None:
    model = make_model()
    with per_sample(model), pytest.raises(RuntimeError, match="nest"), per_sample(model):
        pass


# Errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"loss_reduction": "none"}, ValueError, "loss_reduction", id="reduction-none"),
        pytest.param({"max_grad_norm": 0.0}, ValueError, "max_grad_norm > 0", id="clip-zero"),
        pytest.param({"max_grad_norm": -1.0}, ValueError, "max_grad_norm > 0", id="clip-negative"),
        pytest.param({"max_grad_norm": math.nan}, ValueError, "max_grad_norm > 0", id="clip-nan"),
        pytest.param({"max_grad_norm": "1"}, TypeError, "max_grad_norm", id="clip-string"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        per_sample(make_model(), **kwargs)


def test_not_a_backprop_mlp() -> None:
    with pytest.raises(TypeError, match="BackpropMLP"):
        per_sample(make_model().to_sequential())


def test_input_without_batch_dimension() -> None:
    model = make_model()
    with per_sample(model), pytest.raises(ValueError, match="sample dimension"):
        model(torch.randn(SIZES[0], dtype=DTYPE))
    assert model.backward_phase is None


# dp_sgd_step


def test_dp_sgd_step_without_noise_is_a_clipped_sgd_step() -> None:
    model = make_model("relu")
    x, y = make_data((BATCH,))
    clip, lr = 0.3, 0.5
    expected = [
        p.detach() - lr * g
        for p, g in zip(
            model.parameters(), clipped_reference(loop_grads(model, x, y, "mean"), clip, "mean"), strict=True
        )
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with per_sample(model, max_grad_norm=clip):
        batch_loss(model(x), y, "mean").backward()
    dp_sgd_step(model, optimizer, noise_multiplier=0.0, max_grad_norm=clip, batch_size=BATCH)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        assert_close(p.detach(), e, TOL, name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dp_sgd_step_noise_has_the_calibrated_scale(reduction: str) -> None:
    model = make_model("relu", sizes=[30, 40, 3])
    x, y = torch.randn(BATCH, 30, dtype=DTYPE), torch.randint(3, (BATCH,))
    sigma, clip = 2.0, 0.5
    with per_sample(model, loss_reduction=reduction, max_grad_norm=clip):
        batch_loss(model(x), y, reduction).backward()
    # Opacus's DPOptimizer: "mean" gives (S + N(0, (σC)²)) / B, "sum" gives S + N(0, (σC)²).
    clipped = [p.grad.clone() for p in model.parameters()]  # S / B ("mean") or S ("sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_sgd_step(
        model, optimizer, sigma, clip, BATCH, torch.Generator().manual_seed(3), loss_reduction=reduction
    )
    noise = torch.cat([(p.grad - g).flatten() for p, g in zip(model.parameters(), clipped, strict=True)])
    std = sigma * clip / (BATCH if reduction == "mean" else 1)
    # 1,363 draws of N(0, std²): the sample std is within 10% with overwhelming probability.
    assert noise.std().item() == pytest.approx(std, rel=0.1)
    assert noise.mean().abs().item() < 4 * std / math.sqrt(noise.numel())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((-1.0, 1.0, 4), "noise_multiplier", id="negative-noise"),
        pytest.param((1.0, 0.0, 4), "max_grad_norm", id="zero-clip"),
        pytest.param((1.0, 1.0, 0), "batch_size", id="zero-batch"),
    ],
)
def test_dp_sgd_step_errors(args: tuple, match: str) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=match):
        dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), *args)


# Other paths of the Function


def test_recompute_model_gives_the_same_per_sample_gradients() -> None:
    model = BackpropMLP(SIZES, activation="gelu", recompute=True, dtype=DTYPE)
    x, y = make_data((BATCH, 2))
    loop = loop_grads(model, x, y, "mean")
    with per_sample(model) as ps:
        batch_loss(model(x), y, "mean").backward()
    for (name, p), expected in zip(model.named_parameters(), loop, strict=True):
        assert_close(p.grad_sample, expected, TOL, name)
    assert_close(ps.norms, flat_norms(loop), TOL, "norms")


def test_dropout_per_sample_gradients_add_up_to_the_gradient() -> None:
    # The twin cannot replay the masks, so the reference is the ordinary gradient of the same
    # backward (BP3-BP4, itself held to native autograd elsewhere) and clipping at infinity.
    model = BackpropMLP(SIZES, activation="relu", dropout=0.5, dtype=DTYPE).train()
    x, y = make_data((BATCH,))
    torch.manual_seed(5)
    with per_sample(model, loss_reduction="mean") as ps:
        batch_loss(model(x), y, "mean").backward()
    grad_samples = [p.grad_sample for p in model.parameters()]
    for (name, p), g in zip(model.named_parameters(), grad_samples, strict=True):
        assert_close(g.mean(0), p.grad, TOL, name)
    assert_close(ps.norms, flat_norms(grad_samples), TOL, "norms")
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with per_sample(model, max_grad_norm=math.inf):
        batch_loss(model(x), y, "mean").backward()
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        assert_close(p.grad, g, TOL, f"{name} (clipped at infinity)")


def test_autocast_bfloat16_clipping_is_close_to_float32() -> None:
    model = BackpropMLP([16, 32, 32, 4], activation="tanh")
    x, y = torch.randn(8, 16), torch.randint(4, (8,))
    with per_sample(model, max_grad_norm=0.5) as ps:
        F.cross_entropy(model(x), y).backward()
    expected, expected_norms = [p.grad.clone() for p in model.parameters()], ps.norms
    model.zero_grad(set_to_none=True)
    with per_sample(model, max_grad_norm=0.5) as ps, torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x), y).backward()
    assert ps.norms.dtype == torch.float32
    torch.testing.assert_close(ps.norms, expected_norms, rtol=5e-2, atol=1e-3)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, e, rtol=5e-2, atol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
