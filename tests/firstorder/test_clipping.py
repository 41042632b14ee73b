"""Every clipping style against a float64 per-sample loop that clips by its rule, and against Opacus."""

from __future__ import annotations

import math

import pytest
import torch
from _per_sample_helpers import BATCH, TOL, batch_loss, loop_grads, make_data, make_model
from conftest import assert_close

from torch_backprop import AdaptiveClipping, dp_sgd_step, per_sample


def group_of(style: str, depth: int = 3, groups: list[int] | None = None) -> list[int]:
    """The group index of each parameter (weight, bias per layer) under ``style``."""
    if style in ("flat", "adaptive"):
        return [0] * (2 * depth)
    if style in ("per_layer", "param-wise"):
        return list(range(2 * depth))
    if style == "layer-wise":
        return [k for k in range(depth) for _ in (0, 1)]
    heads = groups or [0]
    return [sum(1 for head in heads if head <= k) - 1 for k in range(depth) for _ in (0, 1)]


def clip_by_rule(
    per_sample_grads: list[torch.Tensor],
    groups: list[int],
    thresholds: list[float],
    function: str,
    gamma: float,
) -> list[torch.Tensor]:
    """Σ_b c_{b,g} g_{b,p} with CL1 (Abadi) or CL2 (automatic), from materialised g_b."""
    norms = {}
    for g in set(groups):
        parts = [per_sample_grads[i].flatten(1) for i in range(len(groups)) if groups[i] == g]
        norms[g] = torch.cat(parts, 1).norm(dim=1)
    factors = {
        g: thresholds[g] / (n + gamma) if function == "automatic" else (thresholds[g] / n).clamp(max=1.0)
        for g, n in norms.items()
    }
    return [
        torch.einsum("b,b...->...", factors[g], grad)
        for g, grad in zip(groups, per_sample_grads, strict=True)
    ]


CASES = [
    ("flat", None, [0.05], None),
    ("per_layer", [0.02, 0.1, 0.03, 0.2, 0.01, 0.05], None, None),
    ("layer-wise", 0.06, None, None),
    ("param-wise", 0.06, None, None),
    ("group-wise", 0.06, None, [0, 2]),
    ("layer-wise", [0.01, 0.2, 0.05], None, None),
]


@pytest.mark.parametrize("function", ["Abadi", "automatic"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("style", "given", "flat", "heads"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_style_matches_a_per_sample_loop(style, given, flat, heads, function, reduction) -> None:
    model = make_model("tanh")
    x, y = make_data((BATCH, 2))
    loop = loop_grads(model, x, y, reduction)
    groups = group_of(style, groups=heads)
    count = len(set(groups))
    if isinstance(given, list):
        thresholds = given
    else:
        total = flat[0] if given is None else given
        thresholds = [total / math.sqrt(count)] * count
    expected = clip_by_rule(loop, groups, thresholds, function, 0.01)
    max_grad_norm = flat[0] if given is None else given
    with per_sample(
        model, reduction, max_grad_norm, clipping=style, clipping_fn=function, groups=heads, grad_sample=True
    ) as ps:
        batch_loss(model(x), y, reduction).backward()
    divisor = BATCH if reduction == "mean" else 1
    for (name, p), g, ref in zip(model.named_parameters(), expected, loop, strict=True):
        assert_close(p.grad, g / divisor, TOL, f"{style} {name}")
        assert_close(p.grad_sample, ref, TOL, f"{name}.grad_sample (unclipped)")
    assert math.isclose(ps.rule.sensitivity, math.sqrt(sum(c * c for c in thresholds)), rel_tol=1e-12)


def test_per_layer_noise_is_calibrated_to_the_norm_of_the_thresholds() -> None:
    model = make_model("relu", sizes=[30, 40, 3])
    x, y = torch.randn(BATCH, 30, dtype=torch.float64), torch.randint(3, (BATCH,))
    thresholds, sigma = [0.3, 0.1, 0.4, 0.2], 2.0
    with per_sample(model, "sum", thresholds, clipping="per_layer"):
        batch_loss(model(x), y, "sum").backward()
    clipped = [p.grad.clone() for p in model.parameters()]
    dp_sgd_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), sigma, thresholds, generator=torch.Generator()
    )
    noise = torch.cat([(p.grad - g).flatten() for p, g in zip(model.parameters(), clipped, strict=True)])
    std = sigma * math.sqrt(sum(c * c for c in thresholds))
    assert noise.std().item() == pytest.approx(std, rel=0.1)  # 1,363 draws


def test_per_layer_equals_opacus() -> None:
    opacus = pytest.importorskip("opacus")
    model = make_model("sigmoid")
    x, y = make_data((BATCH,))
    thresholds = [0.02, 0.1, 0.03, 0.2, 0.01, 0.05]
    twin = model.to_sequential()
    gsm = opacus.GradSampleModule(twin)
    optimizer = opacus.optimizers.DPPerLayerOptimizer(
        torch.optim.SGD(twin.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=thresholds,
        expected_batch_size=BATCH,
    )  # fmt: skip
    batch_loss(gsm(x), y, "mean").backward()
    optimizer.step()
    with per_sample(model, "mean", thresholds, clipping="per_layer"):
        batch_loss(model(x), y, "mean").backward()
    dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=1.0), 0.0, thresholds, BATCH)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        # Opacus divides by ‖g‖ + 1e-6, this package by ‖g‖: 1e-6 relative.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)


def test_adaptive_clipping_equals_opacus_with_the_same_draws() -> None:
    opacus = pytest.importorskip("opacus")
    model = make_model("tanh")
    twin = model.to_sequential()
    options = {"target_unclipped_quantile": 0.6, "clipbound_learning_rate": 0.3, "max_clipbound": 10.0,
               "min_clipbound": 1e-3, "unclipped_num_std": 2.0}  # fmt: skip
    adaptive = AdaptiveClipping(0.05, **options)
    gsm = opacus.GradSampleModule(twin)
    optimizer = opacus.optimizers.AdaClipDPOptimizer(
        torch.optim.SGD(twin.parameters(), lr=0.5), noise_multiplier=1.5, max_grad_norm=0.05,
        expected_batch_size=BATCH, generator=torch.Generator().manual_seed(4), **options,
    )  # fmt: skip
    ours = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(4)
    data = torch.Generator().manual_seed(0)
    bounds = []
    for _ in range(5):
        x = torch.randn(BATCH, 4, generator=data, dtype=torch.float64)
        y = torch.randint(3, (BATCH,), generator=data)
        optimizer.zero_grad()
        batch_loss(gsm(x), y, "mean").backward()
        optimizer.step()
        ours.zero_grad(set_to_none=True)
        with per_sample(model, "mean", adaptive, clipping="adaptive"):
            batch_loss(model(x), y, "mean").backward()
        dp_sgd_step(model, ours, 1.5, adaptive, BATCH, generator)
        bounds.append((adaptive.max_grad_norm, float(optimizer.max_grad_norm)))
    for ours_c, theirs_c in bounds:  # Opacus draws the count's noise in float32, this package in float64
        assert ours_c == pytest.approx(theirs_c, rel=1e-6)
    assert len({c for c, _ in bounds}) == 5  # the bound moved every step
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)


def test_adaptive_clipping_tracks_the_quantile() -> None:
    # Without noise on the count, C settles where the target fraction of samples is unclipped.
    model = make_model("tanh", sizes=[4, 6, 3])
    adaptive = AdaptiveClipping(1e-4, target_unclipped_quantile=0.5, clipbound_learning_rate=0.5,
                                unclipped_num_std=1e-9)  # fmt: skip
    x, y = make_data((64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        with per_sample(model, "sum", adaptive, clipping="adaptive") as ps:
            batch_loss(model(x), y, "sum").backward()
        dp_sgd_step(model, optimizer, 0.0, adaptive)
    median = ps.norms.median().item()
    assert adaptive.max_grad_norm == pytest.approx(median, rel=0.15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(
            {"max_grad_norm": 1.0, "clipping": "blockwise"}, "clipping to be one of", id="unknown-style"
        ),
        pytest.param(
            {"max_grad_norm": 1.0, "clipping": "per_layer"}, "one per trainable", id="per-layer-float"
        ),
        pytest.param({"max_grad_norm": [1.0, 2.0], "clipping": "layer-wise"}, "3 thresholds", id="count"),
        pytest.param({"max_grad_norm": [1.0], "clipping": "flat"}, "thresholds", id="flat-list"),
        pytest.param({"max_grad_norm": 1.0, "clipping": "group-wise", "groups": [1]}, "groups", id="heads"),
        pytest.param({"max_grad_norm": 1.0, "groups": [0]}, "only with clipping='group-wise'", id="groups"),
        pytest.param({"max_grad_norm": 1.0, "clipping": "adaptive"}, "AdaptiveClipping", id="adaptive-float"),
        pytest.param({"max_grad_norm": 1.0, "clipping_fn": "auto"}, "clipping_fn", id="function"),
        pytest.param({"clipping": "layer-wise"}, "needs max_grad_norm", id="no-threshold"),
        pytest.param({"max_grad_norm": [1.0, -2.0, 1.0], "clipping": "layer-wise"}, "> 0", id="negative"),
    ],
)
def test_bad_clipping_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        per_sample(make_model(), **kwargs)


def test_adaptive_noise_needs_a_larger_count_noise() -> None:
    model = make_model()
    adaptive = AdaptiveClipping(1.0, unclipped_num_std=0.5)
    x, y = make_data((BATCH,))
    with per_sample(model, "sum", adaptive, clipping="adaptive"):
        batch_loss(model(x), y, "sum").backward()
    with pytest.raises(ValueError, match="noise_multiplier < 2 \\* unclipped_num_std"):
        dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.5, adaptive)


def test_blocks_with_different_rules_do_not_add_up() -> None:
    model = make_model()
    (x1, y1), (x2, y2) = make_data((BATCH,)), make_data((BATCH,))
    with per_sample(model, "sum", 0.1):
        batch_loss(model(x1), y1, "sum").backward()
    with per_sample(model, "sum", 0.1, clipping="layer-wise"):
        batch_loss(model(x2), y2, "sum").backward()
    with pytest.raises(RuntimeError, match="not the clipped sum"):
        dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0)
