"""The ``train`` command: train a BackpropMLP (or its native twin) on a torchvision dataset.

``--backend manual`` trains :class:`~torch_backprop.BackpropMLP`, whose backward is the slides'
δ recursion (slides 8-10); ``--backend autograd`` trains its native twin
(:meth:`~torch_backprop.BackpropMLP.to_sequential`) from the same initialisation;
``--compare-autograd`` trains both in lockstep on the same batches and reports, each epoch, the
largest parameter difference between them.

Batch order is a function of ``--seed`` and the epoch only (a ``DistributedSampler`` with one or
more replicas), so ``--resume`` continues exactly and ``torchrun --nproc-per-node N`` splits the
same global batches (``--batch-size`` is global) over N processes, with ``DistributedDataParallel``
(gloo on CPU, nccl on CUDA). Only rank 0 prints and writes files; every file is written to a
temporary name in the same directory and then renamed over the old one, so a crash never leaves a
half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .activations import available_activations
from .cli import positive_ints
from .data import DATASETS, DataError, default_data_root, expected_files, load_dataset
from .module import BackpropMLP

__all__ = ["add_arguments", "atomic_write", "run"]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.json"
CURVES = "curves.png"

# Options that must agree between a run and its --resume (the rest, e.g. --epochs, may change).
_RESUME_KEYS = (
    "dataset", "hidden", "activation", "dropout", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "lr_schedule", "lr_step_size", "lr_gamma", "seed", "amp", "backend",
    "compare_autograd", "limit_train", "limit_test", "fake_size",
)  # fmt: skip


class ConfigError(ValueError):
    """An inconsistent set of options (reported as one line, without a traceback)."""


def _int_list(text: str) -> list[int]:
    return positive_ints(text, what="widths", example="256,128")


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
        "--limit-train", type=int, default=None, metavar="N", help="use the first N training samples"
    )
    data.add_argument(
        "--limit-test", type=int, default=None, metavar="N", help="use the first N test samples"
    )
    data.add_argument(
        "--fake-size",
        type=int,
        default=2048,
        metavar="N",
        help="training samples of --dataset fake (default: 2048)",
    )
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--hidden", type=_int_list, default=[256], metavar="W1,W2,...", help="hidden widths (default: 256)"
    )
    model.add_argument(
        "--activation",
        default="relu",
        choices=available_activations(),
        help="hidden activation (default: relu)",
    )
    model.add_argument(
        "--dropout", type=float, default=0.0, help="dropout after each hidden layer (default: 0)"
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
    optim.add_argument("--epochs", type=int, default=5, help="(default: 5)")
    optim.add_argument("--batch-size", type=int, default=128, help="global batch size (default: 128)")
    optim.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], default="adam", help="(default: adam)"
    )
    optim.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    optim.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine", "step"],
        default="constant",
        help="per-epoch schedule: constant, cosine to 0 over --epochs, or step (default: constant)",
    )
    optim.add_argument(
        "--lr-step-size", type=int, default=10, help="epochs between steps of 'step' (default: 10)"
    )
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="factor of each 'step' (default: 0.1)")
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
        help="write metrics.json, model.pt, checkpoint.pt and curves.png here",
    )
    runtime.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue from DIR/checkpoint.pt (repeat the run's options; --epochs may grow)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` command; returns the exit status."""
    try:
        _train(args)
    except (DataError, ConfigError) as error:
        print(f"torch-backprop train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torch-backprop train: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# Files.


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file in the same directory, then rename.

    ``os.replace`` is atomic on POSIX and Windows, so readers see the old file or the new one,
    never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def _save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(obj, indent=2) + "\n").encode()))


def _save_curves(history: list[dict[str, Any]], backends: list[str], path: Path) -> bool:
    """Loss and accuracy against epoch; ``False`` when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for backend, style in zip(backends, ("-", "--")[: len(backends)], strict=True):
        label = f"{backend} backward" if len(backends) > 1 else None
        rows = [row[backend] for row in history]
        for split, color in (("train", "C0"), ("test", "C1")):
            loss_axes.plot(
                epochs,
                [r[f"{split}_loss"] for r in rows],
                style,
                color=color,
                label=f"{split} ({backend})" if label else split,
            )
        accuracy_axes.plot(
            epochs, [100 * r["test_accuracy"] for r in rows], style, marker="o", markersize=3, label=label
        )
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss_axes.legend()
    if len(backends) > 1:
        accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
    return True


# ---------------------------------------------------------------------------------------------
# Set-up.


class _Context:
    """Process-group facts: rank, world size, device; rank 0 alone prints and writes."""

    def __init__(self, device_choice: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_choice == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but CUDA is not available here")
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
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


def _load_data(args: argparse.Namespace, context: _Context) -> tuple[TensorDataset, TensorDataset, Any]:
    def load() -> tuple[TensorDataset, TensorDataset, Any]:
        if context.main and args.dataset not in ("fake", "mnist-10k"):
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
    if context.main:
        loaded = load()
    context.barrier()
    if not context.main:
        loaded = load()
    return loaded


def _make_optimizer(args: argparse.Namespace, parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)


def _make_schedule(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    epochs = args.epochs

    def factor(epoch: int) -> float:
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
        if args.lr_schedule == "step":
            return args.lr_gamma ** (epoch // args.lr_step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Trainee:
    """One backend's model with its optimiser, schedule and gradient scaler."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, context: _Context) -> None:
        self.name = name
        self.model = model
        self.optimizer = _make_optimizer(args, model.parameters())
        self.schedule = _make_schedule(args, self.optimizer)
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=args.amp == "fp16")
        self.wrapped: nn.Module = model
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])

    def mlp_state_dict(self) -> dict[str, Tensor]:
        """The parameters in BackpropMLP's layout, whichever backend trained them."""
        if isinstance(self.model, BackpropMLP):
            return self.model.state_dict()
        return BackpropMLP.from_sequential(self.model).state_dict()


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if args.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


@torch.no_grad()
def _evaluate(
    trainee: _Trainee, test: TensorDataset, args: argparse.Namespace, context: _Context
) -> tuple[float, float]:
    """(mean test loss, test accuracy) over the whole test set, sharded over the processes."""
    model = trainee.model.eval()
    features, labels = test.tensors
    shard = range(context.rank, len(labels), context.world_size)
    loss_sum, correct = 0.0, 0.0
    for start in range(0, len(shard), 1024):
        index = torch.tensor(shard[start : start + 1024])
        x, y = features[index].to(context.device), labels[index].to(context.device)
        with _autocast(args, context.device):
            output = model(x).float()
        loss_sum += F.cross_entropy(output, y, reduction="sum").item()
        correct += (output.argmax(1) == y).sum().item()
    loss_sum, correct = context.all_sum([loss_sum, correct])
    count = max(len(labels), 1)
    return loss_sum / count, correct / count


def _progress(loader: DataLoader, description: str, context: _Context) -> Any:
    from tqdm.auto import tqdm

    quiet = not (context.main and sys.stderr.isatty())
    return tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# The run.


def _config(args: argparse.Namespace, context: _Context, sizes: list[int]) -> dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config.update(
        sizes=sizes,
        world_size=context.world_size,
        device_used=str(context.device),
        torch_version=str(torch.__version__),
        python_version=platform.python_version(),
    )
    return config


def _check_resume(saved: dict[str, Any], args: argparse.Namespace) -> None:
    differ = [
        f"--{key.replace('_', '-')} {saved.get(key)!r} -> {getattr(args, key)!r}"
        for key in _RESUME_KEYS
        if saved.get(key) != getattr(args, key)
    ]
    if differ:
        raise ConfigError(
            "--resume expects the options of the run it continues; these differ: " + "; ".join(differ)
        )


def _train(args: argparse.Namespace) -> None:
    if args.batch_size <= 0 or args.epochs < 0:
        raise ConfigError(
            f"--batch-size must be positive and --epochs non-negative, got "
            f"{args.batch_size} and {args.epochs}"
        )
    context = _Context(args.device)
    if args.batch_size % context.world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} (global) must be divisible by the number of "
            f"processes, {context.world_size}"
        )
    checkpoint = None
    if args.resume is not None:
        path = args.resume / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"--resume {args.resume}: no {CHECKPOINT} there")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        _check_resume(checkpoint["config"], args)
        if args.out is None:
            args.out = args.resume

    train_set, test_set, info = _load_data(args, context)
    if len(train_set) == 0 or len(test_set) == 0:
        raise ConfigError(
            f"{args.dataset}: empty training or test set ({len(train_set)} and {len(test_set)} "
            "samples); check --limit-train / --limit-test"
        )
    sizes = [info.in_features, *args.hidden, info.num_classes]

    torch.manual_seed(args.seed)
    manual = BackpropMLP(sizes, activation=args.activation, dropout=args.dropout, device=context.device)
    if args.compare_autograd:
        backends = {"manual": manual, "autograd": manual.to_sequential()}
        if args.dropout:
            context.print(
                "note: with --dropout the two backends draw different dropout masks, so they "
                "diverge by design; compare with --dropout 0"
            )
    elif args.backend == "manual":
        backends = {"manual": manual}
    else:
        backends = {"autograd": manual.to_sequential()}
    trainees = [_Trainee(name, model, args, context) for name, model in backends.items()]

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None:
        for trainee in trainees:
            trainee.load_state(checkpoint["trainees"][trainee.name])
        history = checkpoint["history"]
        start_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if context.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], context.device)
        context.print(f"resumed from {args.resume} after epoch {start_epoch}")

    sampler = DistributedSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=args.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size // context.world_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=context.device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    config = _config(args, context, sizes)
    if args.out is not None and context.main:
        args.out.mkdir(parents=True, exist_ok=True)
    context.print(
        f"{args.dataset}: {len(train_set)} train / {len(test_set)} test samples; MLP {sizes}, "
        f"{args.activation}; {', '.join(backends)} backward; {context.world_size} process(es) on "
        f"{context.device}"
    )

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        for trainee in trainees:
            trainee.model.train()
        started = time.perf_counter()
        sums = {t.name: torch.zeros((), dtype=torch.float64, device=context.device) for t in trainees}
        seen = 0
        bar = _progress(loader, f"epoch {epoch + 1}/{args.epochs}", context)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(context.device, non_blocking=True), y.to(context.device, non_blocking=True)
            for trainee in trainees:
                trainee.optimizer.zero_grad(set_to_none=True)
                with _autocast(args, context.device):
                    output = trainee.wrapped(x)
                loss = F.cross_entropy(output.float(), y)
                trainee.scaler.scale(loss).backward()
                trainee.scaler.step(trainee.optimizer)
                trainee.scaler.update()
                sums[trainee.name] += loss.detach() * len(y)  # no .item(): no device sync per step
            seen += len(y)
            if not bar.disable and step % 10 == 0:
                rate = seen * context.world_size / (time.perf_counter() - started)
                running = sums[trainees[0].name].item() / seen
                bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{rate:.0f}")
        bar.close()
        totals = context.all_sum([*(s.item() for s in sums.values()), float(seen)])
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "seconds": seconds,
            "samples_per_second": totals[-1] / seconds if seconds > 0 else None,
            "lr": trainees[0].optimizer.param_groups[0]["lr"],
        }
        for trainee, total in zip(trainees, totals[:-1], strict=True):
            test_loss, accuracy = _evaluate(trainee, test_set, args, context)
            row[trainee.name] = {
                "train_loss": total / totals[-1],
                "test_loss": test_loss,
                "test_accuracy": accuracy,
            }
            trainee.schedule.step()
            prefix = f"[{trainee.name}] " if len(trainees) > 1 else ""
            context.print(
                f"epoch {epoch + 1}/{args.epochs}  {prefix}train loss {total / totals[-1]:.4f}  "
                f"test loss {test_loss:.4f}  test acc {100 * accuracy:.2f}%  {seconds:.1f} s"
            )
        if len(trainees) == 2:
            row["max_param_difference"] = _max_difference(trainees[0].model, trainees[1].model)
            context.print(
                f"epoch {epoch + 1}/{args.epochs}  max |parameter difference| manual vs autograd: "
                f"{row['max_param_difference']:.3e}"
            )
        history.append(row)
        if args.out is not None and context.main:
            _write_epoch(args.out, trainees, history, config, epoch + 1, context)

    if args.out is not None and context.main and history:
        if _save_curves(history, [t.name for t in trainees], args.out / CURVES):
            context.print(
                f"wrote {args.out / METRICS}, {args.out / MODEL}, {args.out / CHECKPOINT}, "
                f"{args.out / CURVES}"
            )
        else:
            context.print(
                "matplotlib is not installed: skipped curves.png (pip install 'torch-backprop[plot]')"
            )
    # Every rank reaches this point before any tears the process group down: a rank that
    # destroys it while a peer is still writing can make gloo abort at exit.
    context.barrier()


def _write_epoch(
    out: Path,
    trainees: list[_Trainee],
    history: list[dict[str, Any]],
    config: dict[str, Any],
    epoch: int,
    context: _Context,
) -> None:
    """checkpoint.pt, then model.pt and metrics.json, each atomically."""
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(context.device) if context.device.type == "cuda" else None,
    }
    _save_torch(
        {
            "epoch": epoch,
            "config": config,
            "history": history,
            "rng": rng,
            "trainees": {t.name: t.state() for t in trainees},
        },
        out / CHECKPOINT,
    )
    _save_torch(trainees[0].mlp_state_dict(), out / MODEL)
    _save_json({"config": config, "epochs": history}, out / METRICS)
