"""One command-line convention for every ``torch-backprop`` subcommand and every example script.

Each subcommand of :data:`~torch_backprop.cli.command.SUBCOMMANDS` and each ``examples/*.py`` (its
``build_parser()``) is found here by iteration, so one added later is held to the same rules: every
option has a help string that ``--help`` shows, with its default; abbreviations are refused; a
usage error is one line that points at the command's own ``--help``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from _train_helpers import ROOT, load_example

from torch_backprop.cli.command import SUBCOMMANDS, build_parser
from torch_backprop.cli.options import CommandParser, parse_widths

EXAMPLES = sorted(path.stem for path in (ROOT / "examples").glob("*.py"))


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    _, subcommands = build_parser([name])
    return subcommands[name]


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(f"torch-backprop {name}", subcommand_parser(name)) for name in SUBCOMMANDS]
    return found + [(f"examples/{name}.py", load_example(name).build_parser()) for name in EXAMPLES]


def test_every_command_and_example_is_found():
    assert {"train", "verify", "bench"} <= set(SUBCOMMANDS)
    assert {"drop_in", "dp_mnist", "laplace_mnist", "poisson", "pinn_black_scholes"} <= set(EXAMPLES)


@pytest.mark.parametrize("name, parser", parsers(), ids=lambda value: value if isinstance(value, str) else "")
def test_help_lists_every_option_with_a_help_string_and_its_default(name, parser):
    assert isinstance(parser, CommandParser), f"{name}: not built by torch_backprop.cli.options"
    assert parser.allow_abbrev is False, name
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {flag}: no help string"
        assert flag in text, f"{name} {flag}: not in --help"
        shown = parser._get_formatter()._get_help_string(action)
        quiet = action.default in (None, False)  # a flag, or an option that is off unless given
        assert quiet or "default" in shown.lower(), f"{name} {flag}: --help does not say its default"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_usage_errors_point_at_their_own_help(name, capsys):
    from torch_backprop.cli import main

    with pytest.raises(SystemExit) as exited:
        main([name, "--no-such-option"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"torch-backprop {name}: unrecognized arguments: --no-such-option "
        f"(see torch-backprop {name} --help)\n"
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_usage_errors_are_one_line_pointing_at_its_help(name, capsys):
    parser = load_example(name).build_parser()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--no-such-option"])
    assert exited.value.code == 2
    prog = f"python examples/{name}.py"
    assert (
        capsys.readouterr().err == f"{prog}: unrecognized arguments: --no-such-option (see {prog} --help)\n"
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_refuse_abbreviations(name):
    parser = load_example(name).build_parser()
    flags = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.nargs != 0]
    for flag in flags:
        abbreviation = flag[:-1]  # "--step" for "--steps": a prefix of one option only
        if any(other != flag and other.startswith(abbreviation) for other in parser._option_string_actions):
            continue
        _, unknown = parser.parse_known_args([abbreviation, "1"])
        assert unknown == [abbreviation, "1"], f"examples/{name}.py took {abbreviation} for {flag}"


@pytest.mark.parametrize(
    "text, widths",
    [("784,256,10", [784, 256, 10]), ("784-256-10", [784, 256, 10]), ("784 256 10", [784, 256, 10]),
     (" 784, 256 ,10 ", [784, 256, 10]), ("64", [64])],
)  # fmt: skip
def test_widths_are_read_in_each_format(text, widths):
    assert parse_widths(text) == widths


@pytest.mark.parametrize(
    "text, message",
    [
        ("784,-5,10", "expected positive widths (-5 is not), got '784,-5,10'"),
        ("784,0,10", "expected positive widths (0 is not), got '784,0,10'"),
        ("-5", "expected widths as comma-separated integers such as 784,256,10, got '-5'"),
        ("784-256,x", "expected widths as comma-separated integers such as 784,256,10, got '784-256,x'"),
        ("", "expected one or more widths such as 784,256,10, got ''"),
    ],
)
def test_bad_widths_say_what_was_expected_and_given(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse_widths(text)
    assert str(refused.value) == message


@pytest.mark.parametrize("name", EXAMPLES)
def test_hidden_widths_are_read_in_the_shared_format(name):
    parser = load_example(name).build_parser()
    if "--hidden" not in parser._option_string_actions:
        pytest.skip(f"examples/{name}.py has no --hidden")
    for argv in (["--hidden", "16,8"], ["--hidden", "16", "8"], ["--hidden", "16-8"]):
        assert parser.parse_args(argv).hidden == [16, 8], argv


def test_examples_are_scripts_with_a_main(tmp_path: Path):
    for name in EXAMPLES:
        assert callable(getattr(load_example(name), "main", None)), name
