"""What ``torch-backprop bench`` shows: its report as a markdown table and as a bar chart of the ratios.

The report is :func:`torch_backprop.cli.bench.run_benchmark`'s, and everything shown is read from it
(the contenders and ratios in the report's own order): measured times, ratios and saved bytes only.
A project's own thresholds are no part of the report: a script that reads the JSON checks them
(``benchmarks/check_threshold.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any

from .files import write_figure

__all__ = ["format_table", "impossible_ratios", "plot_ratios", "table_columns"]


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3g}"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.3f}"


def _bytes(count: int | None) -> str:
    if count is None:
        return "–"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


_SAVED = ("manual", "native", "recompute")  # the contenders whose saved bytes are counted
_PEAK = ("manual", "native", "compiled")  # and whose peak CUDA memory is, where measured


def _contenders(report: dict[str, Any]) -> list[str]:
    return list(report["cases"][0]["median_s"]) if report["cases"] else []


def _ratios(report: dict[str, Any]) -> list[str]:
    return list(report["summary"]["median_ratios"])


def table_columns(report: dict[str, Any]) -> list[str]:
    """The table's header: the case, each contender's time, each ratio, saved bytes (peaks on CUDA)."""
    cuda = any(c["peak_bytes"] for c in report["cases"])
    columns = ["case", *(f"{name} ms" for name in _contenders(report)), *_ratios(report)]
    columns += [f"saved {name}" for name in _SAVED]
    return columns + ([f"peak {name}" for name in _PEAK] if cuda else [])


def format_table(report: dict[str, Any]) -> str:
    """The report as markdown: one row per case, then the grid's median of each ratio.

    Times are medians in milliseconds; "saved" is bytes saved for backward, activations only
    (parameters, saved alike by every contender, excluded); peak CUDA memory follows when measured.
    """
    columns = table_columns(report)
    cuda = columns[-1].startswith("peak")
    contenders, ratios = _contenders(report), _ratios(report)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for c in report["cases"]:
        t, saved = c["median_s"], c["saved_activation_bytes"]
        row = [c["name"], *(_ms(t[name]) for name in contenders)]
        row += [_x(c["ratios"][key]) for key in ratios]
        row += [_bytes(saved[name]) for name in _SAVED]
        if cuda:
            peak = c["peak_bytes"] or {}
            row += [_bytes(peak.get(name)) for name in _PEAK]
        lines.append("| " + " | ".join(row) + " |")
    if report["cases"]:
        medians = report["summary"]["median_ratios"]
        row = ["**median**", *[""] * len(contenders), *(_x(medians[key]) for key in ratios)]
        row += [""] * (len(columns) - len(row))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def impossible_ratios(report: dict[str, Any]) -> list[str]:
    """A warning per case whose floor/manual ratio exceeds 1, which no quiet measurement can give.

    The floor (the step's matrix multiplies alone) is part of the manual step, so it cannot take
    longer: a ratio above 1 means the machine was busy during the rounds, and the case's other
    ratios are suspect too.
    """
    return [
        f"warning: {c['name']}: floor/manual {c['ratios']['floor/manual']:.3f} > 1, impossible as the "
        "floor is part of the step: the machine was busy while measuring; re-run on an idle machine "
        "or with more --rounds"
        for c in report["cases"]
        if (c["ratios"].get("floor/manual") or 0) > 1
    ]


def plot_ratios(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Bar chart of the ratios per case (1.0 marked), saved atomically as an image.

    Raises:
        ImportError: matplotlib is not installed (``pip install torch-backprop[plot]``).
    """
    from matplotlib.figure import Figure

    cases = report["cases"]
    keys = [key for key in _ratios(report) if any(c["ratios"][key] is not None for c in cases)]
    width = 0.8 / max(len(keys), 1)
    figure = Figure(figsize=(max(8.0, 0.55 * len(cases) + 2), 4.8))
    axes = figure.subplots()
    for i, key in enumerate(keys):
        heights = [c["ratios"][key] if c["ratios"][key] is not None else math.nan for c in cases]
        positions = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(cases))]
        axes.bar(positions, heights, width, label=key)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")  # ratios: 0.5x and 2x sit equally far from 1, and outliers stay on the chart
    axes.set_xticks(range(len(cases)))
    axes.set_xticklabels(
        [c["name"].replace(" float32", "") for c in cases], rotation=60, ha="right", fontsize=8
    )
    axes.set_ylabel("step-time ratio (log scale)")
    machine = report["machine"]
    axes.set_title(
        f"torch_backprop step-time ratios ({machine['device']}, {machine['threads']} threads, "
        f"torch {machine['torch']})",
        fontsize=10,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    write_figure(figure, path, dpi=120)
