"""Opacus pointed at a BackpropMLP gives what it gives on the native twin: ports of Opacus's own tests.

Ported cases: ``opacus/tests/grad_samples/linear_test.py`` (its hypothesis grid, against the
microbatch loop of ``grad_samples/common.py``), ``grad_sample_module_fast_gradient_clipping_test.py``
(ghost norms and clipped gradients against hooks + DPOptimizer), and ``PrivacyEngine.make_private``
with its accountant, on models that contain a BackpropMLP next to other layers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_backprop import BackpropMLP, per_sample

opacus = pytest.importorskip("opacus")
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
DTYPE = torch.float64
EXACT = (1e-12, 1e-12)
# Opacus's ghost norms take √ of a Gram-form sum of squares: for a norm near 0 the round-off of
# the sum (ε ≈ 2e-16 times the squared scale, here up to 1e-2) survives the root as √ε · scale.
GHOST = (1e-7, 1e-8)


def fused(output: torch.Tensor) -> bool:
    return "MLPFunction" in type(output.grad_fn).__name__


def l1_loss(output: torch.Tensor, reduction: str) -> torch.Tensor:
    """``ModelWithLoss`` of Opacus's tests: L1 distance to zeros."""
    return F.l1_loss(output, torch.zeros_like(output), reduction=reduction)


def microbatch(module: nn.Module, x: torch.Tensor, batch_first: bool, reduction: str) -> list[torch.Tensor]:
    """Opacus's reference: ordinary gradients one sample at a time, stacked batch-first."""
    samples = x if batch_first else x.transpose(0, 1)
    per_param: list[list[torch.Tensor]] = [[] for _ in module.parameters()]
    for x_b in samples:
        x_b = x_b.unsqueeze(0 if batch_first else 1)
        grads = torch.autograd.grad(l1_loss(module(x_b), reduction), list(module.parameters()))
        for store, g in zip(per_param, grads, strict=True):
            store.append(g)
    return [torch.stack(store) for store in per_param]


def opacus_grad_sample(
    module: nn.Module, x: torch.Tensor, batch_first: bool, reduction: str, mode: str
) -> list[torch.Tensor]:
    gsm = opacus.grad_sample.wrap_model(module, mode, batch_first=batch_first, loss_reduction=reduction)
    try:
        l1_loss(gsm(x), reduction).backward()
        return [p.grad_sample for p in module.parameters()]
    finally:
        gsm._close()


@given(
    N=st.integers(1, 4),
    Z=st.integers(1, 4),
    H=st.integers(1, 3),
    W=st.integers(10, 17),
    input_dim=st.integers(3, 4),
    bias=st.booleans(),
    batch_first=st.booleans(),
    depth=st.integers(1, 3),
)
@settings(deadline=None, max_examples=20)
def test_linear_grid_hooks_ew_and_per_sample(
    N: int, Z: int, H: int, W: int, input_dim: int, bias: bool, batch_first: bool, depth: int
) -> None:
    # Opacus's Linear(W, W + 2) grid, with a BackpropMLP of that width and 1-3 layers in its place.
    model = BackpropMLP([W] * depth + [W + 2], activation="tanh", bias=bias, dtype=DTYPE)
    x = torch.randn([N, Z, W] if input_dim == 3 else [N, Z, H, W], dtype=DTYPE)
    if not batch_first:
        x = x.transpose(0, 1)
    modes = ["hooks", "ew"] if batch_first else ["hooks"]
    for reduction in ("mean", "sum"):
        expected = microbatch(model.to_sequential(), x, batch_first, reduction)
        for mode in modes:
            for net in (model, model.to_sequential()):
                got = opacus_grad_sample(net, x, batch_first, reduction, mode)
                for k, (g, ref) in enumerate(zip(got, expected, strict=True)):
                    assert_close(g, ref, EXACT, f"{type(net).__name__} {mode} {reduction} parameter {k}")
                net.zero_grad(set_to_none=True)
        with per_sample(model, loss_reduction=reduction, batch_first=batch_first):
            l1_loss(model(x), reduction).backward()
        for k, (p, ref) in enumerate(zip(model.parameters(), expected, strict=True)):
            assert_close(p.grad_sample, ref, EXACT, f"per_sample {reduction} parameter {k}")
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_hooks_run_on_the_fused_stack(mode: str) -> None:
    model = BackpropMLP([6, 8, 3], activation="relu", dtype=DTYPE)
    twin = model.to_sequential()
    x, y = torch.randn(5, 6, dtype=DTYPE), torch.randint(3, (5,))
    results = []
    for net in (model, twin):
        gsm = opacus.grad_sample.wrap_model(net, mode)
        out = gsm(x)
        assert fused(out) == (net is model)
        F.cross_entropy(out, y).backward()
        results.append([(p.grad_sample, p.grad) for p in net.parameters()])
        gsm._close()
    for (g, grad), (g_ref, grad_ref) in zip(*results, strict=True):
        assert_close(g, g_ref, EXACT, "grad_sample")
        assert_close(grad, grad_ref, EXACT, "grad")


def test_opacus_and_per_sample_at_once_is_refused() -> None:
    model = BackpropMLP([4, 3], dtype=DTYPE)
    gsm = GradSampleModule(model)
    with per_sample(model), pytest.raises(RuntimeError, match="one per-sample mechanism at a time"):
        gsm(torch.randn(2, 4, dtype=DTYPE))
    gsm._close()


class SampleModule(nn.Module):
    """Opacus's ghost-clipping SampleModule with its Linear stacks as BackpropMLPs (or their twins)."""

    def __init__(self, native: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = BackpropMLP([2, 2], output_activation="relu", dtype=DTYPE)
        self.layer_norm = nn.LayerNorm(2, dtype=DTYPE)
        self.rest = BackpropMLP([2, 64, 64, 1], activation="identity", dtype=DTYPE)
        if native:
            self.fc1, self.rest = self.fc1.to_sequential(), self.rest.to_sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.fc1(x))
        return F.softmax(self.rest(x).flatten(start_dim=1), dim=1)


@pytest.mark.parametrize("length", [1, 5])
def test_ghost_clipping_norms_and_gradients(length: int) -> None:
    size, clip = 10, 1.0
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, length, 2, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 2, (size, length), generator=generator).to(DTYPE)
    criterion = nn.CrossEntropyLoss()
    results = {}
    for native in (False, True):
        normal = GradSampleModule(SampleModule(native))
        optimizer = DPOptimizer(
            torch.optim.SGD(normal.parameters(), lr=1), noise_multiplier=0.0, max_grad_norm=clip,
            expected_batch_size=size,
        )  # fmt: skip
        criterion(normal(x), y).backward()
        norms_normal = torch.stack(
            [g.flatten(1).norm(dim=1) for g in (p.grad_sample for p in normal.parameters())]
        )
        optimizer.step()
        summed = [p.summed_grad for p in normal.parameters()]
        ghost = GradSampleModuleFastGradientClipping(
            SampleModule(native), max_grad_norm=clip, use_ghost_clipping=True
        )
        optimizer_gc = DPOptimizerFastGradientClipping(
            torch.optim.SGD(ghost.parameters(), lr=1), noise_multiplier=0.0, max_grad_norm=clip,
            expected_batch_size=size,
        )  # fmt: skip
        criterion_gc = DPLossFastGradientClipping(ghost, optimizer_gc, criterion)
        criterion_gc(ghost(x), y).backward()
        norms_ghost = torch.stack([p._norm_sample for p in ghost.parameters()])
        assert_close(norms_ghost, norms_normal, GHOST, "ghost norms against hooks norms")
        for g, s in zip((p.grad for p in ghost.parameters()), summed, strict=True):
            assert_close(g, s, GHOST, "ghost-clipped gradient against DPOptimizer's clipped sum")
        results[native] = (norms_ghost, [p.grad for p in ghost.parameters()])
    assert_close(results[False][0], results[True][0], EXACT, "norms: BackpropMLP against the twin")
    for g, ref in zip(results[False][1], results[True][1], strict=True):
        assert_close(g, ref, EXACT, "clipped gradient: BackpropMLP against the twin")


class HeadNet(nn.Module):
    """A small CNN whose head is a BackpropMLP (or its twin), as in the MNIST example."""

    def __init__(self, native: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, dtype=DTYPE)
        self.head = BackpropMLP([3 * 4 * 4, 16, 10], dtype=DTYPE)
        if native:
            self.head = self.head.to_sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_make_private_trains_as_on_the_twin(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(32, 1, 6, 6, generator=generator, dtype=DTYPE),
        torch.randint(10, (32,), generator=generator),
    )
    finals, epsilons = [], []
    for native in (False, True):
        net = HeadNet(native)
        assert ModuleValidator.validate(net, strict=False) == []
        engine = opacus.PrivacyEngine()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        kwargs = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
        made = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=0.7, max_grad_norm=0.5,
            grad_sample_mode=mode, poisson_sampling=False, noise_generator=torch.Generator().manual_seed(3),
            **kwargs,
        )  # fmt: skip
        module, optimizer, *rest = made
        criterion, loader = (rest[0], rest[1]) if mode == "ghost" else (nn.CrossEntropyLoss(), rest[0])
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(module(xb), yb).backward()
            optimizer.step()
        finals.append([p.detach().clone() for p in net.parameters()])
        epsilons.append(engine.get_epsilon(delta=1e-5))
    for p, ref in zip(*finals, strict=True):
        assert_close(p, ref, EXACT, "parameters after a private epoch")
    assert epsilons[0] == epsilons[1] > 0
    assert not torch.equal(finals[0][0], HeadNet().conv.weight)


def test_before_hooks_were_served_no_grad_sample_was_made() -> None:
    # What main did before: Opacus's hooks never fired, so make_private failed at the step.
    net = HeadNet()
    gsm = GradSampleModule(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(torch.randn(4, 1, 6, 6, dtype=DTYPE)), torch.randint(10, (4,))).backward()
    for name, p in net.named_parameters():
        assert getattr(p, "grad_sample", None) is not None, f"{name} has no grad_sample"
        assert p.grad_sample.shape == (4, *p.shape)
    gsm._close()
