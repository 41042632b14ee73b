"""How the benchmarks take their times: interleaved, rotated rounds of ``torch.utils.benchmark`` timers.

Shared machines are noisy, so every benchmark here measures its contenders in rounds: each round
measures every contender once, ``Timer.blocked_autorange`` (which synchronises CUDA) per
measurement, starting one contender later than the previous round, so that drift in the machine's
speed spreads over all of them; a contender reports the median of its rounds. :func:`machine_info`
records where the times were taken.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils import benchmark

__all__ = [
    "TIMERS",
    "interleaved_medians",
    "machine_info",
    "make_timer",
    "measure_round",
    "rotated",
    "threads",
]

T = TypeVar("T")

# "wall": wall time (synchronises CUDA); "cpu": the process's CPU time over all its threads, which
# other processes on a shared CPU machine stretch far less than wall time (CPU devices only).
TIMERS: dict[str, Callable[[], float]] = {"wall": benchmark.utils.timer.timer, "cpu": time.process_time}


def make_timer(
    step: Callable[[], Any], *, threads: int, timer: str = "wall", label: str = "", description: str = ""
) -> benchmark.Timer:
    """A ``torch.utils.benchmark.Timer`` of ``step()`` with ``threads`` intra-op threads."""
    return benchmark.Timer(
        stmt="step()",
        globals={"step": step},
        timer=TIMERS[timer],
        num_threads=threads,
        label=label,
        description=description,
    )


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting ``round_index`` places further along (wrapping): round r's order."""
    shift = round_index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def measure_round(
    timers: dict[str, benchmark.Timer], round_index: int, min_run_time: float, into: dict[str, list[float]]
) -> None:
    """One ``blocked_autorange`` median per timer, in round ``round_index``'s order, appended to ``into``."""
    for name in rotated(list(timers), round_index):
        into[name].append(timers[name].blocked_autorange(min_run_time=min_run_time).median)


def interleaved_medians(
    steps: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    min_run_time: float,
    threads: int,
    label: str = "",
    timer: str = "wall",
) -> dict[str, dict[str, Any]]:
    """Median step time of each contender, measured interleaved over ``rounds`` rounds.

    Args:
        steps: name -> a callable running one step.
        rounds: number of rounds.
        min_run_time: seconds per measurement.
        threads: intra-op threads during the measurements.
        label: the Timer's label (shown in its repr only).
        timer: a key of :data:`TIMERS`.

    Returns:
        name -> ``{"median_s": median of the round medians, "rounds_s": [round medians]}``.
    """
    timers = {
        name: make_timer(step, threads=threads, timer=timer, label=label, description=name)
        for name, step in steps.items()
    }
    per_round: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(rounds):
        measure_round(timers, r, min_run_time, per_round)
    return {name: {"median_s": statistics.median(t), "rounds_s": t} for name, t in per_round.items()}


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _source_revision() -> str | None:
    """The git commit of a source checkout of the package, "+dirty" when its files differ; else None.

    Only a checkout counts (a ``.git`` beside the package): an installed copy inside some other
    repository (a virtual environment in a user's project) must not report that repository's commit.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "torch_backprop"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """Where the numbers come from: CPU, threads, accelerator, torch and Python versions, date, load."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "threads": threads,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    info["source"] = _source_revision()
    with contextlib.suppress(OSError, AttributeError):
        # Other processes compete for the cores: a load well above 0 at the start means noisy numbers.
        info["load_average"] = list(os.getloadavg())
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
