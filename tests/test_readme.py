"""The README's main command runs offline on the shipped digits; nothing names a folder outside the repo."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from torch_backprop.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The lines of the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines()]


def test_the_main_command_trains_on_real_digits_offline(tmp_path):
    first = readme_commands()[0]
    train = first[first.index("torch-backprop train") :].split("&&")[0]
    argv = shlex.split(train)[1:]
    assert argv[:3] == ["train", "--dataset", "mnist-10k"]
    assert "--data-root" not in argv and not any(".." in arg for arg in argv)  # no path outside
    out = tmp_path / "run"
    # The same command, one epoch instead of ten (argparse keeps the last of a repeated option).
    assert main([*argv, "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["sizes"] == [784, 256, 10]
    (epoch,) = metrics["epochs"]
    assert epoch["manual"]["test_accuracy"] > 0.85  # one epoch of Adam: ~0.93; chance: 0.1


def test_the_test_command_is_what_ci_runs():
    tests = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ('-e ".[dev]"', "ruff check .", "python -m pytest -q"):
        assert step in tests and step in ci


def test_nothing_names_a_folder_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared[/]data|\.\.[/\\]\.\.")  # matches none of its own text
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / name for name in tracked.stdout.splitlines()] + list((ROOT / "tests").glob("*.py"))
    named = []
    for path in files:
        if path.suffix in {".py", ".md", ".toml", ".cfg", ".txt", ""} and path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if outside.search(line):
                    named.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert named == []


def test_the_equations_table_quotes_lines_that_exist():
    # Every code fragment of the equations <-> code table stands, as quoted, in the module it names.
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| slides | equation | code (`torch_backprop/")[1].split("\n\n")[0]
    module, rows = table.split("`", 1)[0], table.splitlines()[2:]
    source = (ROOT / "torch_backprop" / module).read_text()
    quoted = [
        fragment
        for row in rows
        if row.split("|")[3].strip().startswith("`") and ".py" not in row.split("|")[3]
        for fragment in row.split("|")[3].split("`")[3::2]
    ]
    assert len(quoted) >= 7
    for fragment in quoted:
        assert fragment in source, f"README quotes {fragment!r}, which is not in torch_backprop/{module}"
