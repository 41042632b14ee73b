"""Interleaved timing: each round measures every contender once, one place further along the list."""

from __future__ import annotations

import statistics

import pytest

from torch_backprop.cli import timing


def test_rotated():
    assert timing.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert timing.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert timing.rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert timing.rotated([], 3) == []


class FakeTimer:
    """Stands for a ``torch.utils.benchmark.Timer``: returns preset medians and logs the call order."""

    def __init__(self, name, medians, log):
        self.name, self.medians, self.log = name, iter(medians), log

    def blocked_autorange(self, min_run_time):
        self.log.append(self.name)
        return type("Measurement", (), {"median": next(self.medians)})()


def test_interleaved_medians_rotates_and_takes_the_median_of_the_rounds(monkeypatch):
    log = []
    medians = {"a": [3.0, 1.0, 2.0], "b": [10.0, 30.0, 20.0]}
    monkeypatch.setattr(
        timing,
        "make_timer",
        lambda step, *, description, **_: FakeTimer(description, medians[description], log),
    )
    result = timing.interleaved_medians(
        {"a": lambda: None, "b": lambda: None}, rounds=3, min_run_time=0.1, threads=1
    )
    assert log == ["a", "b", "b", "a", "a", "b"]
    for name, values in medians.items():
        assert result[name] == {"median_s": statistics.median(values), "rounds_s": values}


def test_a_real_timer_measures_a_step():
    calls = []
    result = timing.interleaved_medians(
        {"step": lambda: calls.append(1)}, rounds=2, min_run_time=1e-3, threads=1
    )
    assert len(result["step"]["rounds_s"]) == 2 and result["step"]["median_s"] > 0
    assert len(calls) >= 2


def test_machine_info_names_the_machine():
    info = timing.machine_info("cpu", 1)
    assert info["threads"] == 1 and info["device"] == "cpu" and info["cpu"]
    assert info["torch"] == __import__("torch").__version__


@pytest.mark.parametrize("count", [1, 2])
def test_threads_restores_the_setting(count):
    import torch

    before = torch.get_num_threads()
    with timing.threads(count):
        assert torch.get_num_threads() == count
    assert torch.get_num_threads() == before
