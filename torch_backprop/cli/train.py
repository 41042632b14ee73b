"""``torch-backprop train``: train a BackpropMLP (or its native twin) on a dataset.

The command top-down: its options (checked by their argparse types before any work, then by
:func:`validate`), the training loop (:func:`fit`) and :func:`run`, which reports errors as one line.
The run's files (checkpoint, ``--resume``, the lock on ``--out``) are
:mod:`torch_backprop.cli.run_folder`, the data :mod:`torch_backprop.cli.data`.

``--backend manual`` trains :class:`~torch_backprop.BackpropMLP`, whose backward is the slides'
δ recursion (slides 8-10); ``--backend autograd`` trains its native twin
(:meth:`~torch_backprop.BackpropMLP.to_sequential`) from the same initialisation;
``--compare-autograd`` trains both in lockstep on the same batches and reports, each epoch, the
largest parameter difference between them.

Batch order is a function of ``--seed`` and the epoch only (a ``DistributedSampler`` with one or
more replicas), so ``--resume`` continues exactly and ``torchrun --nproc-per-node N`` splits the
same global batches (``--batch-size`` is global) over N processes, with ``DistributedDataParallel``
(gloo on CPU, nccl on CUDA). Only rank 0 prints and writes files.

``--dp`` trains with DP-SGD instead (:mod:`torch_backprop.cli.private`: Poisson batches, the DP step
of either backend, ε per epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..core.activations import available_activations
from ..core.module import BackpropMLP
from ..firstorder.per_sample import per_sample
from . import private, run_folder
from .data import DATASETS, DataError, default_data_root, expected_files, load_dataset
from .options import ConfigError, add_widths, number, select_device

__all__ = [
    "ProcessGroup",
    "Trainee",
    "add_arguments",
    "default_out",
    "fit",
    "learning_rate",
    "run",
    "validate",
]


# ---------------------------------------------------------------------------------------------
# The options.


_COUNT = number(int, low=1)  # epochs, samples, batch size, step size
_NON_NEGATIVE_INT = number(int, low=0)
_NON_NEGATIVE = number(float, low=0)
_POSITIVE = number(float, low=0, low_open=True)
_FRACTION = number(float, low=0, high=1, high_open=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="mnist",
        choices=list(DATASETS),
        help="torchvision dataset; mnist-10k: the MNIST test set shipped with the package (no "
        "download), first 8,000 train, last 2,000 test; fake: torchvision FakeData (default: mnist)",
    )
    data.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"where the data is or goes (default: {default_data_root()}; for mnist-10k, the copy "
        "shipped with the package)",
    )
    data.add_argument(
        "--limit-train", type=_COUNT, default=None, metavar="N", help="use the first N training samples"
    )
    data.add_argument(
        "--limit-test", type=_COUNT, default=None, metavar="N", help="use the first N test samples"
    )
    data.add_argument(
        "--fake-size",
        type=_COUNT,
        default=2048,
        metavar="N",
        help="training samples of --dataset fake (default: 2048)",
    )
    data.add_argument(
        "--workers", type=_NON_NEGATIVE_INT, default=0, help="DataLoader worker processes (default: 0)"
    )

    model = parser.add_argument_group("model")
    add_widths(model, "--hidden", default=[256], help="hidden widths", example="256,128")
    model.add_argument(
        "--activation",
        default="relu",
        choices=available_activations(),
        help="hidden activation (default: relu)",
    )
    model.add_argument(
        "--dropout",
        type=_FRACTION,
        default=0.0,
        help="dropout after each hidden layer, in [0, 1) (default: 0)",
    )
    model.add_argument(
        "--backend",
        choices=["manual", "autograd"],
        default="manual",
        help="manual: BackpropMLP (the slides' backward); autograd: its native twin",
    )
    model.add_argument(
        "--compare-autograd",
        action="store_true",
        help="train both backends in lockstep and report their largest parameter difference",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_COUNT, default=5, help="(default: 5)")
    optim.add_argument("--batch-size", type=_COUNT, default=128, help="global batch size (default: 128)")
    optim.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], default="adam", help="(default: adam)"
    )
    optim.add_argument("--lr", type=_POSITIVE, default=1e-3, help="learning rate (default: 1e-3)")
    optim.add_argument("--momentum", type=_NON_NEGATIVE, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=_NON_NEGATIVE, default=0.0, help="(default: 0)")
    optim.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine", "step"],
        default="constant",
        help="per-epoch schedule: constant, cosine to 0 over --epochs, or step (default: constant)",
    )
    optim.add_argument(
        "--lr-step-size", type=_COUNT, default=10, help="epochs between steps of 'step' (default: 10)"
    )
    optim.add_argument("--lr-gamma", type=_POSITIVE, default=0.1, help="factor of each 'step' (default: 0.1)")
    optim.add_argument(
        "--seed", type=int, default=0, help="initialisation, batch order and dropout (default: 0)"
    )

    runtime = parser.add_argument_group("runtime and output")
    runtime.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when present (default: auto)",
    )
    runtime.add_argument(
        "--amp",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="automatic mixed precision (fp16 uses a gradient scaler) (default: off)",
    )
    runtime.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write metrics.json, model.pt, checkpoint.pt and curves.png here (default: a new folder "
        "runs/DATASET-YYYYmmdd-HHMMSS in the current folder)",
    )
    runtime.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue from DIR/checkpoint.pt (repeat the run's options; --epochs may grow); "
        "--out defaults to DIR",
    )
    private.add_arguments(parser)
    runtime.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds another run's checkpoint, replacing its files",
    )


def validate(args: argparse.Namespace) -> None:
    """Check what argparse's types cannot check alone, before anything is loaded or written.

    ``--resume DIR`` without ``--out`` writes into ``DIR``; a new run without ``--out`` into
    :func:`default_out`.

    Raises:
        ConfigError: an unusable ``--out`` or ``--resume`` folder; ``--dp`` options that cannot be
            honoured (:func:`torch_backprop.cli.private.validate`).
    """
    if args.resume is not None:
        if not args.resume.is_dir():
            raise ConfigError(f"--resume expected the folder of a run, got {args.resume} (not a folder)")
        if args.out is None:
            args.out = args.resume
    if args.out is None:
        args.out = default_out(args.dataset)
    run_folder.check_out(args.out)
    private.validate(args)


def default_out(dataset: str, now: float | None = None) -> Path:
    """``runs/DATASET-YYYYmmdd-HHMMSS`` in the current folder, the run folder of a run without ``--out``.

    A suffix (``-2``, ``-3``, ...) keeps it new when a run of the same second has taken the name.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    out = Path("runs") / f"{dataset}-{stamp}"
    count = 1
    while out.exists():
        count += 1
        out = Path("runs") / f"{dataset}-{stamp}-{count}"
    return out


# ---------------------------------------------------------------------------------------------
# The training loop.


class ProcessGroup:
    """Process-group facts: rank, world size, device; rank 0 alone prints and writes."""

    def __init__(self, device_choice: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            self.device = select_device(device_choice, index=self.local_rank)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        use_cuda = self.device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        if self.distributed:
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *parts: Any) -> None:
        if self.main:
            print(*parts, flush=True)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _load_data(args: argparse.Namespace, group: ProcessGroup) -> tuple[TensorDataset, TensorDataset, Any]:
    def load() -> tuple[TensorDataset, TensorDataset, Any]:
        if group.main and args.dataset not in ("fake", "mnist-10k"):
            root = args.data_root if args.data_root is not None else default_data_root()
            missing = [f for f in expected_files(args.dataset, root) if not f.exists()]
            if missing:
                print(
                    f"{args.dataset}: {len(missing)} file(s) missing under {root}; downloading",
                    file=sys.stderr,
                    flush=True,
                )
        return load_dataset(
            args.dataset,
            args.data_root,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            fake_size=args.fake_size,
            seed=args.seed,
        )

    # Rank 0 downloads; the others wait and then read what it wrote.
    if group.main:
        loaded = load()
    group.barrier()
    if not group.main:
        loaded = load()
    return loaded


def _make_optimizer(args: argparse.Namespace, parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)


def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``: a function of the options and the epoch alone.

    Nothing about the schedule is carried in the checkpoint, so ``--resume`` with a grown
    ``--epochs`` continues a cosine schedule over the new horizon from the epoch reached, exactly
    as an uninterrupted run of that many epochs goes on from there.
    """
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(epoch, args.epochs) / args.epochs))
    if args.lr_schedule == "step":
        return args.lr * args.lr_gamma ** (epoch // args.lr_step_size)
    return args.lr


class Trainee:
    """One backend's model with its optimiser and gradient scaler."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, group: ProcessGroup) -> None:
        self.name = name
        self.model = model
        self.optimizer = _make_optimizer(args, model.parameters())
        self.scaler = torch.amp.GradScaler(group.device.type, enabled=args.amp == "fp16")
        self.wrapped: nn.Module = model
        if group.distributed and not args.dp:  # DP: dp_sgd_step sums the clipped gradients itself
            device_ids = [group.device.index] if group.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def state(self) -> dict[str, Any]:
        """Model, optimiser and scaler state, for the checkpoint."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (a ``"schedule"`` entry of older checkpoints is unused)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate of every parameter group (the schedule, at the start of an epoch)."""
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr

    def mlp_state_dict(self) -> dict[str, Tensor]:
        """The parameters in BackpropMLP's layout, whichever backend trained them."""
        if isinstance(self.model, BackpropMLP):
            return self.model.state_dict()
        return BackpropMLP.from_sequential(self.model).state_dict()


def _build_trainees(args: argparse.Namespace, sizes: list[int], group: ProcessGroup) -> list[Trainee]:
    torch.manual_seed(args.seed)
    manual = BackpropMLP(sizes, activation=args.activation, dropout=args.dropout, device=group.device)
    if args.compare_autograd:
        backends = {"manual": manual, "autograd": manual.to_sequential()}
        if args.dropout:
            group.print(
                "note: with --dropout the two backends draw different dropout masks, so they "
                "diverge by design; compare with --dropout 0"
            )
    elif args.backend == "manual":
        backends = {"manual": manual}
    else:
        backends = {"autograd": manual.to_sequential()}
    return [Trainee(name, model, args, group) for name, model in backends.items()]


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if args.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


@torch.no_grad()
def _evaluate(
    trainee: Trainee, test: TensorDataset, args: argparse.Namespace, group: ProcessGroup
) -> tuple[float, float]:
    """(mean test loss, test accuracy) over the whole test set, sharded over the processes."""
    model = trainee.model.eval()
    features, labels = test.tensors
    shard = range(group.rank, len(labels), group.world_size)
    loss_sum, correct = 0.0, 0.0
    for start in range(0, len(shard), 1024):
        index = torch.tensor(shard[start : start + 1024])
        x, y = features[index].to(group.device), labels[index].to(group.device)
        with _autocast(args, group.device):
            output = model(x).float()
        loss_sum += F.cross_entropy(output, y, reduction="sum").item()
        correct += (output.argmax(1) == y).sum().item()
    loss_sum, correct = group.all_sum([loss_sum, correct])
    count = max(len(labels), 1)
    return loss_sum / count, correct / count


def _progress(loader: DataLoader, description: str, group: ProcessGroup) -> Any:
    from tqdm.auto import tqdm

    quiet = not (group.main and sys.stderr.isatty())
    return tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet, dynamic_ncols=True)


def _train_epoch(
    trainees: list[Trainee],
    loader: Any,
    epoch: int,
    args: argparse.Namespace,
    group: ProcessGroup,
    dp: private.PrivateTraining | None = None,
) -> tuple[list[float], float]:
    """One pass over ``loader`` (``dp``: its Poisson batches) per trainee: (summed losses, samples)."""
    for trainee in trainees:
        trainee.model.train()
        trainee.set_learning_rate(learning_rate(args, epoch))
    started = time.perf_counter()
    sums = {t.name: torch.zeros((), dtype=torch.float64, device=group.device) for t in trainees}
    seen = 0
    bar = _progress(loader, f"epoch {epoch + 1}/{args.epochs}", group)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(group.device, non_blocking=True), y.to(group.device, non_blocking=True)
        for trainee in trainees:
            if dp is not None:
                sums[trainee.name] += _dp_step(trainee, x, y, dp)
                continue
            trainee.optimizer.zero_grad(set_to_none=True)
            with _autocast(args, group.device):
                output = trainee.wrapped(x)
            loss = F.cross_entropy(output.float(), y)
            trainee.scaler.scale(loss).backward()
            trainee.scaler.step(trainee.optimizer)
            trainee.scaler.update()
            sums[trainee.name] += loss.detach() * len(y)  # no .item(): no device sync per step
        seen += len(y)
        if not bar.disable and step % 10 == 0:
            rate = seen * group.world_size / (time.perf_counter() - started)
            running = sums[trainees[0].name].item() / max(seen, 1)
            bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{rate:.0f}")
    bar.close()
    totals = group.all_sum([*(s.item() for s in sums.values()), float(seen)])
    return totals[:-1], totals[-1]


def _dp_step(trainee: Trainee, x: Tensor, y: Tensor, dp: private.PrivateTraining) -> Tensor:
    """One DP-SGD step: clipping inside the one backward, then the noise (the twin: through Opacus)."""
    if trainee.name == "autograd":
        return dp.opacus_step(trainee, x, y)
    trainee.optimizer.zero_grad(set_to_none=True)
    with per_sample(trainee.model, loss_reduction="sum", **dp.clipping()):
        loss = F.cross_entropy(trainee.model(x), y, reduction="sum")
        loss.backward()
    dp.noise_and_step(trainee)
    return loss.detach()


def _epoch_row(
    trainees: list[Trainee],
    sums: list[float],
    samples: float,
    seconds: float,
    epoch: int,
    test_set: TensorDataset,
    args: argparse.Namespace,
    group: ProcessGroup,
) -> dict[str, Any]:
    """Evaluate each trainee and print its line; the epoch's row of metrics.json."""
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "seconds": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else None,
        "lr": trainees[0].optimizer.param_groups[0]["lr"],
    }
    for trainee, total in zip(trainees, sums, strict=True):
        test_loss, accuracy = _evaluate(trainee, test_set, args, group)
        row[trainee.name] = {"train_loss": total / samples, "test_loss": test_loss, "test_accuracy": accuracy}
        prefix = f"[{trainee.name}] " if len(trainees) > 1 else ""
        group.print(
            f"epoch {epoch + 1}/{args.epochs}  {prefix}train loss {total / samples:.4f}  "
            f"test loss {test_loss:.4f}  test acc {100 * accuracy:.2f}%  {seconds:.1f} s"
        )
    if len(trainees) == 2:
        row["max_param_difference"] = _max_difference(trainees[0].model, trainees[1].model)
        group.print(
            f"epoch {epoch + 1}/{args.epochs}  max |parameter difference| manual vs autograd: "
            f"{row['max_param_difference']:.3e}"
        )
    return row


def fit(args: argparse.Namespace) -> None:
    """Train as the parsed ``train`` options say; write the run's files to ``args.out`` on rank 0.

    Raises:
        ConfigError: options that do not fit together, the process count, the checkpoint or ``--out``.
        DataError: the dataset could not be loaded.
    """
    group = ProcessGroup(args.device)
    if args.batch_size % group.world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} (global) must be divisible by the number of "
            f"processes, {group.world_size}"
        )
    out = args.out if group.main else None
    with run_folder.RunFolder(out, resume=args.resume, overwrite=args.overwrite):
        saved = run_folder.load_checkpoint(args.resume, args) if args.resume is not None else None
        if saved is not None:
            private.check_resume(args, saved)
        if saved is not None and out is not None:
            # model.pt and metrics.json may lag the checkpoint by an epoch after a kill
            run_folder.rewrite_outputs(out, saved, with_checkpoint=out.resolve() != args.resume.resolve())
        if saved is not None and saved["epoch"] >= args.epochs:
            if out is not None:  # a kill may have cut the last run short while it drew the curves
                run_folder.write_curves(out, saved["history"], list(saved["trainees"]))
            group.print(
                f"nothing to train: {args.resume / run_folder.CHECKPOINT} has {saved['epoch']} epoch(s) "
                f"done and --epochs is {args.epochs}; pass --epochs {saved['epoch'] + 1} or more to continue"
            )
            return
        _fit(args, group, saved)
    # Every rank reaches this point before any tears the process group down: a rank that
    # destroys it while a peer is still writing can make gloo abort at exit.
    group.barrier()


def _fit(args: argparse.Namespace, group: ProcessGroup, saved: dict[str, Any] | None) -> None:
    train_set, test_set, info = _load_data(args, group)
    if len(train_set) == 0 or len(test_set) == 0:
        raise ConfigError(
            f"{args.dataset}: empty training or test set ({len(train_set)} and {len(test_set)} "
            "samples); check --limit-train / --limit-test"
        )
    sizes = [info.in_features, *args.hidden, info.num_classes]
    trainees = _build_trainees(args, sizes, group)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    dp = private.PrivateTraining(args, trainees, group) if args.dp else None
    if saved is not None:
        history, start_epoch = run_folder.restore(saved, trainees, group.device)
        if dp is not None:
            dp.load_state(saved.get("dp", {}), trainees)
        group.print(f"resumed from {args.resume} after epoch {start_epoch}")

    sampler = DistributedSampler(
        train_set, num_replicas=group.world_size, rank=group.rank, shuffle=True, seed=args.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size // group.world_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=group.device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    config = run_folder.run_config(args, sizes, world_size=group.world_size, device=group.device)
    writes = args.out is not None and group.main
    group.print(
        f"{args.dataset}: {len(train_set)} train / {len(test_set)} test samples; MLP {sizes}, "
        f"{args.activation}; {', '.join(t.name for t in trainees)} backward; {group.world_size} "
        f"process(es) on {group.device}"
    )
    if dp is not None:
        group.print(dp.describe())

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        batches = dp.batches(train_set) if dp is not None else loader
        sums, samples = _train_epoch(trainees, batches, epoch, args, group, dp)
        seconds = time.perf_counter() - started
        history.append(_epoch_row(trainees, sums, samples, seconds, epoch, test_set, args, group))
        extra = dp.end_epoch(history[-1], trainees, group.print) if dp is not None else None
        if writes:
            more = {"extra": extra} if extra is not None else {}  # the DP state, for --resume
            run_folder.write_epoch(args.out, trainees, history, config, epoch + 1, group.device, **more)

    if writes:
        group.print(run_folder.write_curves(args.out, history, [t.name for t in trainees]))


# ---------------------------------------------------------------------------------------------
# The command.


class _Terminated(BaseException):
    """SIGTERM, raised where the run is, so that its files and its lock are left in order."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` command; returns the exit status."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        chosen = args.out is not None or args.resume is not None
        validate(args)
        if not chosen and int(os.environ.get("RANK", "0")) == 0:
            print(f"no --out given: the run's files go to {args.out}", flush=True)
        fit(args)
    except (DataError, ConfigError) as error:
        print(f"torch-backprop train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torch-backprop train: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("torch-backprop train: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
