"""The torch.func reference of the PDE tests: u, ∂u, D u and a residual's Jacobian on the native twin."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev, vmap

from torch_backprop.pde import InputDerivatives


def reference(twin, x, coordinates, matrix, params=None, drift=None):
    """(u, ∂u (N, out, K), D u) of ``twin`` by torch.func: jacrev and hessian, per point."""
    params = dict(twin.named_parameters()) if params is None else params

    def f(point):
        return functional_call(twin, params, (point,))

    u = f(x)
    jacobian = vmap(jacrev(f))(x)
    hess = vmap(hessian(f))(x)[..., coordinates, :][..., coordinates]
    operator = torch.einsum("nojk,njk->no", hess, matrix.expand(x.shape[0], -1, -1))
    if drift is not None:
        operator = operator + torch.einsum("noi,ni->no", jacobian, drift.expand(x.shape[0], -1))
    return u, jacobian[..., coordinates], operator


def coefficient_cases(rows, count, dtype, dim=None):
    """name -> (keyword arguments, the (N, K, K) matrix they mean); ``dim``: the input's, for drifts."""
    g = torch.Generator().manual_seed(3)
    dim = count if dim is None else dim
    drift = torch.randn(dim, generator=g, dtype=dtype)
    per_point_drift = torch.randn(rows, dim, generator=g, dtype=dtype)
    diagonal = torch.randn(count, generator=g, dtype=dtype)
    per_point_diagonal = torch.randn(rows, count, generator=g, dtype=dtype)
    matrix = torch.randn(count, count, generator=g, dtype=dtype)
    per_point_matrix = torch.randn(rows, count, count, generator=g, dtype=dtype)
    symmetric = lambda m: 0.5 * (m + m.transpose(-1, -2))  # noqa: E731
    return {
        "identity": ({}, torch.eye(count, dtype=dtype)),
        "diagonal": ({"diagonal": diagonal}, torch.diag(diagonal)),
        "per-point-diagonal": ({"diagonal": per_point_diagonal}, torch.diag_embed(per_point_diagonal)),
        "matrix": ({"matrix": matrix}, symmetric(matrix)),
        "per-point-matrix": ({"matrix": per_point_matrix}, symmetric(per_point_matrix)),
        "matrix+drift": ({"matrix": matrix, "drift": drift}, symmetric(matrix)),
        "per-point-matrix+drift": (
            {"matrix": per_point_matrix, "drift": per_point_drift},
            symmetric(per_point_matrix),
        ),
        "diagonal+drift": ({"diagonal": diagonal, "drift": drift}, torch.diag(diagonal)),
        "per-point-diagonal+drift": (
            {"diagonal": per_point_diagonal, "drift": per_point_drift},
            torch.diag_embed(per_point_diagonal),
        ),
    }


def reference_jacobian(model, x, residual, order, coordinates=None, matrix=None, drift=None):
    """(r, J (N, D)) by torch.func on the twin: J = jacrev of the residual vector in the parameters."""
    twin = model.to_sequential()
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in twin.named_parameters() if not p.requires_grad}

    def residuals(params):
        params = {**params, **frozen}
        if order == 0:
            return residual(x, InputDerivatives(functional_call(twin, params, (x,)), None, None))
        return residual(x, InputDerivatives(*reference(twin, x, coordinates, matrix, params, drift)))

    params = {n: p.detach() for n, p in twin.named_parameters() if p.requires_grad}
    jac = jacrev(residuals)(params)
    return residuals(params), torch.cat([jac[n].flatten(1) for n in names], 1)
