r"""Clipping styles for :func:`~torch_backprop.per_sample`: which parts of g_b are clipped, to what.

The trainable parameters are split into groups G (one group: flat clipping). For each sample b and
group g, with n_{b,g} = ‖g_{b,g}‖ the norm of sample b's gradient restricted to group g (PS2 summed
over the group's parameters) and C_g the group's threshold:

    CL1  Abadi (Opacus, fastDP "Abadi"):   c_{b,g} = min(1, C_g / n_{b,g})
    CL2  automatic (fastDP, Bu et al. 2022): c_{b,g} = C_g / (n_{b,g} + γ)
    CL3  the clipped sum, per parameter p of group g:  Σ_b c_{b,g} g_{b,p}     (PS4 with c_{:,g})
    CL4  sensitivity: Δ = sqrt(Σ_g C_g²)   (each group's clipped part has norm ≤ C_g)

and :func:`~torch_backprop.dp_sgd_step` adds N(0, (σ Δ)²) noise. The groups:

    ``"flat"``        one group, all trainable parameters; C (Opacus's default)
    ``"per_layer"``   one group per trainable parameter; a list of C_p, one per parameter
                      (Opacus's ``clipping="per_layer"``, whose "layer" is a parameter tensor)
    ``"layer-wise"``  one group per layer (its weight and bias together); C_g = C / sqrt(L) (fastDP)
    ``"param-wise"``  one group per parameter; C_g = C / sqrt(P) (fastDP)
    ``"group-wise"``  consecutive layers, starting at the layers listed in ``groups`` (fastDP's
                      block heads); C_g = C / sqrt(number of groups)
    ``"adaptive"``    flat, with C following a private quantile estimate of the norms
                      (Opacus's ``clipping="adaptive"``, Andrew et al. 2021): :class:`AdaptiveClipping`

Where fastDP splits one C equally, a list of thresholds (one per group) may be given instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["STYLES", "AdaptiveClipping", "ClippingRule", "clipping_rule"]

STYLES = ("flat", "per_layer", "layer-wise", "param-wise", "group-wise", "adaptive")
FUNCTIONS = ("Abadi", "automatic")


@dataclass
class AdaptiveClipping:
    """Opacus's adaptive clipping (``AdaClipDPOptimizer``), as the state of a threshold C.

    Each clipped backward counts the samples whose norm is at most C; each
    :func:`~torch_backprop.dp_sgd_step` adds N(0, σ_u²) to that count (σ_u: ``unclipped_num_std``),
    moves C by C ← C exp(-η (count / samples - q)) into [``min_clipbound``, ``max_clipbound``] and
    noises the gradients with the multiplier (σ⁻² - (2σ_u)⁻²)^(-1/2), so that the pair of releases
    costs what the DP-SGD step with σ alone would (Andrew et al. 2021, Theorem 1).

    Args:
        max_grad_norm: the initial threshold C.
        target_unclipped_quantile: q, the fraction of samples C should leave unclipped.
        clipbound_learning_rate: η.
        max_clipbound, min_clipbound: the range of C.
        unclipped_num_std: σ_u, the noise on the count; σ < 2 σ_u is required.
    """

    max_grad_norm: float
    target_unclipped_quantile: float = 0.5
    clipbound_learning_rate: float = 0.2
    max_clipbound: float = 1e8
    min_clipbound: float = 1e-8
    unclipped_num_std: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_grad_norm", "clipbound_learning_rate", "max_clipbound", "min_clipbound"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"AdaptiveClipping expects a finite {name} > 0, got {value!r}")
        if not 0 <= self.target_unclipped_quantile <= 1:
            raise ValueError(
                "AdaptiveClipping expects target_unclipped_quantile in [0, 1], "
                f"got {self.target_unclipped_quantile}"
            )
        if self.max_clipbound <= self.min_clipbound:
            raise ValueError("AdaptiveClipping expects max_clipbound > min_clipbound")
        if not self.unclipped_num_std > 0:
            raise ValueError(f"AdaptiveClipping expects unclipped_num_std > 0, got {self.unclipped_num_std}")
        self.max_grad_norm = float(self.max_grad_norm)

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """(σ⁻² - (2σ_u)⁻²)^(-1/2): the multiplier of the gradient noise for a budget of σ."""
        if noise_multiplier == 0:
            return 0.0
        if noise_multiplier >= 2 * self.unclipped_num_std:
            raise ValueError(
                f"adaptive clipping needs noise_multiplier < 2 * unclipped_num_std = "
                f"{2 * self.unclipped_num_std}, got {noise_multiplier} (Andrew et al. 2021, Theorem 1)"
            )
        return (noise_multiplier**-2 - (2 * self.unclipped_num_std) ** -2) ** -0.5

    def update(self, noisy_unclipped: float, samples: int) -> None:
        """C ← C exp(-η (noisy count / samples - q)), clamped to [min_clipbound, max_clipbound]."""
        fraction = noisy_unclipped / samples if samples else 0.0
        updated = self.max_grad_norm * math.exp(
            -self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile)
        )
        self.max_grad_norm = min(self.max_clipbound, max(self.min_clipbound, updated))


@dataclass(frozen=True)
class ClippingRule:
    """A clipping style resolved for one model: its groups and thresholds."""

    style: str
    groups: tuple[tuple[Tensor, ...], ...]  # the trainable parameters of each group
    thresholds: tuple[float, ...]  # C_g
    function: str  # "Abadi" or "automatic"
    stability: float  # γ of the automatic function
    given: object  # max_grad_norm as the block was given it
    adaptive: AdaptiveClipping | None = None

    @property
    def sensitivity(self) -> float:
        """Δ = sqrt(Σ_g C_g²), CL4."""
        return math.sqrt(sum(c * c for c in self.thresholds))

    def given_as(self, max_grad_norm: object) -> bool:
        """Whether ``max_grad_norm`` names the thresholds this rule clipped with."""
        if self.adaptive is not None:
            return max_grad_norm is self.adaptive
        if isinstance(self.given, (list, tuple)):
            return isinstance(max_grad_norm, (list, tuple)) and [float(c) for c in max_grad_norm] == [
                float(c) for c in self.given
            ]
        return isinstance(max_grad_norm, (int, float)) and float(max_grad_norm) == float(self.given)

    def spec(self) -> tuple:
        """What two clipped backward calls must share to add up to one clipped sum."""
        return (self.style, self.thresholds, self.function, self.stability)

    def factors(self, norms: Tensor, group: int) -> Tensor:
        """c_{b,g} (B,) from the group's per-sample norms n_{b,g}: CL1 or CL2."""
        threshold = self.thresholds[group]
        if self.function == "automatic":
            return threshold / (norms + self.stability)  # CL2
        return (threshold / norms).clamp(max=1.0)  # CL1


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"per_sample expects {what} > 0 (a number), got {value!r}")
    return float(value)


def clipping_rule(
    max_grad_norm: float | Sequence[float] | AdaptiveClipping,
    clipping: str,
    layers: Sequence[tuple[Tensor | None, Tensor | None]],
    groups: Sequence[int] | None = None,
    clipping_fn: str = "Abadi",
    numerical_stability_constant: float | None = None,
) -> ClippingRule:
    """Resolve a clipping style for ``layers`` (each layer's trainable weight and bias, or ``None``).

    Raises:
        ValueError: an unknown style or function, thresholds of the wrong number or sign,
            ``groups`` that are not increasing layer indices starting at 0, an adaptive style
            without :class:`AdaptiveClipping` (or the reverse).
    """
    if clipping not in STYLES:
        raise ValueError(f"per_sample expects clipping to be one of {', '.join(STYLES)}, got {clipping!r}")
    if clipping_fn not in FUNCTIONS:
        raise ValueError(f"per_sample expects clipping_fn 'Abadi' or 'automatic', got {clipping_fn!r}")
    stability = (
        0.01
        if numerical_stability_constant is None
        else _positive(numerical_stability_constant, "numerical_stability_constant")
    )
    if (clipping == "adaptive") != isinstance(max_grad_norm, AdaptiveClipping):
        raise ValueError(
            "per_sample expects clipping='adaptive' together with max_grad_norm=AdaptiveClipping(...), "
            f"got clipping={clipping!r} and max_grad_norm={max_grad_norm!r}"
        )
    if groups is not None and clipping != "group-wise":
        raise ValueError(
            f"per_sample takes groups only with clipping='group-wise', got clipping={clipping!r}"
        )
    params = [p for layer in layers for p in layer if p is not None]
    if clipping in ("flat", "adaptive"):
        parts = [params]
    elif clipping in ("per_layer", "param-wise"):
        parts = [[p] for p in params]
    elif clipping == "layer-wise":
        parts = [[p for p in layer if p is not None] for layer in layers]
    else:
        heads = list(groups or [])
        if (
            not heads
            or heads[0] != 0
            or any(b <= a for a, b in zip(heads, heads[1:], strict=False))
            or heads[-1] >= len(layers)
        ):
            raise ValueError(
                f"per_sample expects groups: increasing layer indices starting at 0, below {len(layers)} "
                f"(the first layer of each group), got {groups!r}"
            )
        bounds = [*heads, len(layers)]
        parts = [
            [p for layer in layers[a:b] for p in layer if p is not None]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    parts = [part for part in parts if part]
    adaptive = max_grad_norm if isinstance(max_grad_norm, AdaptiveClipping) else None
    if adaptive is not None:
        thresholds = [adaptive.max_grad_norm]
    elif isinstance(max_grad_norm, (list, tuple)):
        if clipping == "flat" or len(max_grad_norm) != len(parts):
            raise ValueError(
                f"per_sample expects {len(parts)} thresholds for clipping={clipping!r} (one per group), "
                f"got {len(max_grad_norm)}"
            )
        thresholds = [_positive(c, "every threshold") for c in max_grad_norm]
    elif clipping == "per_layer":
        raise ValueError(
            f"per_sample with clipping='per_layer' expects a list of {len(parts)} thresholds, one per "
            f"trainable parameter (Opacus's convention), got {max_grad_norm!r}"
        )
    else:
        total = _positive(max_grad_norm, "max_grad_norm")
        thresholds = [total / math.sqrt(len(parts))] * len(parts)
    given = adaptive.max_grad_norm if adaptive is not None else max_grad_norm
    return ClippingRule(
        clipping,
        tuple(tuple(part) for part in parts),
        tuple(thresholds),
        clipping_fn,
        stability,
        given,
        adaptive,
    )
