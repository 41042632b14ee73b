"""The activation registry: each σ with its derivative σ', as the slides' backward phase needs it.

The backward phase (slides 8-10) multiplies by σ'_l(z^(l)) at every layer. For most activations
σ' can be written in terms of the output h = σ(z) (ReLU: 1[h > 0]; tanh: 1 - h²; sigmoid:
h(1 - h)), so only h, which the next layer needs anyway, is kept for the backward phase; the others
(GELU, SiLU, softplus) need the pre-activation z as well.

Each entry is a small :class:`Activation`: σ, σ', which of z or h σ' reads, and where PyTorch has one,
a fused ``grad ⊙ σ'`` kernel (``torch.ops.aten.*_backward``, the kernels native autograd itself uses,
all differentiable again for double backward). Entries are registered by name, in Opacus's manner
of one small registered function per kind, and the registry refuses to overwrite a name unless asked
(``overwrite=True``), as BackPACK does. The built-in entries (identity, ReLU, ..., softplus) are
defined and registered at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

__all__ = [
    "Activation",
    "activation_from_module",
    "available_activations",
    "get_activation",
    "register_activation",
    "resolve_activations",
    "zero_second_derivative",
]


DerivativeFrom = Literal["h", "z", "none"]


@dataclass(frozen=True, eq=False, slots=True)
class Activation:
    """One activation σ with its derivative σ'.

    Args:
        name: registry name, e.g. ``"relu"``.
        fn: σ, applied out of place: ``h = fn(z)``.
        derivative: σ' written in terms of the tensor named by ``derivative_from``.
        derivative_from: ``"h"`` when σ' is a function of the output h = σ(z), ``"z"`` when it
            needs the pre-activation, ``"none"`` when σ' is constant 1 (identity).
        fused: optional ``fused(grad, saved) -> grad ⊙ σ'``; a single kernel instead of two.
        fused_into: optional ``fused_into(grad, saved)``: the same kernel writing its result into
            ``grad`` (its ``out=`` form), for a ``grad`` the backward phase has just made and owns;
            it saves one allocation per layer.
        fused_differentiable: whether autograd can differentiate ``fused`` (for double
            backward); when not, ``grad * derivative(saved)`` is used under ``create_graph``.
        inplace: optional σ applied in place to a fresh pre-activation (only used when σ' does
            not read z).
        module: builds the equivalent native module (for ``to_sequential``).
        params: the parameters the entry was built with, e.g. ``{"negative_slope": 0.01}``.
        second_derivative: optional σ'' written in terms of the same tensor as ``derivative``
            (``derivative_from``); :func:`zero_second_derivative` for piecewise-linear σ. Only the
            Hessian diagonal (:mod:`torch_backprop.secondorder.curvature`, ``diag_h``) reads it; ``None``
            (default) means unknown.
        third_derivative: optional σ''' written in terms of the same tensor;
            :func:`zero_second_derivative` for piecewise-linear σ. Only the backward phase of the
            input-derivative operators (:mod:`torch_backprop.pde`) reads it; where it is ``None``,
            autograd differentiates those operators instead.

    Attributes:
        forward: σ of a fresh pre-activation z, ``forward(z)``: ``inplace`` (on z) when given and
            σ' does not read z afterwards, else ``fn``. Chosen once here, since the forward phase
            calls it on every layer of every step.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    derivative_from: DerivativeFrom
    fused: Callable[[Tensor, Tensor], Tensor] | None = None
    fused_differentiable: bool = True
    fused_into: Callable[[Tensor, Tensor], Tensor] | None = None
    inplace: Callable[[Tensor], Tensor] | None = None
    module: Callable[[], nn.Module] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    second_derivative: Callable[[Tensor], Tensor] | None = None
    third_derivative: Callable[[Tensor], Tensor] | None = None
    forward: Callable[[Tensor], Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        in_place = self.inplace is not None and self.derivative_from != "z"
        object.__setattr__(self, "forward", self.inplace if in_place else self.fn)

    def backprop(self, grad: Tensor, saved: Tensor | None, overwrite: bool = False) -> Tensor:
        """``grad ⊙ σ'``, where ``saved`` is h or z as ``derivative_from`` says.

        With ``overwrite=True`` the caller owns ``grad`` (it has just made it) and the product may
        be written into it, unless the result must be differentiable (``create_graph``). The
        caller also says by it that ``grad`` is not batched (:func:`out_kernels_allowed`): the
        check is made once per backward, not once per layer.
        """
        if self.derivative_from == "none":
            return grad
        if torch.is_grad_enabled():  # double backward: differentiable ops only
            if self.fused is not None and self.fused_differentiable:
                return self.fused(grad, saved)
            return grad * self.derivative(saved)
        if overwrite and grad.dtype == saved.dtype:
            if self.fused_into is not None:
                return self.fused_into(grad, saved)
            if self.fused is None:
                return grad.mul_(self.derivative(saved))
        if self.fused is not None:
            return self.fused(grad, saved)
        return grad * self.derivative(saved)

    def tangent(self, z_dot: Tensor, saved: Tensor | None) -> Tensor:
        """``ż ⊙ σ'``, the tangent phase's T2: differentiable ops only, never in place."""
        if self.derivative_from == "none":
            return z_dot
        if self.fused is not None and self.fused_differentiable:
            return self.fused(z_dot, saved)
        return z_dot * self.derivative(saved)

    def to_module(self) -> nn.Module:
        """The equivalent native ``nn.Module``."""
        if self.module is not None:
            return self.module()
        return _ActivationModule(self)

    def __repr__(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Activation):
            return NotImplemented
        return self.name == other.name and self.params == other.params

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle by name, so models holding lambdas still pickle; the name is resolved on load.
        return (_rebuild, (self.name, tuple(self.params.items())))


def out_kernels_allowed(grad: Tensor) -> bool:
    """Whether a backward of ``grad`` may write σ' products into fresh tensors (``overwrite=True``).

    Not when ``grad`` is batched by vmap (torch.func, or autograd's ``is_grads_batched``): the
    ``out=`` kernels have no batching rule, so a batched backward takes the functional ones; nor
    inside a ``forward_ad.dual_level``: they have no forward-AD formula either.
    """
    if forward_ad._current_level >= 0:
        return False
    if torch.compiler.is_compiling():
        return True  # traced: the compiler chooses the kernels
    return not (
        torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(grad)
    )


def _rebuild(name: str, params: tuple[tuple[str, Any], ...]) -> Activation:
    return get_activation(name, **dict(params))


class _ActivationModule(nn.Module):
    """Native module for an activation that has no ``torch.nn`` counterpart (user entries)."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, z: Tensor) -> Tensor:
        return self.activation.fn(z)

    def extra_repr(self) -> str:
        return repr(self.activation)


_REGISTRY: dict[str, Callable[..., Activation]] = {}


def register_activation(
    name: str,
    fn: Callable[..., Activation] | Callable[[Tensor], Tensor],
    derivative: Callable[[Tensor], Tensor] | None = None,
    *,
    derivative_from: DerivativeFrom = "z",
    overwrite: bool = False,
    second_derivative: Callable[[Tensor], Tensor] | None = None,
    third_derivative: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Register an activation under ``name``.

    Either give the pair (σ, σ'), or a factory that takes keyword parameters and returns an
    :class:`Activation` (``derivative`` left ``None``), as the built-in parametrised entries do.

    Args:
        name: the name users pass as ``activation=``.
        fn: σ, or a factory returning an :class:`Activation`.
        derivative: σ' as a function of z (or of h with ``derivative_from="h"``).
        derivative_from: which tensor σ' reads: ``"z"`` (default, always correct) or ``"h"``.
        overwrite: replace an existing entry of the same name.
        second_derivative: optional σ'' as a function of the same tensor as ``derivative`` (only
            the Hessian diagonal of :mod:`torch_backprop.secondorder.curvature` and the
            input-derivative operators of :mod:`torch_backprop.pde` need it).
        third_derivative: optional σ''' as a function of the same tensor (the backward phase of
            :mod:`torch_backprop.pde` reads it; without it, autograd differentiates the operators).

    Raises:
        ValueError: the name is taken and ``overwrite`` is false, or ``derivative_from`` is unknown.

    Example:
        >>> register_activation("square", lambda z: z * z, lambda z: 2 * z)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_activation expects a non-empty string name, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True to replace it")
    if derivative_from not in ("h", "z", "none"):
        raise ValueError(f"derivative_from must be 'h', 'z' or 'none', got {derivative_from!r}")
    if derivative is None:
        _REGISTRY[name] = fn  # a factory
        return

    def factory() -> Activation:
        return Activation(
            name,
            fn,
            derivative,
            derivative_from,
            second_derivative=second_derivative,
            third_derivative=third_derivative,
        )

    _REGISTRY[name] = factory


def available_activations() -> list[str]:
    """Registered activation names, sorted."""
    return sorted(_REGISTRY)


def get_activation(name: str, **params: Any) -> Activation:
    """The registered activation ``name``, built with ``params`` (e.g. ``negative_slope=0.2``).

    Raises:
        ValueError: unknown name (the message lists the valid names) or bad parameters.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown activation {name!r}; expected one of: {', '.join(available_activations())}"
        )
    try:
        return _REGISTRY[name](**params)
    except TypeError as error:
        raise ValueError(f"activation {name!r} does not take parameters {params}: {error}") from None


ActivationLike = str | Activation | nn.Module | None


def _as_activation(spec: ActivationLike) -> Activation:
    if spec is None:
        return get_activation("identity")
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        return get_activation(spec)
    if isinstance(spec, nn.Module):
        return activation_from_module(spec)
    raise TypeError(
        f"an activation must be a name, an Activation, a supported nn.Module or None, "
        f"got {type(spec).__name__}"
    )


def resolve_activations(
    spec: ActivationLike | Sequence[ActivationLike], count: int
) -> tuple[Activation, ...]:
    """``count`` activations from one spec (repeated) or a per-layer list of exactly ``count``.

    Raises:
        ValueError: a list of the wrong length, or an unknown name.
    """
    if isinstance(spec, (list, tuple)):
        if len(spec) != count:
            raise ValueError(f"expected a list of {count} activations (one per layer), got {len(spec)}")
        return tuple(_as_activation(s) for s in spec)
    return (_as_activation(spec),) * count


# ---------------------------------------------------------------------------------------------
# Native modules -> registry entries (for from_sequential).

_FROM_MODULE: dict[type[nn.Module], Callable[[Any], Activation]] = {
    nn.Identity: lambda m: get_activation("identity"),
    nn.ReLU: lambda m: get_activation("relu"),
    nn.LeakyReLU: lambda m: get_activation("leaky_relu", negative_slope=m.negative_slope),
    nn.ELU: lambda m: get_activation("elu", alpha=m.alpha),
    nn.GELU: lambda m: get_activation("gelu" if m.approximate == "none" else "gelu_tanh"),
    nn.SiLU: lambda m: get_activation("silu"),
    nn.Sigmoid: lambda m: get_activation("sigmoid"),
    nn.Tanh: lambda m: get_activation("tanh"),
    nn.Softplus: lambda m: get_activation("softplus", beta=m.beta, threshold=m.threshold),
    _ActivationModule: lambda m: m.activation,
}


def activation_from_module(module: nn.Module) -> Activation:
    """The registry entry equivalent to a native activation module such as ``nn.ReLU()``.

    Raises:
        TypeError: the module type has no entry.
    """
    convert = _FROM_MODULE.get(type(module))
    if convert is None:
        supported = ", ".join(sorted(t.__name__ for t in _FROM_MODULE if t is not _ActivationModule))
        raise TypeError(f"unsupported activation module {type(module).__name__}; supported: {supported}")
    return convert(module)


# ---------------------------------------------------------------------------------------------
# The built-in entries: each σ with σ' (and σ'') in closed form, and the fused kernels.
#
# Slide 9's activations and the ones MLPs are trained with today. σ' sits next to its σ, written in h
# where the math allows (ReLU: 1[h > 0]; tanh: 1 - h²; sigmoid: h(1 - h)); the fused kernel, where
# PyTorch has one, is the ``torch.ops.aten.*_backward`` kernel native autograd uses, computing the
# same product grad ⊙ σ'.

aten = torch.ops.aten


def zero_second_derivative(saved: Tensor) -> Tensor:
    """σ'' = 0: the entry for piecewise-linear activations (identity, ReLU, leaky ReLU).

    :mod:`torch_backprop.secondorder` recognises this function and skips the σ'' terms it would add.
    """
    return torch.zeros_like(saved)


def _kernel(op: Any, *args: Any, **kwargs: Any) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """``fused`` and ``fused_into`` for the aten kernel ``op(grad, saved, *args, **kwargs)``.

    ``fused`` is the kernel native autograd uses; ``fused_into`` is its ``grad_input=`` form, which
    writes into ``grad``.
    """
    into = op.grad_input
    return {
        "fused": lambda grad, saved: op(grad, saved, *args, **kwargs),
        "fused_into": lambda grad, saved: into(grad, saved, *args, **kwargs, grad_input=grad),
    }


def _identity() -> Activation:
    return Activation(
        "identity",
        lambda z: z,
        torch.ones_like,
        "none",
        module=nn.Identity,
        second_derivative=zero_second_derivative,
        third_derivative=zero_second_derivative,
    )


def _relu() -> Activation:
    # σ'(z) = 1[z > 0] = 1[h > 0]
    return Activation(
        "relu",
        F.relu,
        lambda h: (h > 0).to(h.dtype),
        "h",
        **_kernel(aten.threshold_backward, 0),
        inplace=torch.relu_,
        module=nn.ReLU,
        second_derivative=zero_second_derivative,  # σ'' = 0 (almost everywhere)
        third_derivative=zero_second_derivative,
    )


def _leaky_relu(negative_slope: float = 0.01) -> Activation:
    # σ'(z) = 1 if z > 0 else slope; for slope >= 0, z > 0 exactly when h > 0.
    slope = float(negative_slope)
    from_output = slope >= 0
    return Activation(
        "leaky_relu",
        lambda z: F.leaky_relu(z, slope),
        lambda s: torch.where(s > 0, s.new_ones(()), s.new_full((), slope)),
        "h" if from_output else "z",
        **_kernel(aten.leaky_relu_backward, slope, from_output),
        inplace=lambda z: F.leaky_relu_(z, slope),
        module=lambda: nn.LeakyReLU(slope),
        params={"negative_slope": slope},
        second_derivative=zero_second_derivative,  # σ'' = 0 (almost everywhere)
        third_derivative=zero_second_derivative,
    )


def _elu(alpha: float = 1.0) -> Activation:
    # σ'(z) = 1 if z > 0 else α e^z = h + α; for α > 0, z > 0 exactly when h > 0.
    alpha = float(alpha)
    from_output = alpha > 0
    # σ''(z) = 0 if z > 0 else α e^z = h + α
    if from_output:
        derivative = lambda h: torch.where(h > 0, 1.0, h + alpha).to(h.dtype)  # noqa: E731
        second = lambda h: torch.where(h > 0, 0.0, h + alpha).to(h.dtype)  # noqa: E731
    else:
        derivative = lambda z: torch.where(z > 0, 1.0, alpha * torch.exp(z)).to(z.dtype)  # noqa: E731
        second = lambda z: torch.where(z > 0, 0.0, alpha * torch.exp(z)).to(z.dtype)  # noqa: E731
    return Activation(
        "elu",
        lambda z: F.elu(z, alpha),
        derivative,
        "h" if from_output else "z",
        fused=lambda grad, s: aten.elu_backward(grad, alpha, 1, 1, from_output, s),
        fused_into=lambda grad, s: aten.elu_backward.grad_input(
            grad, alpha, 1, 1, from_output, s, grad_input=grad
        ),
        inplace=lambda z: F.elu_(z, alpha),
        module=lambda: nn.ELU(alpha),
        params={"alpha": alpha},
        second_derivative=second,
        third_derivative=second,  # σ'''(z) = σ''(z): 0 if z > 0 else α e^z
    )


def _gelu_derivative(z: Tensor) -> Tensor:
    # σ(z) = z Φ(z)  =>  σ'(z) = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _gelu_tanh_derivative(z: Tensor) -> Tensor:
    # σ(z) = z/2 (1 + tanh u), u = √(2/π)(z + 0.044715 z³)
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


def _gelu_second_derivative(z: Tensor) -> Tensor:
    # σ'(z) = Φ(z) + z φ(z), φ'(z) = -z φ(z)  =>  σ''(z) = φ(z) (2 - z²)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return pdf * (2 - z * z)


def _gelu_tanh_second_derivative(z: Tensor) -> Tensor:
    # With u' = k(1 + 3·0.044715 z²), u'' = 6·0.044715 k z:
    # σ''(z) = (1 - t²) (u' + z/2 (u'' - 2 t u'²))
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    du = k * (1 + 3 * 0.044715 * z * z)
    return (1 - t * t) * (du + 0.5 * z * (6 * 0.044715 * k * z - 2 * t * du * du))


def _gelu_third_derivative(z: Tensor) -> Tensor:
    # σ''(z) = φ(z) (2 - z²)  =>  σ'''(z) = -z φ (2 - z²) - 2 z φ = z φ(z) (z² - 4)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return z * pdf * (z * z - 4)


def _gelu_tanh_third_derivative(z: Tensor) -> Tensor:
    # σ'' = w P with w = 1 - t², P = u' + z/2 (u'' - 2 t u'²), w' = -2 t w u', u''' = 6·0.044715 k:
    # σ''' = w (P' - 2 t u' P),  P' = 3/2 u'' + z/2 u''' - t u'² - z w u'³ - 2 z t u' u''
    k, a = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(k * (z + a * z**3))
    w = 1 - t * t
    du, ddu = k * (1 + 3 * a * z * z), 6 * a * k * z
    p = du + 0.5 * z * (ddu - 2 * t * du * du)
    dp = 1.5 * ddu + 3 * a * k * z - t * du * du - z * w * du**3 - 2 * z * t * du * ddu
    return w * (dp - 2 * t * du * p)


def _gelu() -> Activation:
    return Activation(
        "gelu",
        F.gelu,
        _gelu_derivative,
        "z",
        **_kernel(aten.gelu_backward),
        module=nn.GELU,
        second_derivative=_gelu_second_derivative,
        third_derivative=_gelu_third_derivative,
    )


def _gelu_tanh() -> Activation:
    return Activation(
        "gelu_tanh",
        lambda z: F.gelu(z, approximate="tanh"),
        _gelu_tanh_derivative,
        "z",
        **_kernel(aten.gelu_backward, approximate="tanh"),
        module=lambda: nn.GELU(approximate="tanh"),
        second_derivative=_gelu_tanh_second_derivative,
        third_derivative=_gelu_tanh_third_derivative,
    )


def _silu() -> Activation:
    # σ(z) = z s(z), s = sigmoid  =>  σ'(z) = s (1 + z (1 - s))
    def derivative(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))

    # σ''(z) = s (1 - s) (2 + z (1 - 2s))
    def second_derivative(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))

    # σ'''(z) = s (1 - s) ((1 - 2s)(3 + z (1 - 2s)) - 2 z s (1 - s))
    def third_derivative(z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * ((1 - 2 * s) * (3 + z * (1 - 2 * s)) - 2 * z * s * (1 - s))

    return Activation(
        "silu",
        F.silu,
        derivative,
        "z",
        **_kernel(aten.silu_backward),
        fused_differentiable=False,  # aten has no derivative for silu_backward
        module=nn.SiLU,
        second_derivative=second_derivative,
        third_derivative=third_derivative,
    )


# The sigmoid's and tanh's derivatives in h, each in as few passes over h as the algebra allows
# (the input-derivative operators evaluate them at every layer of every step).


def _sigmoid_derivative(h: Tensor) -> Tensor:
    return torch.addcmul(h, h, h, value=-1)  # h - h² = h (1 - h)


def _sigmoid_third_derivative(h: Tensor) -> Tensor:
    # h (1 - h)(1 - 6h + 6h²) = t (1 - 6t) with t = h (1 - h)
    t = _sigmoid_derivative(h)
    return torch.addcmul(t, t, t, value=-6)


def _tanh_derivative(h: Tensor) -> Tensor:
    return torch.addcmul(h.new_ones(()), h, h, value=-1)  # 1 - h²


def _tanh_third_derivative(h: Tensor) -> Tensor:
    # -2 (1 - h²)(1 - 3h²) = 2 (s - 1)(1 - 3s) with s = h²
    s = h * h
    return (s - 1).mul_(s.mul_(-3).add_(1)).mul_(2)


def _sigmoid() -> Activation:
    # σ'(z) = σ(z)(1 - σ(z)) = h (1 - h),  σ''(z) = h (1 - h)(1 - 2h),  σ'''(z) = h (1 - h)(1 - 6h + 6h²)
    return Activation(
        "sigmoid",
        torch.sigmoid,
        _sigmoid_derivative,
        "h",
        **_kernel(aten.sigmoid_backward),
        inplace=torch.sigmoid_,
        module=nn.Sigmoid,
        second_derivative=lambda h: _sigmoid_derivative(h).mul_(h.mul(-2).add_(1)),
        third_derivative=_sigmoid_third_derivative,
    )


def _tanh() -> Activation:
    # σ'(z) = 1 - tanh²(z) = 1 - h²,  σ''(z) = -2 h (1 - h²),  σ'''(z) = -2 (1 - h²)(1 - 3h²)
    return Activation(
        "tanh",
        torch.tanh,
        _tanh_derivative,
        "h",
        **_kernel(aten.tanh_backward),
        inplace=torch.tanh_,
        module=nn.Tanh,
        second_derivative=lambda h: (h * h).sub_(1).mul_(h).mul_(2),
        third_derivative=_tanh_third_derivative,
    )


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    # σ(z) = log(1 + e^{βz})/β (z where βz > threshold)  =>  σ'(z) = sigmoid(βz) (1 there),
    # σ''(z) = β s (1 - s) with s = sigmoid(βz) (0 there), σ'''(z) = β² s (1 - s)(1 - 2s) (0 there)
    beta, threshold = float(beta), float(threshold)
    return Activation(
        "softplus",
        lambda z: F.softplus(z, beta, threshold),
        lambda z: torch.where(z * beta > threshold, 1.0, torch.sigmoid(z * beta)).to(z.dtype),
        "z",
        **_kernel(aten.softplus_backward, beta, threshold),
        module=lambda: nn.Softplus(beta, threshold),
        params={"beta": beta, "threshold": threshold},
        second_derivative=lambda z: torch.where(
            z * beta > threshold, 0.0, beta * torch.sigmoid(z * beta) * (1 - torch.sigmoid(z * beta))
        ).to(z.dtype),
        third_derivative=lambda z: _softplus_third_derivative(z, beta, threshold),
    )


def _softplus_third_derivative(z: Tensor, beta: float, threshold: float) -> Tensor:
    s = torch.sigmoid(z * beta)
    return torch.where(z * beta > threshold, 0.0, beta**2 * s * (1 - s) * (1 - 2 * s)).to(z.dtype)


for _name, _factory in [
    ("identity", _identity),
    ("relu", _relu),
    ("leaky_relu", _leaky_relu),
    ("elu", _elu),
    ("gelu", _gelu),
    ("gelu_tanh", _gelu_tanh),
    ("silu", _silu),
    ("sigmoid", _sigmoid),
    ("tanh", _tanh),
    ("softplus", _softplus),
]:
    register_activation(_name, _factory)
