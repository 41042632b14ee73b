"""BackpropMLP: a fully connected stack trained by the slides' δ recursion, as an ``nn.Module``.

The layers are ordinary ``nn.Linear`` modules in ``self.layers`` (so initialisation, state_dict,
``.to()``, optimizers and saving behave as for native modules); only the forward call differs:
it runs :func:`torch_backprop.functional.mlp`, whose backward is the slides' backward phase
(slides 8-10). ``to_sequential`` / ``from_sequential`` convert to and from the native twin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activations import Activation, ActivationLike, activation_from_module, resolve_activations
from .functional import check_input, checked_mlp

__all__ = ["BackpropMLP"]


class BackpropMLP(nn.Module):
    r"""A multilayer perceptron whose backward pass is the slides' δ recursion.

    Computes, for l = 0, ..., L-1 with h^(0) = input:
    :math:`z^{(l+1)} = h^{(l)} W^{(l)} + b^{(l)}`, :math:`h^{(l+1)} = \sigma_{l+1}(z^{(l+1)})`,
    where the slides' W^(l) is ``layers[l].weight.T`` (``layers[l]`` is an ``nn.Linear``).
    Gradients equal native autograd's on :meth:`to_sequential` (the test suite checks this).

    Args:
        sizes: widths ``[n_0, n_1, ..., n_L]``: input features, hidden widths, output features.
        activation: σ of the hidden layers: a name (``"relu"``, ``"tanh"``, ...; see
            :func:`~torch_backprop.activations.available_activations`), an
            :class:`~torch_backprop.activations.Activation`, a native module such as
            ``nn.LeakyReLU(0.2)``, or a list with one per hidden layer. Default: ``"relu"``.
        output_activation: σ of the last layer; ``None`` (default) for none.
        bias: if ``False``, the layers have no bias. Default: ``True``.
        dropout: probability of zeroing a hidden unit in training mode (never the output), as
            ``nn.Dropout`` after each hidden activation. Default: ``0.0``.
        recompute: keep only the input for backward and recompute the forward there: least
            memory, more time. Default: ``False``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`H_{in} = \text{sizes}[0]`.
        - Output: :math:`(*, H_{out})` where :math:`H_{out} = \text{sizes}[-1]`.

    Attributes:
        layers (nn.ModuleList): the ``nn.Linear`` layers; ``layers[l].weight`` is W^(l)ᵀ, of
            shape ``(sizes[l+1], sizes[l])``, initialised as ``nn.Linear`` does.
        activations (tuple[Activation, ...]): σ_1, ..., σ_L (the last is the output activation).
        backward_phase: ``None`` for the slides' backward phase, or a replacement with the
            signature of :func:`torch_backprop.function.backward_phase` (:func:`per_sample` sets one).

    Raises:
        ValueError: fewer than 2 sizes, a non-positive size, a dropout outside [0, 1), an unknown
            activation name or a per-layer list of the wrong length.

    Examples::

        >>> model = BackpropMLP([784, 256, 10])
        >>> x = torch.randn(64, 784)
        >>> loss = nn.functional.cross_entropy(model(x), torch.randint(10, (64,)))
        >>> loss.backward()
        >>> model.layers[0].weight.grad.shape
        torch.Size([256, 784])
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: ActivationLike | Sequence[ActivationLike] = "relu",
        output_activation: ActivationLike = None,
        bias: bool = True,
        dropout: float = 0.0,
        recompute: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else sizes
        if not isinstance(sizes, list) or len(sizes) < 2:
            raise ValueError(f"BackpropMLP expects sizes with at least 2 entries (in, out), got {sizes!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes):
            raise ValueError(f"BackpropMLP expects positive integer sizes, got {sizes}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"BackpropMLP expects dropout in [0, 1), got {dropout!r}")
        hidden = resolve_activations(activation, len(sizes) - 2)
        (output,) = resolve_activations(output_activation, 1)
        super().__init__()
        self.sizes = sizes
        self.activations: tuple[Activation, ...] = (*hidden, output)
        self.dropout = float(dropout)
        self.recompute = recompute
        self.backward_phase: Callable[..., Any] | None = None
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out, bias=bias, **factory)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )

    @property
    def in_features(self) -> int:
        """``sizes[0]``."""
        return self.sizes[0]

    @property
    def out_features(self) -> int:
        """``sizes[-1]``."""
        return self.sizes[-1]

    def reset_parameters(self) -> None:
        """Re-initialise every layer as ``nn.Linear.reset_parameters`` does."""
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        """The stack's output; its backward is the slides' δ recursion."""
        # The registered submodules and parameters are read from their dicts: nn.Module.__getattr__
        # costs about as much per lookup as a small layer's product.
        weights, biases = [], []
        for layer in self._modules["layers"]:
            params = layer._parameters
            if type(layer) is nn.Linear and "weight" in params and "bias" in params:
                weights.append(params["weight"])
                biases.append(params["bias"])
            else:  # a parametrized (torch.nn.utils.parametrize) or pruned layer: its weight is computed
                weights.append(layer.weight)
                biases.append(layer.bias)
        check_input(input, weights[0], "BackpropMLP")
        return checked_mlp(
            input,
            weights,
            biases,
            self.activations,
            self.dropout,
            self.training,
            self.recompute,
            self.backward_phase,
        )

    def extra_repr(self) -> str:
        text = f"sizes={self.sizes}, activations={list(self.activations)}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.recompute:
            text += ", recompute=True"
        return text

    def to_sequential(self) -> nn.Sequential:
        """The native twin: ``nn.Sequential`` of ``nn.Linear``, activation and ``nn.Dropout`` modules.

        It holds copies of the current parameters (sharing no storage) and is in the same
        training mode, so native autograd on it is the reference this module is tested against.
        """
        modules: list[nn.Module] = []
        for k, (layer, act) in enumerate(zip(self.layers, self.activations, strict=True)):
            linear = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(layer.weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            linear.weight.requires_grad_(layer.weight.requires_grad)
            if layer.bias is not None:
                linear.bias.requires_grad_(layer.bias.requires_grad)
            modules.append(linear)
            if act.name != "identity":
                modules.append(act.to_module())
            if self.dropout and k < len(self.layers) - 1:
                modules.append(nn.Dropout(self.dropout))
        return nn.Sequential(*modules).train(self.training)

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential, *, recompute: bool = False) -> BackpropMLP:
        """A BackpropMLP equal to ``sequential``.

        ``sequential`` holds ``nn.Linear`` layers, each followed by at most one supported activation
        module and, between hidden layers, ``nn.Dropout`` of one common p.
        Parameters are copied (nothing is shared); dtype, device, training mode and
        ``requires_grad`` are kept.

        Raises:
            TypeError: a module that is not supported (named, with its index).
            ValueError: no ``nn.Linear``, mismatched widths, dropout rates that differ or dropout
                in a place BackpropMLP does not put it.
        """
        if not isinstance(sequential, nn.Sequential):
            raise TypeError(f"from_sequential expects an nn.Sequential, got {type(sequential).__name__}")
        linears: list[nn.Linear] = []
        activations: list[Activation | None] = []
        dropouts: list[tuple[int, float]] = []
        for index, module in enumerate(sequential):
            if isinstance(module, nn.Linear):
                linears.append(module)
                activations.append(None)
            elif not linears:
                raise TypeError(
                    f"from_sequential expects nn.Linear first, got {type(module).__name__} at index {index}"
                )
            elif isinstance(module, nn.Dropout):
                dropouts.append((len(linears) - 1, module.p))
            elif activations[-1] is None and not any(k == len(linears) - 1 for k, _ in dropouts):
                try:
                    activations[-1] = activation_from_module(module)
                except TypeError as error:
                    raise TypeError(f"from_sequential: module {index} ({module!r}): {error}") from None
            else:
                raise TypeError(
                    f"from_sequential: module {index} ({module!r}) is a second activation or follows "
                    "dropout; BackpropMLP supports Linear, activation, Dropout per layer"
                )
        if not linears:
            raise ValueError("from_sequential expects at least one nn.Linear, got none")
        sizes = [linears[0].in_features]
        for k, linear in enumerate(linears):
            if linear.in_features != sizes[-1]:
                raise ValueError(
                    f"from_sequential: Linear {k} takes {linear.in_features} inputs, "
                    f"but the layer before gives {sizes[-1]}"
                )
            sizes.append(linear.out_features)
        rates = {p for _, p in dropouts}
        if len(rates) > 1:
            raise ValueError(f"from_sequential expects one dropout rate for all layers, got {sorted(rates)}")
        dropout = rates.pop() if rates else 0.0
        hidden_layers = {k for k, _ in dropouts}
        if dropout and hidden_layers != set(range(len(linears) - 1)):
            raise ValueError(
                "from_sequential expects nn.Dropout after every hidden layer and not after the "
                f"output, got dropout after layers {sorted(hidden_layers)}"
            )
        biases = {linear.bias is not None for linear in linears}
        if len(biases) > 1:
            raise ValueError("from_sequential expects every nn.Linear with a bias, or none with one")
        weight = linears[0].weight
        acts = [a if a is not None else "identity" for a in activations]
        model = cls(
            sizes,
            activation=acts[:-1],
            output_activation=acts[-1],
            bias=biases.pop(),
            dropout=dropout,
            recompute=recompute,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for layer, linear in zip(model.layers, linears, strict=True):
                layer.weight.copy_(linear.weight)
                layer.weight.requires_grad_(linear.weight.requires_grad)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
                    layer.bias.requires_grad_(linear.bias.requires_grad)
        return model.train(sequential.training)
