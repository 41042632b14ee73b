"""Every fenced Python block of README.md and docs/*.md runs as written, each in a fresh namespace.

A block runs in a folder of its own (so nothing it might write lands in the repository) and must
write nothing there. A block that needs an optional extra names it on its first line,
``# needs the dp extra ...``; it is skipped, with the reason, when that extra is not installed, and
a block that imports an extra's package without saying so fails.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
NEEDS = re.compile(r"^# needs the (\w+) extra", flags=re.M)
# The import names of each extra's packages (pyproject.toml's [project.optional-dependencies]).
EXTRAS = {"plot": ["matplotlib"], "dp": ["opacus"], "curvature": ["backpack", "curvlinops", "laplace"]}


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in BLOCK.finditer(text):
            line = text[: block.start()].count("\n") + 2  # the block's first line of code
            found.append((f"{page.relative_to(ROOT)}:{line}", block[1]))
    return found


def test_the_pages_hold_the_snippets_this_test_runs():
    named = {name.split(":")[0] for name, _ in snippets()}
    assert {"README.md", "docs/per_sample.md", "docs/pde.md", "docs/curvature.md"} <= named
    assert len(snippets()) >= 8


def test_the_extras_are_pyprojects():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} == set(EXTRAS)


@pytest.mark.parametrize("name, code", snippets(), ids=[name for name, _ in snippets()])
def test_the_snippet_runs_as_written(name, code, tmp_path, monkeypatch):
    needs = NEEDS.findall(code)
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, flags=re.M))
    for extra, modules in EXTRAS.items():
        used = imported & set(modules)
        assert not used or extra in needs, (
            f"{name} imports {', '.join(used)} without '# needs the {extra} extra'"
        )
    for extra in needs:
        missing = [m for m in EXTRAS[extra] if m in imported and importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{name} needs the {extra} extra ({', '.join(missing)} not installed)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name])
    exec(compile(code, name, "exec"), {"__name__": "__snippet__"})  # a fresh namespace: nothing carried over
    assert list(tmp_path.iterdir()) == [], f"{name} wrote files"
