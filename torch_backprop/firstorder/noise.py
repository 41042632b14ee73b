r"""The Gaussian noise of DP-SGD: seeded, reproducible, drawn in fixed chunks, optionally ahead of time.

Drawing N(0, I) for every parameter is most of what a DP-SGD step costs beyond a plain step:
PyTorch's CPU ``normal_`` fills a tensor on one thread at a few ns a variate, about a fifth of a
plain ``[784, 512, 512, 10]`` step at batch 256. :class:`GaussianNoise` defines the noise so that
*how* it is drawn cannot change *what* is drawn:

    NZ1  draw k, chunk j = the k-th ``normal_`` fill of chunk j (at most ``CHUNK`` variates of one flat
         buffer per (device, dtype) of the parameters) by generator j, seeded with SHA-256(seed, j)

Each chunk has its own ``torch.Generator``, so the chunks may be filled on any number of threads
(``workers``), in any order, now or ahead of time (``prefetch``: the next draw is filled on
background threads while the step that will use it runs), and a seed gives the same noise every
way. :meth:`GaussianNoise.state_dict` (every generator's state before the first draw not yet
handed out) lets a resumed run continue the same sequence.

``secure=True`` is for a guarantee that must hold against an adversary who could reproduce a
seed: there is none. Every variate comes from the operating system's cryptographically secure
generator (``os.urandom``) by Box–Muller in float64, with Opacus's ``secure_mode`` defence against
floating-point attacks (Holohan and Braghin 2021, section 5.1, n = 2): each variate is the sum of
four standard normals divided by two, still exactly N(0, 1), then rounded to the parameter's dtype.

    NZ2  u = (⌊r / 2¹¹⌋ + ½) 2⁻⁵³,  r: 64 random bits           (a 53-bit uniform in (0, 1))
    NZ3  n₁, n₂ = √(−2 ln u₁) (cos 2πu₂, sin 2πu₂)              (Box–Muller: two N(0, 1))
    NZ4  ξ = (n₁ + n₂ + n₃ + n₄) / 2                             (N(0, 1); Opacus's 2n sum, n = 2)

It reads 32 random bytes per variate from the kernel; what that costs is measured in
``benchmarks/README.md`` (``benchmarks/per_sample.py --whole-step``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK", "GaussianNoise", "secure_standard_normal", "secure_uniform"]

CHUNK = 1 << 17  # variates per generator (NZ1); part of the definition of a seed's noise


def _chunk_seed(seed: int | str, stream: str) -> int:
    """A 64-bit seed for one stream (``"group/chunk"`` or ``"scalar"``) of ``seed``: SHA-256, NZ1."""
    digest = hashlib.sha256(f"torch_backprop.GaussianNoise/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def secure_uniform(count: int) -> Tensor:
    """``count`` uniforms in (0, 1), float64, 53 bits each, from ``os.urandom`` (NZ2)."""
    bits = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64) if count else None
    if bits is None:
        return torch.empty(0, dtype=torch.float64)
    return (((bits >> 11) & (2**53 - 1)).to(torch.float64) + 0.5) * 2.0**-53  # NZ2, never 0 or 1


def secure_standard_normal(count: int) -> Tensor:
    """``count`` N(0, 1) variates in float64 from ``os.urandom``: NZ2-NZ4."""
    pairs = (count + 1) // 2
    u = secure_uniform(8 * pairs).view(4, 2, pairs)  # four Box–Muller pairs per two variates
    radius = u[:, 0].log_().mul_(-2.0).sqrt_()  # NZ3
    angle = u[:, 1].mul_(2 * math.pi)
    xi = torch.empty(2 * pairs, dtype=torch.float64)
    torch.sum(radius * angle.cos(), 0, out=xi[:pairs])  # n₁ + n₂ + n₃ + n₄, from the cosines
    torch.sum(radius.mul_(angle.sin_()), 0, out=xi[pairs:])  # and from the sines
    return xi[:count].mul_(0.5)  # NZ4


class GaussianNoise:
    """Standard normal noise in the shapes of ``params``, one draw per DP-SGD step.

    Pass it to :func:`~torch_backprop.dp_sgd_step` as ``generator``: the step scales the draw by
    σ times the clipping style's sensitivity. :meth:`draw` returns N(0, I) tensors with the shape,
    dtype and device of each parameter (views into a buffer that stays valid until the next draw).

    How the chunks are filled (NZ1) does not change the numbers, only the time:

    * ``workers``: threads that fill the chunks of one draw in parallel (1: the caller's thread);
    * ``prefetch``: once a draw is handed out, fill the next one on background threads, so that
      the next step finds it ready. ``None`` (default): on CPU when this process leaves a core
      idle (``torch.get_num_threads()`` below the cores it may use), since a background draw that
      competes with the step's own threads for a core slows the step instead.

    Args:
        params: the parameters to draw noise for, in the order :meth:`draw` returns it (for
            ``dp_sgd_step``: the model's trainable parameters, ``model.parameters()`` order).
        seed: seeds the generators (NZ1); ``None`` for a seed drawn from ``os.urandom``.
        secure: draw every variate from the operating system's CSPRNG (NZ2-NZ4), with no seed.
        prefetch: fill the next draw ahead of time (see above).
        workers: threads per draw (≥ 1).

    Raises:
        ValueError: no parameters, a ``seed`` together with ``secure``, ``workers`` < 1.
        TypeError: ``seed`` not an integer.

    Example:
        >>> noise = GaussianNoise([p for p in model.parameters() if p.requires_grad], seed=0)
        >>> with per_sample(model, "sum", max_grad_norm=1.0):
        ...     F.cross_entropy(model(x), y, reduction="sum").backward()
        >>> dp_sgd_step(model, optimizer, 1.0, 1.0, 256, noise, loss_reduction="mean")
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        seed: int | None = None,
        *,
        secure: bool = False,
        prefetch: bool | None = None,
        workers: int = 1,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("GaussianNoise expects at least one parameter, got none")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"GaussianNoise expects an integer seed or None, got {seed!r}")
        if secure and seed is not None:
            raise ValueError(
                "GaussianNoise(secure=True) draws from the operating system's CSPRNG and takes no seed, "
                f"got seed={seed}"
            )
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"GaussianNoise expects workers >= 1 (an integer), got {workers!r}")
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.dtype for p in params]
        self.devices = [p.device for p in params]
        self.secure = secure
        self.seed = None if secure else (seed if seed is not None else _chunk_seed(os.urandom(16).hex(), "x"))
        self.workers = workers
        # one flat buffer per (device, dtype), cut into chunks; parameter i's noise is a view into its group's
        self._groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, p in enumerate(params):
            self._groups.setdefault((p.device, p.dtype), []).append(index)
        self._sizes = {key: sum(self.shapes[i].numel() for i in ix) for key, ix in self._groups.items()}
        self._chunks = [  # (group, start, stop)
            (key, start, min(start + CHUNK, size))
            for key, size in self._sizes.items()
            for start in range(0, size, CHUNK)
        ]
        self._generators: list[torch.Generator] = []
        if not secure:
            for number, (key, start, _) in enumerate(self._chunks):
                generator = torch.Generator(key[0])
                generator.manual_seed(_chunk_seed(self.seed, f"{number}/{start}"))
                self._generators.append(generator)
            self._scalar = torch.Generator().manual_seed(_chunk_seed(self.seed, "scalar"))
        cpu_only = all(device.type == "cpu" for device, _ in self._groups)
        if prefetch is None:
            prefetch = cpu_only and torch.get_num_threads() < _cores()
        self.prefetch = bool(prefetch) and cpu_only
        self._buffers = [self._allocate(), self._allocate()] if self.prefetch else [self._allocate()]
        self._next = 0  # which buffer the next draw is
        self._pending: list[Future] = []
        self._states_before_pending: list[Tensor] | None = None
        threads = workers if workers > 1 or self.prefetch else 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="GaussianNoise") if threads else None
        self.draws = 0  # draws handed out

    def _allocate(self) -> dict[tuple[torch.device, torch.dtype], Tensor]:
        return {key: torch.empty(size, device=key[0], dtype=key[1]) for key, size in self._sizes.items()}

    def _fill_chunks(self, buffers: dict[tuple[torch.device, torch.dtype], Tensor], numbers: range) -> None:
        for number in numbers:
            key, start, stop = self._chunks[number]
            piece = buffers[key][start:stop]
            if self.secure:
                piece.copy_(secure_standard_normal(stop - start))  # NZ2-NZ4
            else:
                piece.normal_(generator=self._generators[number])  # NZ1

    def _start_fill(self, buffers: dict[tuple[torch.device, torch.dtype], Tensor]) -> list[Future]:
        """Hand the chunks of one draw to the pool, split into ``workers`` contiguous runs."""
        count, parts = len(self._chunks), min(self.workers, len(self._chunks))
        bounds = [count * k // parts for k in range(parts + 1)]
        return [
            self._pool.submit(self._fill_chunks, buffers, range(a, b))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises what a fill raised

    def draw(self) -> list[Tensor]:
        """The next N(0, I) draw, one tensor per parameter; with ``prefetch``, starts the one after it."""
        buffers = self._buffers[self._next]
        if self._pending:
            self._wait()
        elif self._pool is not None and self.workers > 1:
            self._pending = self._start_fill(buffers)
            self._wait()
        else:
            self._fill_chunks(buffers, range(len(self._chunks)))
        self._states_before_pending = None
        self.draws += 1
        if self.prefetch:
            self._states_before_pending = self._generator_states()
            self._next = 1 - self._next
            self._pending = self._start_fill(self._buffers[self._next])
        return self._split(buffers)

    def scalar(self) -> float:
        """One N(0, 1) float64 variate from a stream of its own (the noise on adaptive clipping's count)."""
        if self.secure:
            return float(secure_standard_normal(1)[0])
        return float(torch.randn((), generator=self._scalar, dtype=torch.float64))

    def _split(self, buffers: dict[tuple[torch.device, torch.dtype], Tensor]) -> list[Tensor]:
        noise: list[Tensor | None] = [None] * len(self.shapes)
        for key, indices in self._groups.items():
            pieces = buffers[key].split([self.shapes[i].numel() for i in indices])
            for i, piece in zip(indices, pieces, strict=True):
                noise[i] = piece.view(self.shapes[i])
        return noise  # type: ignore[return-value]

    def _generator_states(self) -> list[Tensor]:
        return [g.get_state() for g in self._generators]

    def state_dict(self) -> dict[str, Any]:
        """The seed, the draws handed out and every generator's state after them.

        A draw filled ahead of time but not handed out is not part of the state: after
        :meth:`load_state_dict` it is drawn again, the same.
        """
        if self.secure:
            return {"secure": True, "draws": self.draws}
        states = self._states_before_pending if self._pending else self._generator_states()
        return {
            "secure": False,
            "seed": self.seed,
            "chunk": CHUNK,
            "draws": self.draws,
            "generators": [state.clone() for state in states],
            "scalar": self._scalar.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sequence that :meth:`state_dict` described; a draw filled ahead is discarded.

        Raises:
            ValueError: a state of the other mode (secure or seeded), or of another chunk layout.
        """
        if state.get("secure") != self.secure:
            raise ValueError(
                f"GaussianNoise.load_state_dict expects a state with secure={self.secure}, "
                f"got secure={state.get('secure')}"
            )
        if not self.secure and (
            state.get("chunk") != CHUNK or len(state.get("generators", ())) != len(self._generators)
        ):
            raise ValueError(
                f"GaussianNoise.load_state_dict expects {len(self._generators)} generators of {CHUNK} "
                f"variates, got {len(state.get('generators', ()))} of {state.get('chunk')}"
            )
        self._wait()
        if not self.secure:
            for generator, saved in zip(self._generators, state["generators"], strict=True):
                generator.set_state(saved)
            self._scalar.set_state(state["scalar"])
            self.seed = state["seed"]
        self._states_before_pending = None
        self.draws = int(state["draws"])

    def close(self) -> None:
        """Wait for a draw filled ahead and stop the background threads (also done at exit)."""
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.prefetch = False
        self.workers = 1

    def __repr__(self) -> str:
        source = "secure (os.urandom)" if self.secure else f"seed={self.seed}"
        return (
            f"GaussianNoise({sum(s.numel() for s in self.shapes)} variates in {len(self._chunks)} chunks, "
            f"{source}, prefetch={self.prefetch}, workers={self.workers})"
        )


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
