"""Check a ``torch-backprop bench --json`` report against this project's performance targets.

The bench command reports times and ratios; whether they are good enough is the project's question,
answered here (as Opacus's ``benchmarks/check_threshold.py`` answers it for its own benchmarks).
Prints one row per target (measured value, bound, met) and exits 1 when any measured target is
missed, 0 otherwise; a target whose value the report lacks (e.g. no compiled contender, no
[1024]*4 case) is shown as not measured and does not fail.

Usage::

    torch-backprop bench --json bench.json && python benchmarks/check_threshold.py bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

Report = dict[str, Any]


def _ratios(report: Report, key: str) -> list[float]:
    return [c["ratios"][key] for c in report["cases"] if c["ratios"].get(key) is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _largest(values: list[float]) -> float | None:
    return max(values, default=None)


def _bytes_ratio(report: Report, field: str, numerator: str, denominator: str) -> list[float]:
    return [c[field][numerator] / c[field][denominator] for c in report["cases"]]


# (target, how its value is read from the report, bound, True: value ≤ bound / False: value ≥ bound)
TARGETS: list[tuple[str, Callable[[Report], float | None], float, bool]] = [
    ("manual/native, median of the grid", lambda r: _median(_ratios(r, "manual/native")), 0.95, True),
    ("manual/native, every case (max)", lambda r: _largest(_ratios(r, "manual/native")), 1.00, True),
    ("manual/compiled, median of the grid", lambda r: _median(_ratios(r, "manual/compiled")), 1.00, True),
    # The loss inside the stack (BackpropMLP.loss, the slides' BP1): the project's goal for it.
    ("fused/native, median of the grid", lambda r: _median(_ratios(r, "fused/native")), 0.95, True),
    ("fused/native, every case (max)", lambda r: _largest(_ratios(r, "fused/native")), 1.00, True),
    (
        "saved activation bytes manual/native, every case (max)",
        lambda r: _largest(_bytes_ratio(r, "saved_activation_bytes", "manual", "native")),
        1.00,
        True,
    ),
    (
        # Parameter references included: they hold no extra memory (the parameters live anyway), but
        # show when the manual Function keeps parameters that native autograd does not need.
        "saved bytes incl. parameter references manual/native (max)",
        lambda r: _largest(_bytes_ratio(r, "saved_bytes", "manual", "native")),
        1.00,
        True,
    ),
    (
        "recompute saved activation bytes / input bytes (max)",
        lambda r: _largest([c["saved_activation_bytes"]["recompute"] / c["input_bytes"] for c in r["cases"]]),
        1.00,
        True,
    ),
    (
        "recompute/manual step time, every case (max)",
        lambda r: _largest(_ratios(r, "recompute/manual")),
        1.40,
        True,
    ),
]
# On the largest case the step should be mostly its matrix products.
FLOOR_SIZES, FLOOR_BOUND = [1024, 1024, 1024, 1024], 0.93


def check(report: Report) -> list[dict[str, Any]]:
    """One row per target: ``{"target", "value", "bound", "met"}``; ``met`` is None when not measured."""
    rows = []

    def add(name: str, value: float | None, bound: float, at_most: bool) -> None:
        met = None if value is None else (value <= bound if at_most else value >= bound)
        rows.append({"target": name, "value": value, "bound": bound, "met": met})

    for name, read, bound, at_most in TARGETS:
        add(name, read(report), bound, at_most)
    for case in report["cases"]:
        if case["sizes"] == FLOOR_SIZES:
            add(f"floor/manual on {case['name']}", case["ratios"]["floor/manual"], FLOOR_BOUND, False)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the JSON written by torch-backprop bench --json")
    args = parser.parse_args(argv)
    with open(args.report, encoding="utf-8") as file:
        report = json.load(file)
    rows = check(report)
    print("| target | measured | bound | met |\n|---|---:|---:|---|")
    for row in rows:
        value = "–" if row["value"] is None else f"{row['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        print(f"| {row['target']} | {value} | {row['bound']:.2f} | {met} |")
    missed = [row["target"] for row in rows if row["met"] is False]
    if missed:
        print(f"\n{len(missed)} of {len(rows)} targets missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
