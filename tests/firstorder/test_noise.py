"""GaussianNoise: exactly N(0, 1), the same numbers however drawn, resumable; the DP step noise per style.

The statistical tests use a fixed seed (or, in secure mode, thresholds so wide that a correct
sampler fails them about once in 10⁶ runs): the Kolmogorov-Smirnov distance to the standard normal
CDF (``torch.special.ndtr``) and the first four moments, each against its standard error.
"""

from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from torch_backprop import AdaptiveClipping, BackpropMLP, GaussianNoise, dp_sgd_step, per_sample
from torch_backprop.firstorder import noise as noise_module
from torch_backprop.firstorder.noise import CHUNK, secure_standard_normal

SHAPES = [(300, 400), (300,), (2 * CHUNK + 17,), (7, 3)]  # several chunks, one shared, odd sizes
KS_CRITICAL = 1.95  # sqrt(n) * KS distance exceeds it with probability 0.001 under N(0, 1)
MOMENT_Z = 5.0  # a moment that many standard errors away from N(0, 1)'s fails (p ~ 6e-7 each)


def parameters(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype) for shape in SHAPES]


def flat(draw: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in draw]).double()


def assert_standard_normal(z: torch.Tensor, what: str) -> None:
    n = z.numel()
    ordered = z.sort().values
    cdf = torch.special.ndtr(ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max().item()
    assert math.sqrt(n) * distance < KS_CRITICAL, f"{what}: KS distance {distance:.2e} over {n} variates"
    # moments of N(0, 1): 0, 1, 0, 3, with standard errors sqrt(1/n), sqrt(2/n), sqrt(15/n), sqrt(96/n)
    for power, expected, spread in ((1, 0.0, 1.0), (2, 1.0, 2.0), (3, 0.0, 15.0), (4, 3.0, 96.0)):
        moment = z.pow(power).mean().item()
        assert abs(moment - expected) < MOMENT_Z * math.sqrt(spread / n), f"{what}: E[z^{power}] = {moment}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_seeded_draw_is_standard_normal_in_the_parameters_shapes(dtype):
    params = parameters(dtype)
    noise = GaussianNoise(params, seed=1234, prefetch=False)
    draws = [[t.clone() for t in noise.draw()] for _ in range(2)]  # a draw is valid until the next one
    for draw in draws:
        assert [t.shape for t in draw] == [p.shape for p in params]
        assert all(t.dtype == dtype for t in draw)
    z = torch.cat([flat(draws[0]), flat(draws[1])])
    assert_standard_normal(z, f"seeded {dtype}")
    # successive draws are independent: their correlation is within 5 standard errors of 0
    assert abs(torch.corrcoef(torch.stack([flat(draws[0]), flat(draws[1])]))[0, 1].item()) < 5 / math.sqrt(
        flat(draws[0]).numel()
    )


def test_chunks_are_independent_streams():
    # every chunk has its own generator: equal-length chunks must not repeat one another
    noise = GaussianNoise([torch.zeros(3 * CHUNK)], seed=5, prefetch=False)
    (z,) = noise.draw()
    chunks = z.double().view(3, CHUNK)
    correlations = torch.corrcoef(chunks)
    off_diagonal = correlations[~torch.eye(3, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / math.sqrt(CHUNK)


def test_secure_draws_are_standard_normal():
    noise = GaussianNoise(parameters(), secure=True, prefetch=False)
    assert noise.seed is None
    assert_standard_normal(flat(noise.draw()), "secure draw")
    assert_standard_normal(secure_standard_normal(200_001), "secure_standard_normal")
    assert not torch.equal(flat(noise.draw()), flat(noise.draw()))


class GivenBytes:
    """``os.urandom`` as the noise module sees it: the bytes of a seeded stream, kept as handed out.

    Only the noise module's ``os`` is replaced (by this proxy of the real one), so that the bytes are
    exactly those its CSPRNG draws read, whatever else in the process reads ``os.urandom``.
    """

    def __init__(self, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stream, self.given = random.Random(seed), bytearray()
        monkeypatch.setattr(noise_module, "os", self)

    def urandom(self, count: int) -> bytes:
        data = self.stream.randbytes(count)
        self.given += data
        return data

    def __getattr__(self, name: str):
        return getattr(os, name)


def secure_reference(data: bytes, count: int) -> torch.Tensor:
    """NZ2-NZ4 written out in Python floats from the bytes the CSPRNG gave, independently of torch.

    Four Box-Muller pairs per two variates: uniform (k, i, j) is the 64-bit word (2k + i) P + j of the
    bytes (P pairs; i = 0 the radius, 1 the angle); variate j < P sums the cosines, P + j the sines.
    """
    pairs = (count + 1) // 2
    words = [int.from_bytes(data[8 * i : 8 * i + 8], sys.byteorder, signed=True) for i in range(8 * pairs)]
    uniform = [(((w >> 11) & (2**53 - 1)) + 0.5) * 2.0**-53 for w in words]  # NZ2

    def term(k: int, j: int, trig) -> float:
        radius, angle = uniform[2 * k * pairs + j], uniform[(2 * k + 1) * pairs + j]
        return math.sqrt(-2 * math.log(radius)) * trig(2 * math.pi * angle)  # NZ3

    variates = [
        sum(term(k, j, trig) for k in range(4)) / 2 for trig in (math.cos, math.sin) for j in range(pairs)
    ]
    return torch.tensor(variates[:count], dtype=torch.float64)  # NZ4


# float64 round-off of the four Box-Muller terms against libm's: a few ulps of values below 10
SECURE_ATOL = 1e-13


@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_secure_normals_are_the_box_muller_transform_of_the_given_bytes(count, monkeypatch):
    source = GivenBytes(count, monkeypatch)
    drawn = secure_standard_normal(count)
    assert len(source.given) == 64 * ((count + 1) // 2)  # 32 bytes a variate (a pair for an odd one)
    torch.testing.assert_close(drawn, secure_reference(bytes(source.given), count), rtol=0, atol=SECURE_ATOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_secure_dp_step_noise_is_sigma_c_over_b_times_the_given_normals(dtype, monkeypatch):
    # An empty Poisson batch leaves S = 0: an SGD step with lr 1 moves the parameters by -(σ C / B) ξ.
    model = BackpropMLP([4, 3, 2], dtype=dtype)
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    source = GivenBytes(7, monkeypatch)
    noise = GaussianNoise(params, secure=True, prefetch=False)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    with per_sample(model, loss_reduction="sum", max_grad_norm=C):
        F.cross_entropy(
            model(torch.zeros(0, 4, dtype=dtype)), torch.zeros(0, dtype=torch.long), reduction="sum"
        ).backward()
    dp_sgd_step(model, optimizer, SIGMA, C, EXPECTED_BATCH, noise, loss_reduction="mean")
    step = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before, strict=True)]).double()
    xi = secure_reference(bytes(source.given), count).to(dtype).double()  # rounded to the dtype, as drawn
    tolerance = {"rtol": 0, "atol": SECURE_ATOL} if dtype == torch.float64 else {"rtol": 3e-7, "atol": 1e-7}
    torch.testing.assert_close(step, SIGMA * C / EXPECTED_BATCH * xi, **tolerance)


@pytest.mark.parametrize(
    "options",
    [{"prefetch": True}, {"workers": 3, "prefetch": False}, {"workers": 2, "prefetch": True}],
    ids=["prefetch", "3-workers", "2-workers-prefetch"],
)
def test_the_numbers_do_not_depend_on_how_they_are_drawn(options):
    params = parameters()
    reference = GaussianNoise(params, seed=7, prefetch=False)
    other = GaussianNoise(params, seed=7, **options)
    for step in range(4):
        expected = [t.clone() for t in reference.draw()]
        for a, b in zip(expected, other.draw(), strict=True):
            assert torch.equal(a, b), f"draw {step} differs with {options}"
    assert reference.scalar() == other.scalar()
    other.close()


def test_seeds_give_different_noise_and_a_fixed_seed_the_same():
    params = parameters()
    a, b, c = (GaussianNoise(params, seed=s, prefetch=False) for s in (0, 0, 1))
    first = flat(a.draw())
    assert torch.equal(first, flat(b.draw()))
    assert not torch.equal(first, flat(c.draw()))


@pytest.mark.parametrize("prefetch", [False, True], ids=["in-step", "prefetch"])
def test_a_resumed_noise_continues_the_same_sequence(prefetch):
    params = parameters()
    straight = GaussianNoise(params, seed=11, prefetch=False)
    expected = [[t.clone() for t in straight.draw()] for _ in range(5)]
    scalars = straight.scalar()
    interrupted = GaussianNoise(params, seed=11, prefetch=prefetch)
    for _ in range(2):
        interrupted.draw()  # with prefetch, draw 3 is already being filled when the state is taken
    state = interrupted.state_dict()
    assert state["draws"] == 2
    resumed = GaussianNoise(params, seed=999, prefetch=prefetch)
    resumed.load_state_dict(state)
    for k in range(2, 5):
        for a, b in zip(expected[k], resumed.draw(), strict=True):
            assert torch.equal(a, b), f"draw {k} after resume"
    assert resumed.seed == 11 and resumed.draws == 5
    assert resumed.scalar() == scalars


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="takes no seed, got seed=3"):
        GaussianNoise(parameters(), seed=3, secure=True)
    with pytest.raises(ValueError, match="at least one parameter"):
        GaussianNoise([])
    with pytest.raises(ValueError, match="workers >= 1"):
        GaussianNoise(parameters(), workers=0)
    with pytest.raises(TypeError, match="integer seed"):
        GaussianNoise(parameters(), seed=1.5)
    with pytest.raises(ValueError, match="secure=False, got secure=True"):
        GaussianNoise(parameters(), seed=0).load_state_dict(
            GaussianNoise(parameters(), secure=True).state_dict()
        )


def test_dp_sgd_step_refuses_noise_for_other_parameters_before_any_change():
    model = BackpropMLP([4, 3, 2], dtype=torch.float64)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(2, (5,))
    with per_sample(model, loss_reduction="sum", max_grad_norm=1.0):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    grads = [p.grad.clone() for p in model.parameters()]
    wrong = GaussianNoise([torch.zeros(3, 4)], seed=0)  # float32, and too few
    with pytest.raises(
        ValueError, match=r"expects a GaussianNoise over the trainable parameters.*\(3, 4\) float64"
    ):
        dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=1.0), 1.0, 1.0, 5, wrong)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


# The DP step's noise per clipping style: an empty Poisson batch leaves the clipped sum S = 0, so
# an SGD step with lr 1 moves the parameters by -(σ Δ / B) ξ, ξ the noise. Δ comes from the style's
# thresholds by CL4 (sqrt(Σ_g C_g²)), computed here; adaptive clipping noises with Opacus's multiplier.
SIGMA, C, EXPECTED_BATCH, SIZES = 1.3, 0.7, 8, [40, 300, 300, 10]
DEPTH = len(SIZES) - 1
PER_LAYER = [0.1 * (k + 1) for k in range(2 * DEPTH)]
STYLES = {
    "flat": ({}, C, C),
    "per_layer": ({"clipping": "per_layer"}, PER_LAYER, math.sqrt(sum(c * c for c in PER_LAYER))),
    "layer-wise": ({"clipping": "layer-wise"}, C, C),
    "param-wise": ({"clipping": "param-wise"}, C, C),
    "group-wise": ({"clipping": "group-wise", "groups": [0, 2]}, C, C),
    "automatic": ({"clipping_fn": "automatic"}, C, C),
    "adaptive": ({"clipping": "adaptive"}, None, None),  # Δ = the current C, noised with the multiplier below
}
ADAPTIVE_MULTIPLIER = (SIGMA**-2 - (2 * 1.0) ** -2) ** -0.5  # Andrew et al. 2021, σ_u = 1


@pytest.mark.parametrize("style", list(STYLES))
def test_the_step_noise_has_mean_zero_and_the_styles_variance(style):
    options, threshold, sensitivity = STYLES[style]
    if threshold is None:
        threshold = AdaptiveClipping(C, unclipped_num_std=1.0)
    model = BackpropMLP(SIZES)
    params = list(model.parameters())
    noise = GaussianNoise(params, seed=2024)
    z = []
    for _ in range(2):
        before = [p.detach().clone() for p in params]
        std = (
            SIGMA * sensitivity if sensitivity is not None else ADAPTIVE_MULTIPLIER * threshold.max_grad_norm
        )
        optimizer = torch.optim.SGD(params, lr=1.0)
        optimizer.zero_grad(set_to_none=True)
        with per_sample(model, loss_reduction="sum", max_grad_norm=threshold, **options):
            F.cross_entropy(
                model(torch.zeros(0, SIZES[0])), torch.zeros(0, dtype=torch.long), reduction="sum"
            ).backward()
        dp_sgd_step(model, optimizer, SIGMA, threshold, EXPECTED_BATCH, noise, loss_reduction="mean")
        step = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before, strict=True)]).double()
        z.append(step * EXPECTED_BATCH / std)
    noise.close()
    assert_standard_normal(torch.cat(z), f"{style} step noise / (σΔ/B)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_noise_on_cuda_parameters_is_drawn_there_and_steps(secure):
    model = BackpropMLP([40, 300, 10], device="cuda")
    params = list(model.parameters())
    noise = GaussianNoise(params, secure=True) if secure else GaussianNoise(params, seed=3)
    assert not noise.prefetch  # the device queues the draw anyway
    draw = noise.draw()
    assert all(t.device.type == "cuda" and t.shape == p.shape for t, p in zip(draw, params, strict=True))
    assert_standard_normal(flat(draw).cpu(), f"cuda, secure={secure}")
    if not secure:
        again = GaussianNoise(params, seed=3).draw()
        assert all(torch.equal(a, b) for a, b in zip(draw, again, strict=True))
    optimizer = torch.optim.SGD(params, lr=1.0)
    with per_sample(model, loss_reduction="sum", max_grad_norm=1.0):
        F.cross_entropy(
            model(torch.randn(4, 40, device="cuda")),
            torch.zeros(4, dtype=torch.long, device="cuda"),
            reduction="sum",
        ).backward()
    dp_sgd_step(model, optimizer, 1.0, 1.0, 4, noise, loss_reduction="mean")
    assert all(torch.isfinite(p).all() for p in params)
