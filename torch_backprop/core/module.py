"""BackpropMLP: a fully connected stack trained by the slides' δ recursion, as an ``nn.Module``.

The layers are ordinary ``nn.Linear`` modules in ``self.layers`` (so initialisation, state_dict,
``.to()``, optimizers and saving behave as for native modules); only the forward call differs:
it runs the stack as :func:`torch_backprop.functional.mlp` does (one
:class:`~torch_backprop.core.function.MLPFunction` node), whose backward is the slides' backward phase
(slides 8-10); :meth:`BackpropMLP.loss` puts the loss inside that node
(:class:`~torch_backprop.core.loss_function.FusedLossFunction`). ``to_sequential`` /
``from_sequential`` convert to and from the native twin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from .activations import Activation, ActivationLike, activation_from_module, resolve_activations
from .checks import check_input
from .function import checked_mlp
from .loss_function import check_per_sample, fusable, stack_loss
from .losses import check_target, resolve_loss
from .opacus_hooks import OpacusPhase, opacus_owner

__all__ = ["BackpropMLP"]

_PLAIN = (nn.Parameter, Tensor, type(None))


def _global_module_hooks() -> bool:
    """Whether hooks for every module (``torch.nn.modules.module.register_module_*_hook``) exist."""
    return bool(
        _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def _phase_name(phase: Any) -> str:
    return getattr(phase, "name", None) or f"the backward phase {phase!r}"


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
            signature of :func:`torch_backprop.core.phases.backward_phase`, or an object whose
            ``bind(model, input)`` returns one for each forward call (:func:`per_sample` sets one).

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
        """The stack's output; its backward is the slides' δ recursion.

        When a layer must run its own ``forward`` (it carries module hooks, is pruned, overrides
        ``forward``, or holds a tensor subclass such as Opacus's expanded weights), the stack runs
        layer by layer exactly as :meth:`to_sequential` would, so every hook fires with the
        tensors it would see there; Opacus's own per-sample hooks are served by the fused stack
        instead (:mod:`torch_backprop.core.opacus_hooks`).
        """
        weights, biases, plain, hooked = self._stack_parameters()
        phase = self.backward_phase
        opacus = opacus_owner(self._modules["layers"]) if plain and hooked else None
        if not plain or (hooked and opacus is None):
            return self._forward_layer_by_layer(input, phase)
        check_input(input, weights[0], "BackpropMLP")
        if opacus is not None:
            if phase is not None:
                raise RuntimeError(
                    f"BackpropMLP: Opacus's grad-sample hooks are on its layers and {_phase_name(phase)} "
                    "is active too; use one per-sample mechanism at a time"
                )
            phase = OpacusPhase(opacus, self._modules["layers"], input)
        elif phase is not None and hasattr(phase, "bind"):
            phase = phase.bind(self, input)  # a per-forward phase, e.g. per_sample's (bound to the batch)
        return checked_mlp(
            input,
            weights,
            biases,
            self.activations,
            self.dropout,
            self.training,
            self.recompute,
            phase,
        )

    def loss(
        self,
        input: Tensor,
        target: Tensor,
        loss: str | nn.Module | Callable[..., Tensor] = "cross_entropy",
        reduction: str | None = None,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        pos_weight: Tensor | None = None,
    ) -> Tensor:
        r"""The loss of the stack's output in one autograd node, whose backward starts from the slides' BP1.

        Equals ``F.cross_entropy(model(input).reshape(-1, C), target.reshape(-1), ...)``,
        ``F.mse_loss(model(input), target)`` or ``F.binary_cross_entropy_with_logits(model(input),
        target)``, value and gradients (:mod:`torch_backprop.core.losses`, FL1-FL3): instead of
        the loss's own autograd nodes, the backward starts the recursion from
        δ^(L) = Q'(h^(L) - y) ⊙ σ'_L(z^(L)). ``model(input)`` followed by any loss works as before.
        Where the fused node could not be exact (autocast, a target or weight that requires grad,
        layers that must run one by one) the native loss on ``model(input)`` is returned instead.

        Args:
            input: ``(*, H_in)``.
            target: class indices ``(*)`` (int64) for cross-entropy, else ``(*, H_out)`` in the
                output's dtype.
            loss: ``"cross_entropy"``, ``"mse_loss"`` (or ``"mse"``), ``"binary_cross_entropy_with_logits"``
                (or ``"bce_with_logits"``); the ``F`` function itself, or ``nn.CrossEntropyLoss``,
                ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` modules (with their options).
            reduction: ``"mean"`` or ``"sum"``; default: the module's, else ``"mean"``.
            weight: cross-entropy's class weights ``(C,)``; binary cross-entropy's ``weight``
                ``(C,)`` or the target's shape.
            ignore_index: cross-entropy's ignored class index (default -100).
            label_smoothing: cross-entropy's ε in [0, 1].
            pos_weight: binary cross-entropy's ``pos_weight`` ``(C,)``.

        Returns:
            The 0-d loss.

        Raises:
            ValueError, TypeError: an unknown loss or reduction, an option the loss does not take,
                a target of the wrong shape or dtype, a bad input (as for ``forward``); inside
                :func:`~torch_backprop.per_sample`, a reduction other than the block's. All before
                anything is computed.

        Example:
            >>> model = BackpropMLP([784, 256, 10])
            >>> x, y = torch.randn(64, 784), torch.randint(10, (64,))
            >>> model.loss(x, y, "cross_entropy").backward()
        """
        spec, weight, pos_weight = resolve_loss(
            loss,
            reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            pos_weight=pos_weight,
        )
        weights, biases, plain, hooked = self._stack_parameters()
        check_input(input, weights[0], "BackpropMLP.loss")
        check_target(spec, input, target, weights[-1].dtype, self.out_features, weight, pos_weight)
        phase = self.backward_phase
        check_per_sample(spec, phase, target, weight)
        if not plain or hooked or not fusable(input, target, weight, pos_weight):
            return spec.native(self(input), target, weight, pos_weight)
        if phase is not None and hasattr(phase, "bind"):
            phase = phase.bind(self, input)
        return stack_loss(
            input,
            target,
            weight,
            pos_weight,
            weights,
            biases,
            self.activations,
            self.dropout,
            self.training,
            phase,
            spec,
        )

    def _stack_parameters(self) -> tuple[list[Tensor], list[Tensor | None], bool, bool]:
        """``(weights, biases, plain, hooked)``: the layers' parameters, and two flags.

        ``plain``: the fused stack computes what the layers' own forward would; ``hooked``: module
        hooks are registered on them.

        The registered parameters are read from their dicts: nn.Module.__getattr__ costs about as
        much per lookup as a small layer's product.
        """
        weights, biases = [], []
        plain, hooked = not _global_module_hooks(), False
        for layer in self._modules["layers"]:
            params = layer._parameters
            if type(layer) is nn.Linear and "weight" in params and "bias" in params:
                weight, bias = params["weight"], params["bias"]
            else:  # a parametrized (torch.nn.utils.parametrize) or pruned layer: its weight is computed
                weight, bias = layer.weight, layer.bias
                plain = plain and type(layer).forward is nn.Linear.forward
            if (
                layer._forward_hooks
                or layer._forward_pre_hooks
                or layer._backward_hooks
                or layer._backward_pre_hooks
            ):
                hooked = True
            if type(weight) not in _PLAIN or type(bias) not in _PLAIN:
                plain = False  # a tensor subclass overrides what F.linear does (e.g. ExpandedWeight)
            weights.append(weight)
            biases.append(bias)
        return weights, biases, plain, hooked

    def _forward_layer_by_layer(self, input: Tensor, phase: Any) -> Tensor:
        """The stack as :meth:`to_sequential` runs it: ``layers[l](h)``, σ, dropout, under native autograd."""
        if phase is not None:
            raise RuntimeError(
                f"BackpropMLP: {_phase_name(phase)} needs the fused stack, but its layers must run one "
                f"by one ({self._why_layer_by_layer()}); remove the hooks or use the native twin"
            )
        check_input(input, self.layers[0].weight, "BackpropMLP")
        h = input
        last = len(self.layers) - 1
        for k, (layer, act) in enumerate(zip(self.layers, self.activations, strict=True)):
            h = act.fn(layer(h))  # h^(k+1) = σ(z^(k+1)), z^(k+1) by the layer's own forward (and hooks)
            if k < last and self.dropout:
                h = F.dropout(h, self.dropout, self.training)
        return h

    def _why_layer_by_layer(self) -> str:
        reasons = []
        if _global_module_hooks():
            reasons.append("global module hooks are registered")
        for k, layer in enumerate(self.layers):
            kinds = [
                name
                for name, hooks in (
                    ("forward", layer._forward_hooks),
                    ("forward pre", layer._forward_pre_hooks),
                    ("backward", layer._backward_hooks),
                    ("backward pre", layer._backward_pre_hooks),
                )
                if hooks
            ]
            if kinds:
                reasons.append(f"layers[{k}] has {' and '.join(kinds)} hooks")
            elif type(layer).forward is not nn.Linear.forward:
                reasons.append(f"layers[{k}] ({type(layer).__name__}) overrides forward")
            elif type(layer.weight) not in _PLAIN or type(layer.bias) not in _PLAIN:
                reasons.append(f"layers[{k}] holds a {type(layer.weight).__name__} weight")
        return "; ".join(reasons) or "unknown"

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle is a plain model: a per-forward phase (per_sample's) belongs to the
        # block that set it on this model, not to copies taken inside that block.
        state = self.__dict__.copy()
        if hasattr(state.get("backward_phase"), "bind"):
            state["backward_phase"] = None
        return state

    def extra_repr(self) -> str:
        text = f"sizes={self.sizes}, activations={list(self.activations)}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.recompute:
            text += ", recompute=True"
        return text

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script``, naming why: TorchScript cannot compile an autograd.Function.

        Raises:
            RuntimeError: always; the message names the ways around it.
        """
        raise RuntimeError(
            "torch.jit.script cannot compile BackpropMLP: its backward is a Python torch.autograd.Function "
            "(MLPFunction, the δ recursion), which TorchScript does not support. Script the native twin "
            "instead, torch.jit.script(model.to_sequential()) (same numbers, native autograd), or use "
            "torch.compile(model) or torch.export.export(model, ...)"
        )

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

    def state_dict_to_sequential(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``state`` (default: this model's ``state_dict()``) under the keys of :meth:`to_sequential`.

        ``layers.k.weight`` becomes the key of the k-th ``nn.Linear`` in the twin (``"2.weight"``
        when a ReLU sits between), so a saved ``model.pt`` loads into the native twin:
        ``twin.load_state_dict(model.state_dict_to_sequential(torch.load("model.pt")))``.

        Raises:
            ValueError: a key that is not one of this model's parameters.
        """
        state = self.state_dict() if state is None else state
        names = {
            f"layers.{k}.{kind}": f"{index}.{kind}" for k, index in self._twin_indices() for kind in _KINDS
        }
        return _renamed(state, names, "BackpropMLP")

    def state_dict_from_sequential(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of :meth:`state_dict_to_sequential`: a twin's ``state_dict`` under this model's keys.

        Raises:
            ValueError: a key that is not a parameter of this model's twin.
        """
        names = {
            f"{index}.{kind}": f"layers.{k}.{kind}" for k, index in self._twin_indices() for kind in _KINDS
        }
        return _renamed(state, names, "to_sequential()")

    def _twin_indices(self) -> list[tuple[int, int]]:
        """(k, index of the k-th nn.Linear in :meth:`to_sequential`), built as that method builds it."""
        indices, position = [], 0
        for k, act in enumerate(self.activations):
            indices.append((k, position))
            has_dropout = bool(self.dropout) and k < len(self.layers) - 1
            position += 1 + (act.name != "identity") + has_dropout
        return indices

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


_KINDS = ("weight", "bias")


def _renamed(state: Mapping[str, Tensor], names: dict[str, str], layout: str) -> dict[str, Tensor]:
    unknown = [key for key in state if key not in names]
    if unknown:
        raise ValueError(f"expected the state_dict keys of {layout} ({', '.join(names)}), got {unknown}")
    return {names[key]: value for key, value in state.items()}
