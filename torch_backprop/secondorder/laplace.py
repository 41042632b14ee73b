r"""A laplace-torch curvature backend for models that are, or end in, a :class:`BackpropMLP`.

laplace-torch (Daxberger et al., 2021) takes the curvature of a Laplace approximation from
interchangeable backends (``BackPackGGN``, ``CurvlinopsGGN``, ...). :class:`BackpropGGN` is one more:

    from laplace import Laplace
    from torch_backprop.laplace import BackpropGGN, split_last_layer

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=BackpropGGN)                       # or "kron"; model: BackpropMLP
    la = Laplace(split_last_layer(model), "classification", subset_of_weights="last_layer",
                 hessian_structure="kron", backend=BackpropGGN)

It gives what ``BackPackGGN`` gives on the native twin (the tests compare the posterior precisions),
from :func:`~torch_backprop.curvature`'s one backward per batch: the GGN diagonal
(``diag_ggn_exact``, or ``diag_ggn_mc`` with ``backend_kwargs={"stochastic": True}``) and the
Kronecker factors (``kflr`` / ``kfac``), times laplace's likelihood factor (1 for cross-entropy,
½ for the sum of squares). The Jacobians of the GLM predictive come from the same recursion on C
columns (:func:`~torch_backprop.secondorder.products.output_jacobians`, JB1) instead of C backward passes.

``subset_of_weights="all"`` takes a BackpropMLP, or an ``nn.Sequential`` that ends in one with every
earlier parameter frozen. ``"last_layer"`` takes the same models: laplace-torch finds the last
layer and its input φ with a forward hook on the last ``nn.Linear``, which fires as on the twin (a
BackpropMLP whose layers carry hooks runs them layer by layer), and the curvature of f = W φ + b
is the recursion on a stack of depth 1. :func:`split_last_layer` gives the same network with its
last layer as a native ``nn.Linear`` after a shorter BackpropMLP, whose body then stays fused.

laplace-torch is an optional dependency (``pip install torch-backprop[curvature]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.activations import get_activation
from ..core.module import BackpropMLP
from ..core.phases import Tape
from .curvature import curvature
from .loss_hessians import LossSpec
from .products import output_jacobians
from .recursion import ggn_quantities

try:
    from laplace.curvature import GGNInterface
    from laplace.utils import Kron
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_backprop.laplace needs laplace-torch: pip install 'torch-backprop[curvature]'"
    ) from error

__all__ = ["BackpropGGN", "split_last_layer"]


def _final_mlp(model: nn.Module) -> tuple[list[nn.Module], BackpropMLP]:
    """``(prefix modules, the BackpropMLP)`` of a BackpropMLP or an nn.Sequential ending in one."""
    if isinstance(model, BackpropMLP):
        return [], model
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], BackpropMLP):
        return list(model)[:-1], model[-1]
    raise TypeError(
        "BackpropGGN expects a BackpropMLP or an nn.Sequential whose last module is one, "
        f"got {type(model).__name__}"
    )


def split_last_layer(model: nn.Module) -> nn.Sequential:
    """The same network with its last layer as a native ``nn.Linear``, for last-layer Laplace.

    ``model`` is a BackpropMLP of depth L ≥ 2 without output activation, or an ``nn.Sequential``
    ending in one. The result is ``nn.Sequential(*prefix, BackpropMLP(L - 1 layers), [nn.Dropout],
    nn.Linear)``, holding the very same ``nn.Linear`` modules (parameters shared, not copied), so
    its output equals the model's and laplace-torch's hooks see the last layer's input.

    Raises:
        TypeError: not a BackpropMLP (or a Sequential ending in one).
        ValueError: depth 1, or an output activation (last-layer Laplace wants f = W φ + b).
    """
    prefix, mlp = _final_mlp(model)
    if len(mlp.layers) < 2:
        raise ValueError("split_last_layer expects a BackpropMLP with at least 2 layers, got 1")
    if mlp.activations[-1].name != "identity":
        raise ValueError(
            f"split_last_layer expects no output activation (last-layer Laplace reads f = W φ + b), "
            f"got {mlp.activations[-1]!r}"
        )
    weight = mlp.layers[0].weight
    body = BackpropMLP(
        mlp.sizes[:-1],
        activation=list(mlp.activations[:-2]),
        output_activation=mlp.activations[-2],
        bias=mlp.layers[0].bias is not None,
        recompute=mlp.recompute,
        device=weight.device,
        dtype=weight.dtype,
    )
    body.layers = nn.ModuleList(list(mlp.layers)[:-1])  # the same modules: parameters are shared
    dropout = [nn.Dropout(mlp.dropout)] if mlp.dropout else []
    return nn.Sequential(*prefix, body, *dropout, mlp.layers[-1]).train(mlp.training)


class BackpropGGN(GGNInterface):
    """laplace-torch's ``GGNInterface`` from the δ recursion on K columns (see the module docstring).

    Args:
        model: the network (laplace passes its ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``"classification"`` (cross-entropy) or ``"regression"`` (squared error).
        last_layer: only the last layer's parameters (set by laplace's last-layer classes).
        subnetwork_indices: indices into the flattened parameters (diagonal structure only).
        dict_key_x: laplace's key for dict inputs (dict inputs are not supported here).
        dict_key_y: likewise for targets.
        stochastic: the Monte Carlo GGN (Fisher) instead of the exact one.
        num_samples: labels drawn per sample for the Monte Carlo GGN.

    Raises:
        TypeError: a model that is not, and does not end in, a BackpropMLP.
        ValueError: trainable parameters outside the final BackpropMLP; (last layer, on ``fit``) an
            output that is not the last layer's W φ + b.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        )
        self.loss_spec = LossSpec.from_module(self.lossfunc, "BackpropGGN")
        if last_layer:  # φ comes from laplace's forward hook on the last nn.Linear, as on the twin
            self.prefix, self.mlp = [], None
            return
        self.prefix, self.mlp = _final_mlp(model)
        outside = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and not any(p is q for q in self.mlp.parameters())
        ]
        if outside:
            raise ValueError(
                "BackpropGGN expects every trainable parameter inside the final BackpropMLP, got "
                f"{outside[0]} outside it; freeze the modules before it (requires_grad_(False))"
            )

    @property
    def _quantities(self) -> tuple[str, str]:
        return ("diag_ggn_mc", "kfac") if self.stochastic else ("diag_ggn_exact", "kflr")

    def _rows(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.likelihood == "regression":
            return f, y
        return f.view(-1, f.size(-1)), y.view(-1)

    def _curvature(self, x: Tensor, y: Tensor, name: str) -> tuple[Tensor, list[Any]]:
        """The loss and ``name`` for every parameter in ``self.params``' order, from one backward."""
        if self.last_layer:
            return self._last_layer_curvature(x, y, name)
        with curvature(self.mlp, self.lossfunc, name, mc_samples=self.num_samples):
            loss = self.lossfunc(*self._rows(self.model(x), y))
            loss.backward()
        return loss.detach(), [getattr(p, name) for p in self.params]

    def _last_layer_curvature(self, x: Tensor, y: Tensor, name: str) -> tuple[Tensor, list[Any]]:
        """CV1-CV5 for the last layer alone: a stack of depth 1 whose input is laplace's features φ."""
        with torch.no_grad():
            f, phi = self.model.forward_with_features(x)
            layer = self.model.last_layer
            if not torch.allclose(f, F.linear(phi, layer.weight, layer.bias), rtol=1e-4, atol=1e-5):
                raise ValueError(
                    "BackpropGGN: the output is not the last layer's W φ + b (an output activation?)"
                )
            f_rows, y_rows = self._rows(f, y)
            loss = self.lossfunc(f_rows, y_rows)
            phi = phi.reshape(-1, phi.shape[-1])
            if name in ("diag_ggn_exact", "kflr"):
                S = self.loss_spec.sqrt_hessian(f_rows)
            else:
                S, _ = self.loss_spec.sqrt_hessian_sampled(f_rows, self.num_samples, None)
            identity = (get_activation("identity"),)
            tape = Tape(f_rows, [phi], [None], [layer.weight], [], identity, layer.weight.dtype)
            needs = (layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad)
            values = ggn_quantities(tape, S, [name], [(0, *needs)], phi.shape[0])
        kinds = [kind for kind, need in zip(("weight", "bias"), needs, strict=True) if need]
        return loss, [values[0, kind, name] for kind in kinds]

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The loss and the GGN diagonal (exact, or Monte Carlo with ``stochastic``), laplace's scaling."""
        loss, values = self._curvature(x, y, self._quantities[0])
        diagonal = torch.cat([v.flatten() for v in values])
        if self.subnetwork_indices is not None:
            diagonal = diagonal[self.subnetwork_indices]
        return self.factor * loss, self.factor * diagonal

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """The loss and the Kronecker factors (KFLR, or KFAC with ``stochastic``), laplace's scaling."""
        loss, values = self._curvature(x, y, self._quantities[1])
        kron = Kron([list(v) for v in values])
        for factors in kron.kfacs:  # A is a mean over this batch of M; laplace sums batches over N
            if len(factors) == 2:
                factors[1] *= len(y) / N
        return self.factor * loss, self.factor * kron

    def jacobians(self, x: Tensor, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """∂f/∂θ (batch, outputs, parameters) and f, from one recursion on C columns (JB1)."""
        if enable_backprop or self.last_layer or self.subnetwork_indices is not None:
            return super().jacobians(x, enable_backprop)
        with torch.no_grad():
            for module in self.prefix:
                x = module(x)
            f, J = output_jacobians(self.mlp, x)
        return J, f.reshape(*x.shape[:-1], f.shape[-1])

    functorch_jacobians = jacobians
