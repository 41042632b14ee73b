r"""Per-sample gradients, per-sample norms and DP-SGD clipping inside the one backward (slides 8-10).

The slides compute ∇Q_θ(x, y) for one sample: layer l's gradient is the outer product
h^(l) ⊗ δ^(l+1) (BP3). The backward phase holds every h^(l) and δ^(l) of the batch at once, so each
sample's gradient, its norm and its clipped contribution come from the same tensors the ordinary
backward uses. Notation as in :class:`~torch_backprop.function.MLPFunction`, plus
    B: samples, T: rows per sample (T = prod(*) for input (B, *, n_0); T = 1 for (B, n_0)),
    N = B T rows, b: sample, t: row within a sample, s = B for ``"mean"``, 1 for ``"sum"``.

    PS1  g_b^(l) = s Σ_t δ_bt^(l+1) ⊗ h_bt^(l)                 per-sample ∂W^(l), (n_{l+1}, n_l)
         g_b^(l), bias = s Σ_t δ_bt^(l+1)                     per-sample ∂b^(l), (n_{l+1},)
    PS2  ‖g_b‖² = s² Σ_l (‖h_b^(l)‖² ‖δ_b^(l+1)‖² + ‖δ_b^(l+1)‖²)        for T = 1
         ‖Σ_t δ_t ⊗ h_t‖² = Σ_{t,t'} (δ_t · δ_t')(h_t · h_t')        for T > 1 (Gram, "ghost" form)
    PS3  c_b = min(1, C / ‖g_b‖)
    PS4  ∂W^(l) = (c ⊙ δ^(l+1))ᵀ h^(l),   ∂b^(l) = Σ_N c ⊙ δ^(l+1)      (c repeated over t)

PS4 is BP3-BP4 with every row of δ^(l+1) scaled by its sample's c_b, so it equals Σ_b c_b g_b for
``"sum"`` and Σ_b c_b g_b / B for ``"mean"`` (the factor s of PS1 cancels the mean's 1/B).

Cost, over a plain backward (BP1-BP5):
    * clipping, T = 1: all δ^(l) kept at once (the memory of one more activation stack), plus
      O(N Σ_l (n_l + n_{l+1})) for the norms and the scaling: no (B, n_{l+1}, n_l) tensor is built.
    * clipping, T > 1: per layer, the cheaper of the Gram form, O(B T² (n_l + n_{l+1})) time and
      O(B T²) memory, and materialising g_b^(l) one layer at a time, O(B T n_l n_{l+1}) time and
      O(B n_l n_{l+1}) memory; the Gram form is used when T (n_l + n_{l+1}) ≤ n_l n_{l+1}.
    * ``grad_sample`` (no clipping): the (B, *p.shape) tensors themselves, O(B T n_l n_{l+1}).

Conventions follow Opacus: ``p.grad_sample[b]`` is the gradient of sample b's own loss term ℓ_b,
whatever the reduction, and norms and the clipping threshold refer to those gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .function import Tape, deltas, lowest_layer
from .module import BackpropMLP

__all__ = ["PerSample", "dp_sgd_step", "per_sample"]

_REDUCTIONS = ("mean", "sum")


class _PerSamplePhase:
    """The per-sample backward phase, bound to one forward call's batch shape (B, T)."""

    def __init__(self, owner: PerSample, batch: int | None, steps: int | None) -> None:
        self.owner, self.batch, self.steps = owner, batch, steps

    def __call__(
        self, tape: Tape, *, needs_x: bool, needs_weight: Sequence[bool], needs_bias: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        return self.owner._backward_phase(
            tape, self.batch, self.steps, needs_x=needs_x, needs_weight=needs_weight, needs_bias=needs_bias
        )


class PerSample:
    """The context returned by :func:`per_sample`; see there.

    Attributes:
        model (BackpropMLP): the model whose backward is replaced inside the block.
        loss_reduction (str): ``"mean"`` or ``"sum"``.
        max_grad_norm (float | None): the clipping threshold C, or ``None`` for no clipping.
        norms (Tensor | None): (B,) unclipped per-sample gradient norms ‖g_b‖ over all trainable
            parameters, from the latest backward in the block (``None`` before one).
    """

    def __init__(self, model: BackpropMLP, loss_reduction: str = "mean", max_grad_norm: float | None = None):
        if not isinstance(model, BackpropMLP):
            raise TypeError(
                f"per_sample expects a torch_backprop.BackpropMLP, got {type(model).__name__}; "
                "convert an nn.Sequential with BackpropMLP.from_sequential"
            )
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"per_sample expects loss_reduction 'mean' or 'sum', got {loss_reduction!r}")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(
                    f"per_sample expects max_grad_norm to be a positive number or None, "
                    f"got {type(max_grad_norm).__name__}"
                )
            if not max_grad_norm > 0:
                raise ValueError(f"per_sample expects max_grad_norm > 0, got {max_grad_norm}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norms: Tensor | None = None
        self._active = False
        self._previous_phase: Any = None
        self._hook: Any = None

    def __enter__(self) -> PerSample:
        if isinstance(self.model.backward_phase, _PerSamplePhase):
            raise RuntimeError("per_sample blocks on the same model do not nest")
        for param in self.model.parameters():
            if hasattr(param, "grad_sample"):
                del param.grad_sample
        self.norms = None
        self._previous_phase = self.model.backward_phase
        self.model.backward_phase = _PerSamplePhase(self, None, None)
        self._hook = self.model.register_forward_pre_hook(self._capture_batch, with_kwargs=True)
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._active = False
        self._hook.remove()
        self._hook = None
        self.model.backward_phase = self._previous_phase

    def _capture_batch(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Each forward gets its own phase, bound to its (B, T): the Function keeps it on its ctx.
        input = args[0] if args else kwargs.get("input")
        if not isinstance(input, Tensor):
            return None
        if input.dim() < 2:
            raise ValueError(
                f"per_sample expects input with a batch dimension, (B, *, {module.in_features}), got shape "
                f"{tuple(input.shape)}; for one sample use input.unsqueeze(0)"
            )
        module.backward_phase = _PerSamplePhase(self, input.shape[0], math.prod(input.shape[1:-1]))
        return None

    def _trainable(
        self, needs_weight: Sequence[bool], needs_bias: Sequence[bool]
    ) -> Iterator[tuple[int, str]]:
        for k, (weight, bias) in enumerate(zip(needs_weight, needs_bias, strict=True)):
            if weight:
                yield k, "weight"
            if bias:
                yield k, "bias"

    def _backward_phase(
        self,
        tape: Tape,
        batch: int | None,
        steps: int | None,
        *,
        needs_x: bool,
        needs_weight: Sequence[bool],
        needs_bias: Sequence[bool],
    ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        if not self._active:
            raise RuntimeError(
                "per_sample: backward ran after its with block closed; call backward inside the block"
            )
        rows = tape.grad_output.shape[0]
        if batch is None or steps is None or batch * steps != rows:
            raise RuntimeError(f"per_sample: the backward's {rows} rows do not match the input captured")
        depth = len(tape.activations)
        grad_x, grad_weights, grad_biases = None, [None] * depth, [None] * depth
        lowest = lowest_layer(needs_x, needs_weight, needs_bias)
        delta = dict(deltas(tape, lowest))  # δ^(l+1) of every layer first: clipping needs all norms
        h = {k: tape.h[k].to(tape.dtype) for k in delta}
        scale = batch if self.loss_reduction == "mean" else 1
        norm_dtype = torch.promote_types(tape.dtype, torch.float32)
        squared_norms = torch.zeros(batch, dtype=norm_dtype, device=tape.grad_output.device)
        layers = self.model.layers

        if self.max_grad_norm is None:
            for k, name in self._trainable(needs_weight, needs_bias):
                delta_b = delta[k].reshape(batch, steps, delta[k].shape[1])  # (B, T, n_{k+1})
                if name == "weight":
                    h_b = h[k].reshape(batch, steps, h[k].shape[1])  # (B, T, n_k)
                    g = torch.bmm(delta_b.transpose(1, 2), h_b)  # PS1, (B, n_{k+1}, n_k)
                    grad_weights[k] = delta[k].t().mm(h[k]).to(layers[k].weight.dtype)  # BP3
                else:
                    g = delta_b.sum(1)  # PS1, (B, n_{k+1})
                    grad_biases[k] = delta[k].sum(0).to(layers[k].bias.dtype)  # BP4
                g = g * scale
                squared_norms += g.to(norm_dtype).flatten(1).square().sum(1)
                _store_grad_sample(getattr(layers[k], name), g)
        else:
            for k in delta:
                if needs_weight[k] or needs_bias[k]:
                    squared_norms += _squared_norms(
                        delta[k], h[k], batch, steps, needs_weight[k], needs_bias[k]
                    )
            squared_norms *= scale**2
            factor = (self.max_grad_norm / squared_norms.clamp(min=0).sqrt()).clamp(max=1.0)  # PS3, (B,)
            factor_rows = factor.to(tape.dtype)  # c repeated over t, (N,)
            if steps != 1:
                factor_rows = factor_rows.repeat_interleave(steps)
            for k in delta:
                if needs_weight[k]:
                    # (c ⊙ δ)ᵀ h = δᵀ (c ⊙ h): scale whichever of the two is narrower.
                    if delta[k].shape[1] <= h[k].shape[1]:
                        grad_weight = (delta[k] * factor_rows[:, None]).t().mm(h[k])  # PS4
                    else:
                        grad_weight = delta[k].t().mm(h[k] * factor_rows[:, None])  # PS4
                    grad_weights[k] = grad_weight.to(layers[k].weight.dtype)
                if needs_bias[k]:
                    grad_biases[k] = delta[k].t().mv(factor_rows).to(layers[k].bias.dtype)  # PS4
        self.norms = squared_norms.clamp(min=0).sqrt().detach()
        if needs_x:
            grad_x = delta[0].mm(tape.weights[0].to(tape.dtype)).to(tape.h[0].dtype)  # BP5, unclipped
        return grad_x, grad_weights, grad_biases


def _squared_norms(delta: Tensor, h: Tensor, batch: int, steps: int, weight: bool, bias: bool) -> Tensor:
    """PS2 / s² for one layer: ‖Σ_t δ_bt ⊗ h_bt‖² (if ``weight``) + ‖Σ_t δ_bt‖² (if ``bias``), (B,).

    ``delta`` is δ^(l+1) (N, n_{l+1}) and ``h`` is h^(l) (N, n_l), N = B T; the sums of squares
    run in float32 at least.
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    if steps == 1:
        delta_squared = torch.linalg.vector_norm(delta, dim=1, dtype=dtype).square()  # ‖δ_b‖², (B,)
        h_squared = torch.linalg.vector_norm(h, dim=1, dtype=dtype).square() if weight else 0.0  # ‖h_b‖²
        return delta_squared * (h_squared + (1.0 if bias else 0.0))
    n_out, n_in = delta.shape[1], h.shape[1]
    delta_b = delta.reshape(batch, steps, n_out).to(dtype)  # (B, T, n_{l+1})
    total = delta_b.sum(1).square().sum(1) if bias else torch.zeros(batch, dtype=dtype, device=delta.device)
    if not weight:
        return total
    h_b = h.reshape(batch, steps, n_in).to(dtype)  # (B, T, n_l)
    if steps * (n_in + n_out) <= n_in * n_out:
        gram_delta = torch.bmm(delta_b, delta_b.transpose(1, 2))  # (δ_t · δ_t'), (B, T, T)
        gram_h = torch.bmm(h_b, h_b.transpose(1, 2))  # (h_t · h_t'), (B, T, T)
        return total + (gram_delta * gram_h).sum((1, 2))
    return total + torch.bmm(delta_b.transpose(1, 2), h_b).square().sum((1, 2))  # materialised, one layer


def _store_grad_sample(param: Tensor, g: Tensor) -> None:
    g = g.detach().to(param.dtype)
    previous = getattr(param, "grad_sample", None)
    if previous is None:
        param.grad_sample = g
    elif previous.shape == g.shape:
        param.grad_sample = previous + g
    else:
        raise RuntimeError(
            f"per_sample: a second backward in the block has grad_sample of shape {tuple(g.shape)}, "
            f"but the first had {tuple(previous.shape)}; use one batch size per block"
        )


def per_sample(
    model: BackpropMLP, loss_reduction: str = "mean", max_grad_norm: float | None = None
) -> PerSample:
    """Per-sample gradients, or per-sample clipping, in the one backward of a :class:`BackpropMLP`.

    Inside the ``with`` block the model's backward phase is replaced (``model.backward_phase``; the
    previous one is restored on exit, also on an exception) by one that computes, from the same δ^(l)
    and h^(l):

    * without ``max_grad_norm``: ``p.grad_sample`` of shape ``[B, *p.shape]`` for every trainable
      parameter, where ``p.grad_sample[b]`` is the gradient of sample b's own loss term (so for
      ``"mean"`` it is B times sample b's share of ``p.grad``); ``p.grad`` is the ordinary gradient.
    * with ``max_grad_norm=C``: ``p.grad`` = Σ_b c_b g_b (divided by B for ``"mean"``) with
      c_b = min(1, C / ‖g_b‖) and g_b sample b's gradient over all trainable parameters; no
      ``[B, *p.shape]`` tensor is built and no ``grad_sample`` is written.

    In both cases ``ps.norms`` holds the unclipped norms ‖g_b‖ (B,). Frozen parameters
    (``requires_grad=False``) get nothing and do not count in the norms. An input gradient, if
    asked for, is the ordinary (unclipped) one. Cost: see the module docstring: for 2-D input,
    clipping costs the norms, O(N Σ_l n_l), on top of a plain backward.

    The loss must be a sum (``"sum"``) or a mean (``"mean"``) over the batch of per-sample terms,
    L = Σ_b ℓ_b or (1/B) Σ_b ℓ_b, as the slides' L(θ|D) is, with ℓ_b depending on sample b alone
    (cross-entropy or MSE with reduction ``"sum"``/``"mean"``). A loss that mixes samples (batch
    statistics, a mean over another dimension than the batch, a contrastive loss) makes the
    results meaningless; this cannot be detected from inside the backward. For input (B, T, n_0)
    the sample is b and its T rows belong to it: ``"mean"`` means ℓ_b is then the mean over its
    rows, as ``F.cross_entropy(out.flatten(0, 1), y.flatten())`` gives (Opacus's convention).

    Within one block successive backward calls add up: ``grad_sample`` as ``.grad`` does (same B
    required), clipping applies per backward call; ``norms`` is the latest call's. ``grad_sample``
    left by an earlier block is removed on entry. Backward must run inside the block.

    Args:
        model: the :class:`BackpropMLP`.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces its per-sample terms.
        max_grad_norm: the clipping threshold C > 0, or ``None`` (default) for per-sample gradients.

    Returns:
        The :class:`PerSample` context; use it in a ``with`` statement.

    Shape:
        - Input: :math:`(B, *, H_{in})`: the first dimension is the sample.
        - ``norms``: :math:`(B,)`; ``p.grad_sample``: :math:`(B, *p.shape)`.

    Raises:
        TypeError: ``model`` is not a :class:`BackpropMLP`; ``max_grad_norm`` not a number.
        ValueError: ``loss_reduction`` not ``"mean"``/``"sum"``; ``max_grad_norm`` ≤ 0; (on
            forward) an input without a batch dimension (1-D).
        RuntimeError: blocks nested on one model; backward after the block closed.

    Example:
        >>> model = BackpropMLP([784, 256, 10])
        >>> x, y = torch.randn(64, 784), torch.randint(10, (64,))
        >>> with per_sample(model, loss_reduction="mean") as ps:
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> model.layers[0].weight.grad_sample.shape, ps.norms.shape
        (torch.Size([64, 256, 784]), torch.Size([64]))
    """
    return PerSample(model, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm)


def dp_sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    loss_reduction: str = "mean",
) -> None:
    r"""A DP-SGD step (Abadi et al., 2016): add Gaussian noise to the clipped sum, average, step.

    Call it after a backward inside ``per_sample(model, loss_reduction, max_grad_norm=C)``, so that
    ``p.grad`` holds S = Σ_b c_b g_b (``"sum"``) or S / B (``"mean"``). For every trainable parameter
    it sets ``p.grad = (S + N(0, (σC)² I)) / batch_size`` and then calls ``optimizer.step()``
    (Opacus's ``DPOptimizer`` with ``"mean"``). A trainable parameter without ``.grad`` gets noise
    alone, as privacy requires. Zeroing the gradients stays the caller's job.

    Privacy accounting: each step is a subsampled Gaussian mechanism with noise multiplier σ and
    sample rate q = batch_size / dataset size. Account it with an existing accountant, e.g.
    Opacus's RDP accountant::

        from opacus.accountants import RDPAccountant
        accountant = RDPAccountant()
        accountant.step(noise_multiplier=sigma, sample_rate=batch_size / len(dataset))  # every step
        epsilon = accountant.get_epsilon(delta=1e-5)

    or, for a whole run, ``opacus.accountants.analysis.rdp.compute_rdp(q=..., noise_multiplier=...,
    steps=..., orders=...)`` and ``get_privacy_spent``. The RDP analysis assumes Poisson sampling
    (each sample in each batch independently with probability q); with shuffled fixed-size batches
    the figure is the customary approximation, not a proof.

    Args:
        model: the model whose parameters ``optimizer`` updates.
        optimizer: any ``torch.optim`` optimizer over those parameters.
        noise_multiplier: σ ≥ 0; the noise's standard deviation is σ C on the clipped sum.
        max_grad_norm: C > 0, the threshold the gradients were clipped to.
        batch_size: the batch size B to average by (the expected batch size under Poisson sampling).
        generator: a ``torch.Generator`` on the parameters' device for the noise; ``None`` for the
            global one.
        loss_reduction: how the loss was reduced inside ``per_sample``: ``"mean"`` (p.grad = S / B,
            with B = ``batch_size``) or ``"sum"`` (p.grad = S).

    Raises:
        ValueError: σ < 0, C ≤ 0, a non-positive batch size or an unknown ``loss_reduction``.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"dp_sgd_step expects noise_multiplier >= 0, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ValueError(f"dp_sgd_step expects max_grad_norm > 0, got {max_grad_norm}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"dp_sgd_step expects a positive integer batch_size, got {batch_size!r}")
    if loss_reduction not in _REDUCTIONS:
        raise ValueError(f"dp_sgd_step expects loss_reduction 'mean' or 'sum', got {loss_reduction!r}")
    std = noise_multiplier * max_grad_norm
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            clipped_sum = torch.zeros_like(param) if param.grad is None else param.grad
            if loss_reduction == "mean":
                clipped_sum = clipped_sum * batch_size
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)
            param.grad = (clipped_sum + std * noise) / batch_size
    optimizer.step()
