"""Shared fixtures and tolerances for the gradient-equivalence suite.

Tolerances are named once here, per dtype, separately for outputs and gradients (as tinygrad's
``helper_test_op`` does). Where each number comes from:

* float64: both sides run the same products in a different association order at most; errors are a
  few ulps (2.2e-16 each) times the depth, so 1e-12 leaves three orders of margin. The project's
  bound for float64 is 1e-12 relative.
* float32: same reasoning with ulp 1.2e-7; accumulation over up to a few hundred terms gives ~1e-6,
  hence 1e-5 for gradients (the project's bound) and 1e-6 for outputs (one product chain fewer).
* bfloat16 / float16: one rounding of the result is 3.9e-3 (bf16) / 4.9e-4 (fp16) relative; the
  same kernels run on both sides, but a different summation or rounding order may move an entry
  by a few of those roundings, so 2e-2 / 4e-3 relative, with an absolute floor for entries near 0.
"""

from __future__ import annotations

import pytest
import torch

from torch_backprop import BackpropMLP

# dtype -> (rtol, atol)
OUTPUT_TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
GRAD_TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float], name: str
) -> None:
    """``torch.testing.assert_close`` with the tolerance pair and a message naming the tensor."""
    rtol, atol = tolerance
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name} differs from native autograd: {m}"
    )


def run_and_grad(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor | None = None):
    """Output and gradients (input first, if it requires grad, then every trainable parameter)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = module(x)
    if upstream is None:
        generator = torch.Generator().manual_seed(1)
        upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    wrt = ([x] if x.requires_grad else []) + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, wrt, upstream, allow_unused=True) if wrt else []
    return out, list(grads)


def assert_matches_native(
    model: BackpropMLP,
    x: torch.Tensor,
    upstream: torch.Tensor | None = None,
    twin: torch.nn.Module | None = None,
) -> None:
    """Output first, then every gradient of ``model`` equal to native autograd on its twin.

    The twin is ``model.to_sequential()`` unless given (a native stack altered as ``model`` was).
    """
    if twin is None:
        twin = model.to_sequential()
    dtype = model.layers[0].weight.dtype
    out, grads = run_and_grad(model, x, upstream)
    ref_out, ref_grads = run_and_grad(twin, x, upstream)
    assert_close(out, ref_out, OUTPUT_TOLERANCE[dtype], "output")
    names = (["input"] if x.requires_grad else []) + [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    assert len(grads) == len(ref_grads) == len(names)
    for name, grad, ref in zip(names, grads, ref_grads, strict=True):
        assert (grad is None) == (ref is None), name
        if ref is not None:
            assert_close(grad, ref, GRAD_TOLERANCE[dtype], name)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: every refusal of the command's options must come before it."""
    from torch_backprop.cli import train

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(train, "_load_data", refuse)
