"""The brute-force reference of the KFAC tests: Kronecker factors from torch.func on the native twin.

Nothing here uses the package's Taylor pass, its adjoints or its activation registry. On
``model.to_sequential()`` in float64, a plain Taylor forward carries the rows [h; ∂h; Dh] of each
layer's input (σ' and σ'' of the twin's own activation modules by ``torch.func.jvp``) and adds a
zero perturbation ε^(l) (S, N, n_{l+1}) to each layer's output rows [z; ∂z; Dz]; ``torch.func.jacrev``
of the residual vector in the perturbations gives each point's adjoints g_{n,s} = ∂r_n/∂ε_{s,n}.
The forward's u, ∂u and D u are checked against ``tests/_pde_reference.reference`` (jacrev and
hessian of the twin) first, so the rows are the twin's. From rows and adjoints the factors are
formed by their definition, with explicit loops over layers:

    A = Σ_{n,s} z̃ z̃ᵀ / (N S),  z̃ = [z, 1] in the h row, [z, 0] in the others;  B = Σ_{n,s} w_n g gᵀ / N.
"""

from __future__ import annotations

import copy

import torch
from _pde_reference import reference
from torch.func import jacrev, jvp

from torch_backprop.pde import InputDerivatives


def _derivatives(activation, z):
    """σ'(z), σ''(z) of an elementwise module, by forward-mode torch.func."""

    def first(t):
        return jvp(activation, (t,), (torch.ones_like(t),))[1]

    return first(z), jvp(first, (z,), (torch.ones_like(z),))[1]


def _taylor_rows(twin, x, coordinates, matrix, drift, perturbations, order):
    """(layer inputs [(S, N, n_l)], the outputs u, ∂u (N, out, K), D u) of the twin, row by row."""
    rows = x.shape[0]
    h = x.unsqueeze(0)
    if order == 2:
        K = len(coordinates)
        dh = torch.zeros(K, rows, x.shape[1], dtype=x.dtype)
        for k, i in enumerate(coordinates):
            dh[k, :, i] = 1.0
        Dh = (drift.expand(rows, -1) if drift is not None else torch.zeros_like(x)).unsqueeze(0)
        h = torch.cat([h, dh, Dh])
    inputs, layer = [], 0
    for module in twin:
        if isinstance(module, torch.nn.Linear):
            inputs.append(h)
            z = h @ module.weight.t()
            if module.bias is not None:
                z = z + torch.cat([module.bias.expand(1, rows, -1), torch.zeros_like(z[1:])])
            h = z + perturbations[layer]
            layer += 1
            continue
        if order == 0:
            h = module(h)
            continue
        z, dz, Dz = h[0], h[1:-1], h[-1]
        s1, s2 = _derivatives(module, z)
        q = torch.einsum("njk,jno,kno->no", matrix.expand(rows, -1, -1), dz, dz)
        h = torch.cat([module(z).unsqueeze(0), s1 * dz, (s1 * Dz + s2 * q).unsqueeze(0)])
    if order == 0:
        return inputs, h[0], None, None
    return inputs, h[0], h[1:-1].permute(1, 2, 0), h[-1]


def reference_factors(model, x, residual, order, coordinates=None, matrix=None, drift=None, weight=1.0):
    """Per layer ``(A, B)`` over the layer's [W, b] (float64), by definition from the twin's rows and
    the adjoints of ``torch.func.jacrev``; also returns ``(Z, G)`` per layer for the dense tests."""
    twin = copy.deepcopy(model).double().to_sequential()
    x = x.double()
    if order == 2:
        matrix = matrix.double()
        drift = None if drift is None else drift.double()
        u, du, Du = reference(twin, x, coordinates, matrix, None, drift)
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    S = 1 if order == 0 else len(coordinates) + 2
    zeros = [torch.zeros(S, x.shape[0], m.out_features, dtype=torch.float64) for m in linears]

    def residuals(perturbations):
        _, value, gradient, operator = _taylor_rows(twin, x, coordinates, matrix, drift, perturbations, order)
        return residual(x, InputDerivatives(value, gradient, operator))

    inputs, value, gradient, operator = _taylor_rows(twin, x, coordinates, matrix, drift, zeros, order)
    if order == 2:  # the reference's own forward is the twin's
        torch.testing.assert_close(value, u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gradient, du, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(operator, Du, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(value, twin(x), rtol=1e-12, atol=1e-12)
    jacobians = jacrev(residuals)(zeros)  # per layer (N, S, N, n_{l+1})
    rows = x.shape[0]
    w = torch.as_tensor(weight, dtype=torch.float64).expand(rows)
    out, tapes = [], []
    for linear, Z, jac in zip(linears, inputs, jacobians, strict=True):
        G = torch.stack([jac[n, :, n] for n in range(rows)], 1)  # g_{n,s} = ∂r_n/∂ε_{s,n}, (S, N, n_{l+1})
        tapes.append((Z, G))
        trainable_w, trainable_b = linear.weight.requires_grad, linear.bias is not None
        trainable_b = trainable_b and model.layers[len(out)].bias.requires_grad
        trainable_w = model.layers[len(out)].weight.requires_grad
        if not (trainable_w or trainable_b):
            out.append(None)
            continue
        A = torch.zeros(0, 0, dtype=torch.float64)
        B = torch.zeros(linear.out_features, linear.out_features, dtype=torch.float64)
        for n in range(rows):
            for s in range(S):
                parts = []
                if trainable_w:
                    parts.append(Z[s, n])
                if trainable_b:
                    parts.append(torch.ones(1, dtype=torch.float64) * (1.0 if s == 0 else 0.0))
                z_tilde = torch.cat(parts)
                A = torch.outer(z_tilde, z_tilde) if A.numel() == 0 else A + torch.outer(z_tilde, z_tilde)
                B = B + w[n] * torch.outer(G[s, n], G[s, n])
        out.append(((A / (rows * S)).detach(), (B / rows).detach()))
    return out, [(Z.detach(), G.detach()) for Z, G in tapes]
