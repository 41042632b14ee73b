"""Fixtures shared by the command's tests."""

from __future__ import annotations

import pytest

from torch_backprop.cli import train


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: every refusal here must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(train, "_load_data", refuse)
