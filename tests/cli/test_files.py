"""The one atomic writer: a failed write keeps the old file, no temporary; JSON, torch, PNG go through it."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from torch_backprop.cli.files import atomic_write, write_figure, write_json, write_torch


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def half_then_crash(file):
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        atomic_write(path, lambda file: (file.write(b"half"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    atomic_write(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new"


def test_new_files_get_the_umask_mode_and_missing_folders_are_made(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_json({"x": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_write_json_round_trips_and_strict_mode_refuses_nan(tmp_path):
    path = tmp_path / "r.json"
    write_json({"loss": [1.5, 2]}, path)
    assert path.read_text().endswith("\n") and json.loads(path.read_text()) == {"loss": [1.5, 2]}
    write_json({"loss": math.nan}, path)  # a diverged run's metrics are still written
    assert "NaN" in path.read_text()
    with pytest.raises(ValueError):
        write_json({"loss": math.nan}, path, allow_nan=False)
    assert "NaN" in path.read_text() and len(list(tmp_path.iterdir())) == 1


def test_write_torch_loads_with_weights_only(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    write_torch(state, tmp_path / "model.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], state["w"])


def test_write_figure_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    write_figure(figure, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupt_just_after_the_temporary_is_created_leaves_no_file(tmp_path, monkeypatch):
    # A SIGTERM or Ctrl-C raised as the temporary file appears (inside tempfile.mkstemp, before the
    # old code knew the file's name) left a .NAME.*.tmp behind.
    import torch_backprop.cli.files as files_module

    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    target = tmp_path / "metrics.json"
    target.write_text("old")
    with monkeypatch.context() as patch:
        patch.setattr(files_module.os, "open", open_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            files_module.write_json({"new": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert target.read_text() == "old"
