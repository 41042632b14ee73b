"""Models, data and independent references for the curvature tests (BackPACK, curvlinops, torch.func)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from torch_backprop import BackpropMLP, curvature

DTYPE = torch.float64
# The project's bound for the exact quantities in float64: 1e-10 relative to the largest reference
# entry. Both sides sum the same products in another order: errors are a few ulps (2.2e-16) times
# the number of terms (at most a few hundred here), so 1e-10 leaves four orders of margin.
RTOL = 1e-10
SIZES = [4, 6, 5, 3]
LOSSES = {
    "ce-mean": lambda: nn.CrossEntropyLoss(),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
}


def assert_relative(actual, expected, name: str, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol max |expected|, for a tensor or a list of Kronecker factors."""
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, list) and len(actual) == len(expected), name
        for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_relative(a, e, f"{name}[{k}]", rtol)
        return
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    bound = rtol * scale if scale > 0 else 1e-14  # an all-zero reference (dead ReLUs): round-off only
    assert error <= bound, f"{name}: max error {error:.3g} vs largest entry {scale:.3g}"


def make_model(activation="tanh", sizes=SIZES, bias=True, **kwargs) -> BackpropMLP:
    torch.manual_seed(0)
    return BackpropMLP(sizes, activation=activation, bias=bias, dtype=DTYPE, **kwargs)


def make_data(loss: str, batch: int = 7, steps: int | None = None, sizes=SIZES):
    """Input (B, n_0) or (B, T, n_0) and a target for ``loss`` (classes, or values like the output)."""
    torch.manual_seed(1)
    shape = (batch,) if steps is None else (batch, steps)
    x = torch.randn(*shape, sizes[0], dtype=DTYPE)
    if loss.startswith("ce"):
        return x, torch.randint(sizes[-1], shape)
    return x, torch.randn(*shape, sizes[-1], dtype=DTYPE)


def call_loss(loss_function: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss on rows: (B, T, C) output flattened to (B T, C), as the curvature tests feed it."""
    if isinstance(loss_function, nn.CrossEntropyLoss):
        return loss_function(out.flatten(0, -2), y.flatten())
    return loss_function(out, y)


def ours(model, loss_function, x, y, quantities, **kwargs) -> tuple[dict, object]:
    """{quantity: [value per trainable parameter]} from one backward in a ``curvature`` block."""
    names = [quantities] if isinstance(quantities, str) else list(quantities)
    with curvature(model, loss_function, names, **kwargs) as block:
        call_loss(loss_function, model(x), y).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {name: [getattr(p, name) for p in trainable] for name in names}, block


def backpack_run(model, loss: str, x, y, extensions, names, seed=None) -> dict:
    """BackPACK's ``names`` on the extended native twin, one backward with ``extensions``."""
    backpack = pytest.importorskip("backpack")
    from backpack.custom_module.permute import Permute

    twin = model.to_sequential()
    if x.dim() == 3:  # CrossEntropyLoss wants the classes in dimension 1: (B, C, T)
        twin = nn.Sequential(*twin, Permute(0, 2, 1))
    twin = backpack.extend(twin)
    loss_function = backpack.extend(LOSSES[loss]())
    if seed is not None:
        torch.manual_seed(seed)
    with backpack.backpack(*extensions):
        loss_function(twin(x), y).backward()
    trainable = [p for p in twin.parameters() if p.requires_grad]
    return {name: [getattr(p, name) for p in trainable] for name in names}


# ---------------------------------------------------------------------------------------------
# torch.func float64 references: per-row Jacobians J_n, the loss's Hessian in the output.


def _reduction_scale(loss_function: nn.Module, out: torch.Tensor) -> float:
    """s of Q = s Σ_rows ℓ_n, as PyTorch defines "mean" (rows for CE, every entry for MSE)."""
    if loss_function.reduction == "sum":
        return 1.0
    rows = out.reshape(-1, out.shape[-1])
    return 1.0 / (rows.shape[0] if isinstance(loss_function, nn.CrossEntropyLoss) else rows.numel())


def _row_loss(loss_function: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ for one row (unscaled)."""
    if isinstance(loss_function, nn.CrossEntropyLoss):
        return F.cross_entropy(h.unsqueeze(0), target.unsqueeze(0), reduction="sum")
    return F.mse_loss(h, target, reduction="sum")


class FuncReference:
    """Exact per-row quantities of ``model``'s native twin by torch.func, for small cases."""

    def __init__(self, model: BackpropMLP, loss_function: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.twin = model.to_sequential()
        self.names = [n for n, p in self.twin.named_parameters() if p.requires_grad]
        self.params = {n: p.detach() for n, p in self.twin.named_parameters()}
        self.loss_function, self.batch = loss_function, x.shape[0]
        self.x_rows = x.reshape(-1, x.shape[-1])
        out = self.twin(self.x_rows).detach()
        self.out = out
        self.classes = out.shape[1]
        self.y_rows = (
            y.reshape(-1) if isinstance(loss_function, nn.CrossEntropyLoss) else y.reshape(-1, self.classes)
        )
        self.s = _reduction_scale(loss_function, out)

        def outputs(params):
            return functional_call(self.twin, params, (self.x_rows,))

        trainable = {n: self.params[n] for n in self.names}
        frozen = {n: p for n, p in self.params.items() if n not in trainable}
        jac = jacrev(lambda p: outputs({**p, **frozen}))(trainable)  # (N, C, *p.shape)
        self.jacobians = [jac[n].flatten(2) for n in self.names]  # (N, C, P_p)
        row_hessian = torch.func.vmap(hessian(_row_loss, argnums=1), in_dims=(None, 0, 0))
        self.hessians = self.s * row_hessian(loss_function, out, self.y_rows)  # ∂²Q/∂h_n², (N, C, C)

    def _per_sample(self, per_row: torch.Tensor, shape) -> torch.Tensor:
        return per_row.reshape(self.batch, -1, *per_row.shape[1:]).sum(1).reshape(self.batch, *shape)

    def ggn_diagonal(self, per_sample: bool = False) -> list[torch.Tensor]:
        """Σ_n diag(J_nᵀ H_n J_n), per parameter (or per sample: (B, *p.shape))."""
        result = []
        for name, J in zip(self.names, self.jacobians, strict=True):
            per_row = torch.einsum("ncp,ncd,ndp->np", J, self.hessians, J)
            shape = self.params[name].shape
            result.append(self._per_sample(per_row, shape) if per_sample else per_row.sum(0).reshape(shape))
        return result

    def sampled_ggn_diagonal(self, sampled: torch.Tensor, per_sample: bool = False) -> list[torch.Tensor]:
        """Σ_n Σ_m (J_nᵀ g_nm)² with g_nm = √(s/M) ∂ℓ(h_n, ŷ_nm)/∂h_n for the given draws ŷ."""
        mc = sampled.shape[0]
        grad_row = torch.func.vmap(torch.func.grad(_row_loss, argnums=1), in_dims=(None, 0, 0))
        g = torch.stack([grad_row(self.loss_function, self.out, draw) for draw in sampled])
        g = g * (self.s / mc) ** 0.5  # (M, N, C)
        result = []
        for name, J in zip(self.names, self.jacobians, strict=True):
            per_row = torch.einsum("ncp,mnc->mnp", J, g).square().sum(0)
            shape = self.params[name].shape
            result.append(self._per_sample(per_row, shape) if per_sample else per_row.sum(0).reshape(shape))
        return result

    def hessian_diagonal(self, per_sample: bool = False) -> list[torch.Tensor]:
        """diag ∂²Q/∂p² per parameter p, by torch.func.hessian (per sample: of sample b's terms)."""
        batches = range(self.batch) if per_sample else [None]
        rows_per_sample = self.x_rows.shape[0] // self.batch
        result = []
        for name in self.names:
            diagonals = []
            for b in batches:
                rows = slice(None) if b is None else slice(b * rows_per_sample, (b + 1) * rows_per_sample)

                def loss_of(p, rows=rows, name=name):
                    out = functional_call(self.twin, {**self.params, name: p}, (self.x_rows[rows],))
                    if isinstance(self.loss_function, nn.CrossEntropyLoss):
                        return self.s * F.cross_entropy(out, self.y_rows[rows], reduction="sum")
                    return self.s * F.mse_loss(out, self.y_rows[rows], reduction="sum")

                p = self.params[name]
                H = hessian(loss_of)(p).reshape(p.numel(), p.numel())
                diagonals.append(H.diagonal().reshape(p.shape))
            result.append(torch.stack(diagonals) if per_sample else diagonals[0])
        return result
