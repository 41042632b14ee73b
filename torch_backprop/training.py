"""The training loop behind ``torch-backprop train``: a BackpropMLP (or its native twin) on a dataset.

``--backend manual`` trains :class:`~torch_backprop.BackpropMLP`, whose backward is the slides'
δ recursion (slides 8-10); ``--backend autograd`` trains its native twin
(:meth:`~torch_backprop.BackpropMLP.to_sequential`) from the same initialisation;
``--compare-autograd`` trains both in lockstep on the same batches and reports, each epoch, the
largest parameter difference between them.

Batch order is a function of ``--seed`` and the epoch only (a ``DistributedSampler`` with one or
more replicas), so ``--resume`` continues exactly and ``torchrun --nproc-per-node N`` splits the
same global batches (``--batch-size`` is global) over N processes, with ``DistributedDataParallel``
(gloo on CPU, nccl on CUDA). Only rank 0 prints and writes files (:mod:`torch_backprop.checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from . import checkpoint
from .cli import ConfigError
from .data import default_data_root, expected_files, load_dataset
from .devices import select_device
from .module import BackpropMLP

__all__ = ["ProcessGroup", "Trainee", "fit", "learning_rate"]


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
        if group.distributed:
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
    trainees: list[Trainee], loader: DataLoader, epoch: int, args: argparse.Namespace, group: ProcessGroup
) -> tuple[list[float], float]:
    """One pass over ``loader`` for every trainee: (summed train loss per trainee, samples), all ranks."""
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
            running = sums[trainees[0].name].item() / seen
            bar.set_postfix(loss=f"{running:.4f}", samples_per_s=f"{rate:.0f}")
    bar.close()
    totals = group.all_sum([*(s.item() for s in sums.values()), float(seen)])
    return totals[:-1], totals[-1]


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
    with checkpoint.RunFolder(out, resume=args.resume, overwrite=args.overwrite):
        saved = checkpoint.load_checkpoint(args.resume, args) if args.resume is not None else None
        if saved is not None and out is not None:
            # model.pt and metrics.json may lag the checkpoint by an epoch after a kill
            checkpoint.rewrite_outputs(out, saved, with_checkpoint=out.resolve() != args.resume.resolve())
        if saved is not None and saved["epoch"] >= args.epochs:
            if out is not None:  # a kill may have cut the last run short while it drew the curves
                checkpoint.write_curves(out, saved["history"], list(saved["trainees"]))
            group.print(
                f"nothing to train: {args.resume / checkpoint.CHECKPOINT} has {saved['epoch']} epoch(s) "
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
    if saved is not None:
        history, start_epoch = checkpoint.restore(saved, trainees, group.device)
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
    config = checkpoint.run_config(args, sizes, world_size=group.world_size, device=group.device)
    writes = args.out is not None and group.main
    group.print(
        f"{args.dataset}: {len(train_set)} train / {len(test_set)} test samples; MLP {sizes}, "
        f"{args.activation}; {', '.join(t.name for t in trainees)} backward; {group.world_size} "
        f"process(es) on {group.device}"
    )

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        sums, samples = _train_epoch(trainees, loader, epoch, args, group)
        seconds = time.perf_counter() - started
        history.append(_epoch_row(trainees, sums, samples, seconds, epoch, test_set, args, group))
        if writes:
            checkpoint.write_epoch(args.out, trainees, history, config, epoch + 1, group.device)

    if writes:
        group.print(checkpoint.write_curves(args.out, history, [t.name for t in trainees]))
