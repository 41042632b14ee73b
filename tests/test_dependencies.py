"""The declared range is the tested range: .ci/minimum.txt pins exactly pyproject.toml's lower bounds.

.ci/run tests the newest releases (the `.[dev]` install) and, in its second job, these pins; a lower
bound raised or lowered in one file and not the other would claim a version that CI does not run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
TESTED_EXTRAS = ("dp", "curvature")  # plot and dev are tools around the library, taken at their newest


def _lower_bounds() -> dict[str, Version]:
    """``name -> version`` of each ``>=`` in the dependencies and the tested extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in TESTED_EXTRAS:
        lines += project["optional-dependencies"][extra]
    bounds = {}
    for line in lines:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: {line!r} needs one lower bound (>=)"
        bounds[canonicalize_name(requirement.name)] = Version(lower[0])
    return bounds


def _pins() -> dict[str, Version]:
    """``name -> version`` of each ``==`` in .ci/minimum.txt."""
    pins = {}
    for line in (ROOT / ".ci" / "minimum.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f".ci/minimum.txt: {line!r} should pin one version (==)"
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_the_minimum_ci_installs_is_the_declared_lower_bound() -> None:
    assert _pins() == _lower_bounds()


def test_torch_and_torchvision_are_pinned_as_a_matching_pair() -> None:
    # torchvision 0.N goes with torch 2.(N - 15): 0.24 with 2.9, 0.29 with 2.14.
    pins = _pins()
    assert pins["torchvision"].minor == pins["torch"].minor + 15
