"""Per-sample references for the per_sample, dp_sgd and opacus_hooks tests: loops and vmap on the native twin.

Per-sample gradients follow Opacus: the gradient of sample b's own loss term ℓ_b, where the batch
loss is Σ_b ℓ_b ("sum") or (1/B) Σ_b ℓ_b ("mean").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCE
from torch.func import functional_call, grad, vmap

from torch_backprop import BackpropMLP

DTYPE = torch.float64
TOL = GRAD_TOLERANCE[DTYPE]
SIZES = [4, 6, 5, 3]
BATCH = 5


def make_model(activation: str = "tanh", bias: bool = True, sizes: list[int] = SIZES) -> BackpropMLP:
    return BackpropMLP(sizes, activation=activation, bias=bias, dtype=DTYPE)


def make_data(shape: tuple[int, ...], classes: int = SIZES[-1]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (B, *, n_0) and integer targets (B, *)."""
    return torch.randn(*shape, SIZES[0], dtype=DTYPE), torch.randint(classes, shape)


def batch_loss(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy over all rows; "mean" averages over them, i.e. (1/B) Σ_b (mean of sample b's rows)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def ordinary_grads(model: BackpropMLP, x: torch.Tensor, y: torch.Tensor, reduction: str) -> tuple:
    """The whole batch's gradients by native autograd on the twin."""
    twin = model.to_sequential()
    return torch.autograd.grad(batch_loss(twin(x), y, reduction), trainable(twin))


def loop_grads(model: BackpropMLP, x: torch.Tensor, y: torch.Tensor, reduction: str) -> list[torch.Tensor]:
    """[B, *p.shape] per trainable parameter: ordinary backward on the twin, one sample at a time."""
    twin = model.to_sequential()
    per_param: list[list[torch.Tensor]] = [[] for _ in trainable(twin)]
    for b in range(x.shape[0]):
        grads = torch.autograd.grad(batch_loss(twin(x[b : b + 1]), y[b : b + 1], reduction), trainable(twin))
        for store, g in zip(per_param, grads, strict=True):
            store.append(g)
    return [torch.stack(store) for store in per_param]


def vmap_grads(model: BackpropMLP, x: torch.Tensor, y: torch.Tensor, reduction: str) -> list[torch.Tensor]:
    """[B, *p.shape] per trainable parameter from torch.func.vmap(grad(...)) on the twin."""
    twin = model.to_sequential()
    params = {name: p.detach() for name, p in twin.named_parameters() if p.requires_grad}
    buffers = {name: p.detach() for name, p in twin.named_parameters() if not p.requires_grad}

    def sample_loss(params: dict[str, torch.Tensor], x_b: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        out = functional_call(twin, (params, buffers), (x_b.unsqueeze(0),))
        return batch_loss(out, y_b.unsqueeze(0), reduction)

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return list(grads.values())


def flat_norms(per_sample_grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in per_sample_grads], dim=1).norm(dim=1)


def clipped_reference(
    per_sample_grads: list[torch.Tensor], threshold: float, reduction: str
) -> list[torch.Tensor]:
    """Σ_b min(1, C/‖g_b‖) g_b (/B for "mean"), from materialised per-sample gradients."""
    factor = (threshold / flat_norms(per_sample_grads)).clamp(max=1.0)
    divisor = per_sample_grads[0].shape[0] if reduction == "mean" else 1
    return [torch.einsum("b,b...->...", factor, g) / divisor for g in per_sample_grads]
