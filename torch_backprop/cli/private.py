"""``torch-backprop train --dp``: DP-SGD with Poisson sampling, privacy accounting by Opacus, ε per epoch.

The options (:func:`add_arguments`) keep Opacus's names and meanings (``target_epsilon``,
``noise_multiplier``, ``max_grad_norm``, ``clipping``, ``secure_mode``, ``accountant``);
:func:`validate` checks them, and computes σ for a target ε, before any data loads. A run is
:class:`PrivateTraining`:

* **Sampling**, as Opacus's ``make_private`` sets it up from a ``DataLoader`` of ``--batch-size`` B
  over N samples: ⌈N/B⌉ steps per epoch, sample rate q = 1/⌈N/B⌉, each step's batch drawn by
  Poisson sampling (every sample independently with probability q; the expected batch N q), by a
  generator seeded with ``--seed`` (or ``os.urandom`` with ``--secure-mode``). Under ``torchrun``
  every process draws the same global batch and takes its share of it.
* **The step.** ``--backend manual``: clipping inside the one backward
  (:func:`~torch_backprop.per_sample` with :meth:`PrivateTraining.clipping`, in ``train``'s loop)
  and :func:`~torch_backprop.dp_sgd_step` with a
  :class:`~torch_backprop.GaussianNoise`, which sums the clipped sums of all processes and draws
  the noise once, so N processes take the step of one. ``--backend autograd``: the native twin
  through Opacus itself (``GradSampleModule`` and ``DPOptimizer``, ``DPPerLayerOptimizer`` or
  ``AdaClipDPOptimizer``), on the same batches, for comparison.
* **Accounting**: Opacus's accountant (``--accountant prv``, its ``PrivacyEngine`` default; ``rdp``,
  ``gdp``) steps once per step with (σ, q); ε at δ is printed after every epoch and written to
  ``metrics.json``. The checkpoint keeps the accountant's history, the sampler's and the noise's
  generator states, so ``--resume`` continues the same batches, noise and ε.

Opacus is the ``dp`` extra (``pip install 'torch-backprop[dp]'``); without it ``--dp`` says so in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ..firstorder.clipping import STYLES, AdaptiveClipping
from ..firstorder.dp_sgd import dp_sgd_step
from ..firstorder.noise import GaussianNoise, secure_uniform
from .data import DATASETS
from .options import ConfigError, number

__all__ = ["PrivateTraining", "add_arguments", "check_resume", "default_delta", "train_size", "validate"]

ACCOUNTANTS = ("prv", "rdp", "gdp")
OPACUS_STYLES = ("flat", "per_layer", "adaptive")  # what the twin can run through Opacus
INSTALL = "pip install 'torch-backprop[dp]'"
# The DP options besides --dp (all default to None): given without --dp, they are refused.
# run_folder.RESUME_KEYS names them too: a --resume must repeat them.
_DP_OPTIONS = (
    "target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "clipping", "clipping_fn", "groups",
    "accountant", "secure_mode", "target_unclipped_quantile", "clipbound_learning_rate", "unclipped_num_std",
)  # fmt: skip


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a finite number > 0, or comma-separated ones such as 0.5,0.5, got {text!r}"
        )
    return values


def _layer_indices(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or values[0] != 0 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"expected increasing layer indices starting at 0, such as 0,2, got {text!r}"
        )
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--dp`` options to ``train``'s ``parser``."""
    dp = parser.add_argument_group("differential privacy (DP-SGD; needs Opacus for the accounting)")
    dp.add_argument(
        "--dp",
        action="store_true",
        help="train with DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise, ε per epoch",
    )
    dp.add_argument(
        "--target-epsilon",
        type=number(float, low=0, low_open=True),
        default=None,
        metavar="ε",
        help="the ε to spend in --epochs; σ from Opacus's get_noise_multiplier",
    )
    dp.add_argument(
        "--noise-multiplier",
        type=number(float, low=0, low_open=True),
        default=None,
        metavar="σ",
        help="σ instead of --target-epsilon: the noise std is σ times the clipping sensitivity",
    )
    dp.add_argument(
        "--delta",
        type=number(float, low=0, high=1, low_open=True, high_open=True),
        default=None,
        metavar="δ",
        help="δ of (ε, δ); default: the largest power of ten below 1/N (N training samples)",
    )
    dp.add_argument(
        "--max-grad-norm",
        type=_thresholds,
        default=None,
        metavar="C",
        help="clipping threshold C (default 1.0); or one per group, comma-separated (per_layer: one "
        "per parameter tensor; a single C there means C/sqrt(P) each)",
    )
    dp.add_argument(
        "--clipping",
        choices=STYLES,
        default=None,
        help="clipping style: flat (default), per_layer, adaptive (Opacus), layer-wise, param-wise, "
        "group-wise (fastDP)",
    )
    dp.add_argument(
        "--clipping-fn",
        choices=["Abadi", "automatic"],
        default=None,
        help="Abadi: min(1, C/norm) (default); automatic: C/(norm + 0.01) (fastDP)",
    )
    dp.add_argument(
        "--groups",
        type=_layer_indices,
        default=None,
        metavar="0,K,...",
        help="group-wise: the first layer of each group",
    )
    dp.add_argument(
        "--accountant", choices=ACCOUNTANTS, default=None, help="Opacus's accountant (default: prv)"
    )
    dp.add_argument(
        "--secure-mode",
        action="store_true",
        default=None,
        help="noise and sampling from the operating system's CSPRNG (os.urandom), with Opacus's "
        "defence against floating-point attacks; not reproducible, and slower",
    )
    dp.add_argument(
        "--target-unclipped-quantile",
        type=number(float, low=0, high=1),
        default=None,
        help="adaptive: the fraction of samples C should leave unclipped (default 0.5)",
    )
    dp.add_argument(
        "--clipbound-learning-rate",
        type=number(float, low=0, low_open=True),
        default=None,
        help="adaptive: the step size of C (default 0.2)",
    )
    dp.add_argument(
        "--unclipped-num-std",
        type=number(float, low=0, low_open=True),
        default=None,
        help="adaptive: the noise std on the unclipped count (default 1.0; σ must be below twice it)",
    )


def train_size(args: argparse.Namespace) -> int:
    """N, the training samples the options select, known before any data loads."""
    full = args.fake_size if args.dataset == "fake" else DATASETS[args.dataset].train_size
    return min(full, args.limit_train) if args.limit_train is not None else full


def default_delta(samples: int) -> float:
    """The largest power of ten below 1/N: 1e-4 for N = 8,000, 1e-5 for N = 10,000 or 60,000."""
    return 10.0 ** -(math.floor(math.log10(samples)) + 1)


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ConfigError(
            f"--dp needs Opacus for the privacy accounting, which is not installed: {INSTALL}"
        ) from None
    return opacus


def validate(args: argparse.Namespace) -> None:
    """Check the DP options and fill in their defaults and σ, before any data loads.

    Sets ``args.delta``, ``args.max_grad_norm``, ``args.clipping``, ... to the values the run uses,
    and ``args.dp_plan`` (σ, q, steps, expected batch) for :class:`PrivateTraining`.

    Raises:
        ConfigError: DP options without ``--dp``; ``--dp`` with options it cannot honour; Opacus
            missing; a target ε that cannot be reached.
    """
    given = [name for name in _DP_OPTIONS if getattr(args, name) is not None]
    if not args.dp:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} expected --dp with it, got no --dp")
        return
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        raise ConfigError(
            "--dp expected exactly one of --target-epsilon and --noise-multiplier, got "
            + ("both" if args.target_epsilon is not None else "neither")
        )
    if args.amp != "off":
        raise ConfigError(
            f"--dp expected --amp off (per-sample clipping in full precision), got --amp {args.amp}"
        )
    if args.compare_autograd:
        raise ConfigError(
            "--dp trains one backend, expected --backend manual or --backend autograd, got --compare-autograd"
        )
    args.clipping = args.clipping or "flat"
    args.clipping_fn = args.clipping_fn or "Abadi"
    args.accountant = args.accountant or "prv"
    args.secure_mode = bool(args.secure_mode)
    if args.backend == "autograd":
        if args.clipping not in OPACUS_STYLES or args.clipping_fn != "Abadi":
            raise ConfigError(
                "--dp --backend autograd runs the step through Opacus, which clips flat, per_layer or "
                f"adaptive with the Abadi function; got --clipping {args.clipping} "
                f"--clipping-fn {args.clipping_fn}"
            )
        if args.secure_mode:
            raise ConfigError(
                "--dp --backend autograd expected no --secure-mode (Opacus's secure_mode needs torchcsprng, "
                "which does not install on current PyTorch); got --secure-mode"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "--dp --backend autograd runs in one process; expected WORLD_SIZE 1, got "
                f"{os.environ['WORLD_SIZE']} (use --backend manual under torchrun)"
            )
    _check_clipping(args)
    _opacus()
    samples = train_size(args)
    args.delta = args.delta if args.delta is not None else default_delta(samples)
    steps_per_epoch = math.ceil(samples / args.batch_size)
    sample_rate = 1 / steps_per_epoch
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = _noise_multiplier(args, sample_rate, steps_per_epoch)
    if args.clipping == "adaptive":
        unclipped_std = args.unclipped_num_std if args.unclipped_num_std is not None else 1.0
        if not sigma < 2 * unclipped_std:
            raise ConfigError(
                f"--clipping adaptive expected σ below 2 × --unclipped-num-std = {2 * unclipped_std:g} "
                f"(Andrew et al. 2021), got σ = {sigma:.4g}; raise --unclipped-num-std"
            )
    args.dp_plan = {
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps_per_epoch": steps_per_epoch,
        "train_samples": samples,
        "expected_batch_size": max(1, int(samples * sample_rate)),  # Opacus's make_private
    }


def _check_clipping(args: argparse.Namespace) -> None:
    layers = len(args.hidden) + 1
    parameters = 2 * layers  # every BackpropMLP layer of the command has a weight and a bias
    if args.groups is not None and args.clipping != "group-wise":
        raise ConfigError(f"--groups expected --clipping group-wise, got --clipping {args.clipping}")
    if args.clipping == "group-wise":
        if args.groups is None:
            raise ConfigError(
                "--clipping group-wise expected --groups 0,K,... (the first layer of each group), got none"
            )
        if args.groups[-1] >= layers:
            raise ConfigError(
                f"--groups expected layer indices below {layers} (the model's layers), got {args.groups}"
            )
    groups = {
        "flat": 1, "adaptive": 1, "per_layer": parameters, "param-wise": parameters, "layer-wise": layers,
        "group-wise": len(args.groups or []),
    }[args.clipping]  # fmt: skip
    thresholds = args.max_grad_norm or [1.0]
    if len(thresholds) not in (1, groups) or (len(thresholds) > 1 and args.clipping in ("flat", "adaptive")):
        raise ConfigError(
            f"--max-grad-norm expected 1 threshold{f' or {groups} (one per group)' if groups > 1 else ''} "
            f"for --clipping {args.clipping}, got {len(thresholds)}"
        )
    args.max_grad_norm = thresholds
    if args.clipping != "adaptive":
        extra = [n for n in ("target_unclipped_quantile", "clipbound_learning_rate", "unclipped_num_std")
                 if getattr(args, n) is not None]  # fmt: skip
        if extra:
            raise ConfigError(
                f"--{extra[0].replace('_', '-')} expected --clipping adaptive, got --clipping {args.clipping}"
            )


def _noise_multiplier(args: argparse.Namespace, sample_rate: float, steps_per_epoch: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    steps = steps_per_epoch * args.epochs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha", GDP's caveat
            return float(
                get_noise_multiplier(
                    target_epsilon=args.target_epsilon,
                    target_delta=args.delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=args.accountant,
                )
            )
    except (ValueError, RuntimeError, OverflowError) as error:
        reason = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
        raise ConfigError(
            f"--target-epsilon {args.target_epsilon:g} cannot be reached in {args.epochs} epoch(s) "
            f"({steps} steps at sample rate {sample_rate:.4g}, δ = {args.delta:g}, {args.accountant} "
            f"accountant): {reason}; expected a larger ε or δ, or fewer steps"
        ) from None


def check_resume(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Refuse a ``--resume`` whose σ would differ from the run's (a target ε with other ``--epochs``).

    Raises:
        ConfigError: σ computed for these options differs from the σ the checkpoint was trained with.
    """
    if not args.dp or "dp" not in saved:
        return
    trained = saved["dp"]["noise_multiplier"]
    planned = args.dp_plan["noise_multiplier"]
    if planned != trained:
        raise ConfigError(
            f"--resume expected σ = {trained:.6g}, as the run was trained with (--target-epsilon "
            f"{args.target_epsilon:g} over {saved['config']['epochs']} epochs), got σ = {planned:.6g} for "
            f"--epochs {args.epochs}; keep --epochs {saved['config']['epochs']}, or resume with "
            f"--noise-multiplier {trained:.6g} instead of --target-epsilon (ε then grows past the target)"
        )


def _derived_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one stream of ``--seed`` (the sampler's, the noise's): SHA-256."""
    digest = hashlib.sha256(f"torch-backprop train --dp/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _Batches:
    """One epoch's Poisson batches for this process: a sized iterable of (x, y)."""

    def __init__(self, owner: PrivateTraining, dataset: TensorDataset) -> None:
        self.owner, self.dataset = owner, dataset

    def __len__(self) -> int:
        return self.owner.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        features, labels = self.dataset.tensors
        for _ in range(len(self)):
            index = self.owner.sample(len(labels))
            self.owner.account()  # one step of the subsampled Gaussian mechanism per batch drawn
            yield features[index], labels[index]


class PrivateTraining:
    """A ``--dp`` run's sampler, accountant, noise and DP step, for each trainee of ``train``.

    Args:
        args: the validated options (with ``args.dp_plan``).
        trainees: ``train``'s trainees (their ``model``, ``optimizer``, ``wrapped``, ``name``);
            the autograd one is wrapped for Opacus here.
        group: ``train``'s process group (its ``rank``, ``world_size`` and ``device``; a secure-mode
            batch is broadcast from rank 0 through the device); ``None``: one process on the CPU.
    """

    def __init__(self, args: argparse.Namespace, trainees: list[Any], group: Any = None) -> None:
        plan = args.dp_plan
        self.args = args
        self.rank, self.world_size = (group.rank, group.world_size) if group is not None else (0, 1)
        self.device = group.device if group is not None else torch.device("cpu")
        self.noise_multiplier = plan["noise_multiplier"]
        self.sample_rate = plan["sample_rate"]
        self.steps_per_epoch = plan["steps_per_epoch"]
        self.train_samples = plan["train_samples"]
        self.expected_batch_size = plan["expected_batch_size"]
        self.delta = args.delta
        self.secure = args.secure_mode
        from opacus.accountants import create_accountant

        self.accountant = create_accountant(args.accountant)
        self.sampler = (
            None if self.secure else torch.Generator().manual_seed(_derived_seed(args.seed, "sampler"))
        )
        self.adaptive: AdaptiveClipping | None = None
        self.noise: dict[str, GaussianNoise | torch.Generator] = {}
        for trainee in trainees:
            self._prepare(trainee)

    # -- set-up ---------------------------------------------------------------------------------

    def _threshold(self) -> Any:
        """max_grad_norm as per_sample takes it for the style."""
        args, thresholds = self.args, self.args.max_grad_norm
        if args.clipping == "adaptive":
            return self.adaptive
        if args.clipping == "per_layer" and len(thresholds) == 1:
            count = 2 * (len(args.hidden) + 1)
            return [thresholds[0] / math.sqrt(count)] * count
        return thresholds[0] if len(thresholds) == 1 else list(thresholds)

    def _prepare(self, trainee: Any) -> None:
        args = self.args
        if args.clipping == "adaptive" and self.adaptive is None:
            options = {
                "target_unclipped_quantile": args.target_unclipped_quantile,
                "clipbound_learning_rate": args.clipbound_learning_rate,
                "unclipped_num_std": args.unclipped_num_std,
            }
            self.adaptive = AdaptiveClipping(
                args.max_grad_norm[0], **{k: v for k, v in options.items() if v is not None}
            )
        trainee.wrapped = trainee.model  # no DDP: dp_sgd_step sums the clipped sums itself
        seed = _derived_seed(args.seed, "noise")  # not the sampler's stream
        if trainee.name == "manual":
            params = [p for p in trainee.model.parameters() if p.requires_grad]
            self.noise["manual"] = (
                GaussianNoise(params, secure=True) if self.secure else GaussianNoise(params, seed)
            )
            return
        from opacus import GradSampleModule
        from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer

        generator = torch.Generator().manual_seed(seed)
        self.noise["autograd"] = generator
        trainee.wrapped = GradSampleModule(trainee.model, loss_reduction="sum")
        common = {
            "noise_multiplier": self.noise_multiplier,
            "expected_batch_size": self.expected_batch_size,
            "loss_reduction": "mean",  # (clipped sum + noise) / expected batch, as dp_sgd_step's "mean"
            "generator": generator,
        }
        if args.clipping == "adaptive":
            a = self.adaptive
            trainee.optimizer = AdaClipDPOptimizer(
                trainee.optimizer,
                max_grad_norm=a.max_grad_norm,
                target_unclipped_quantile=a.target_unclipped_quantile,
                clipbound_learning_rate=a.clipbound_learning_rate,
                max_clipbound=a.max_clipbound,
                min_clipbound=a.min_clipbound,
                unclipped_num_std=a.unclipped_num_std,
                **common,
            )
        elif args.clipping == "per_layer":
            optimizer_class = DPPerLayerOptimizer
        else:
            optimizer_class = DPOptimizer
        if args.clipping != "adaptive":
            trainee.optimizer = optimizer_class(trainee.optimizer, max_grad_norm=self._threshold(), **common)

    # -- one epoch ------------------------------------------------------------------------------

    def batches(self, dataset: TensorDataset) -> _Batches:
        """The next epoch's Poisson batches for this process (``len``: steps per epoch)."""
        if len(dataset) != self.train_samples:
            raise ConfigError(
                f"--dp accounted for {self.train_samples} training samples, but the dataset holds "
                f"{len(dataset)}; pass --limit-train {len(dataset)}"
            )
        return _Batches(self, dataset)

    def sample(self, samples: int) -> Tensor:
        """This process's share of one Poisson batch: every sample in with probability q."""
        if self.secure:
            chosen = secure_uniform(samples) < self.sample_rate
            if self.world_size > 1:  # every process takes its share of rank 0's draw
                shared = chosen.to(self.device, torch.uint8)
                dist.broadcast(shared, 0)
                chosen = shared.cpu().bool()
        else:
            chosen = torch.rand(samples, generator=self.sampler, dtype=torch.float64) < self.sample_rate
        index = chosen.nonzero().squeeze(1)
        return torch.tensor_split(index, self.world_size)[self.rank] if self.world_size > 1 else index

    def opacus_step(self, trainee: Any, x: Tensor, y: Tensor) -> Tensor:
        """One DP-SGD step of the twin through Opacus on its share (x, y); the summed loss (detached)."""
        trainee.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # harmless
            loss = F.cross_entropy(trainee.wrapped(x), y, reduction="sum")
            loss.backward()
        trainee.optimizer.step()  # Opacus: clip, noise, average by the expected batch, step
        return loss.detach()

    def clipping(self) -> dict[str, Any]:
        """The ``per_sample`` options of the manual step's clipped backward (``loss_reduction="sum"``)."""
        style = {"max_grad_norm": self._threshold(), "clipping": self.args.clipping}
        style["clipping_fn"] = self.args.clipping_fn
        if self.args.clipping == "group-wise":
            style["groups"] = self.args.groups
        return style

    def noise_and_step(self, trainee: Any) -> None:
        """After the manual clipped backward: ``dp_sgd_step`` adds the noise once, averages, steps."""
        dp_sgd_step(
            trainee.model,
            trainee.optimizer,
            self.noise_multiplier,
            self._threshold(),
            self.expected_batch_size,
            self.noise["manual"],
            loss_reduction="mean",  # (S + N(0, (σΔ)²)) / expected batch, as Opacus's "mean"
        )

    def account(self) -> None:
        """One step of the accountant (each batch :meth:`batches` hands out is one)."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """ε spent so far at δ, by the accountant."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.accountant.get_epsilon(delta=self.delta))

    def report(self, trainees: list[Any]) -> dict[str, Any]:
        """The epoch's privacy figures for ``metrics.json``."""
        row = {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": sum(steps for _, _, steps in self.accountant.history),
            "accountant": self.args.accountant,
        }
        if self.adaptive is not None:
            row["max_grad_norm"] = {t.name: self._current_threshold(t) for t in trainees}
        return row

    def end_epoch(self, row: dict[str, Any], trainees: list[Any], say: Any = print) -> dict[str, Any]:
        """Add the privacy figures to the epoch's ``row``, ``say`` its ε line; the checkpoint's entry."""
        row["privacy"] = privacy = self.report(trainees)
        say(
            f"epoch {row['epoch']}/{self.args.epochs}  ε = {privacy['epsilon']:.3f} spent at δ = "
            f"{privacy['delta']:g} ({privacy['steps']} steps, σ = {privacy['noise_multiplier']:.4g}, "
            f"{self.args.accountant} accountant)"
        )
        return {"dp": self.state(trainees)}

    def _current_threshold(self, trainee: Any) -> float:
        if trainee.name == "autograd":
            return float(trainee.optimizer.max_grad_norm)
        return float(self.adaptive.max_grad_norm)

    def describe(self) -> str:
        """The line ``train`` prints at the start of a DP run."""
        args = self.args
        target = f"for ε = {args.target_epsilon:g}, " if args.target_epsilon is not None else ""
        target = f" ({target}δ = {self.delta:g}, {args.accountant} accountant)"
        thresholds = ",".join(f"{c:g}" for c in args.max_grad_norm)
        return (
            f"DP-SGD: σ = {self.noise_multiplier:.4g}{target}; Poisson sampling q = {self.sample_rate:.4g}, "
            f"{self.steps_per_epoch} steps per epoch, expected batch {self.expected_batch_size}; "
            f"--clipping {args.clipping} ({args.clipping_fn}), C = {thresholds}; "
            f"noise {'from os.urandom (secure mode)' if self.secure else 'seeded'}"
        )

    # -- checkpoint -----------------------------------------------------------------------------

    def state(self, trainees: list[Any]) -> dict[str, Any]:
        """What ``--resume`` needs to continue the same batches, noise and ε."""
        noise = {}
        for name, source in self.noise.items():
            noise[name] = source.state_dict() if isinstance(source, GaussianNoise) else source.get_state()
        return {
            "noise_multiplier": self.noise_multiplier,
            "accountant": dict(self.accountant.state_dict()),
            "sampler": self.sampler.get_state() if self.sampler is not None else None,
            "noise": noise,
            "max_grad_norm": (
                {t.name: self._current_threshold(t) for t in trainees} if self.adaptive is not None else None
            ),
        }

    def load_state(self, state: dict[str, Any], trainees: list[Any]) -> None:
        """Restore what :meth:`state` returned.

        Raises:
            ConfigError: a checkpoint without DP state, or one whose states do not fit.
        """
        try:
            self.accountant.load_state_dict(state["accountant"])
            if self.sampler is not None:
                self.sampler.set_state(state["sampler"])
            for name, source in self.noise.items():
                if isinstance(source, GaussianNoise):
                    source.load_state_dict(state["noise"][name])
                else:
                    source.set_state(state["noise"][name])
            if self.adaptive is not None:
                for trainee in trainees:
                    saved = state["max_grad_norm"][trainee.name]
                    if trainee.name == "autograd":
                        trainee.optimizer.max_grad_norm = saved
                    else:
                        self.adaptive.max_grad_norm = saved
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"--resume: the checkpoint's DP state does not fit this run ({reason})"
            ) from None

    def close(self) -> None:
        """Stop the noise's background threads."""
        for source in self.noise.values():
            if isinstance(source, GaussianNoise):
                source.close()
