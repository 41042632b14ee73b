"""The pinn command: its files, exact --resume, the presets' solutions, one-line refusals before work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GRAD_TOLERANCE, assert_close

from torch_backprop import BackpropMLP
from torch_backprop.cli import main
from torch_backprop.cli.pinn_problems import PROBLEMS
from torch_backprop.pde import InputDerivatives

F64 = GRAD_TOLERANCE[torch.float64]


@pytest.mark.parametrize("optimizer", ["engd", "kfac", "adam", "lbfgs"])
def test_a_run_writes_its_files_and_resumes_exactly(tmp_path, optimizer, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["pinn", "--problem", "heat1d", "--optimizer", optimizer, "--log-every", "2", "--quiet"]
    assert main([*common, "--steps", "4", "--out", str(straight)]) == 0
    assert main([*common, "--steps", "2", "--out", str(split)]) == 0
    assert main([*common, "--steps", "4", "--resume", str(split)]) == 0
    for name in ("metrics.json", "model.pt", "checkpoint.pt"):
        assert (straight / name).is_file()
    a, b = (torch.load(folder / "model.pt", weights_only=True) for folder in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((folder / "metrics.json").read_text())["log"] for folder in (straight, split)]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == [0, 2, 4]
    for key in ("loss", "rms_error", "relative_l2"):  # all but the seconds
        assert [e[key] for e in logs[0]] == [e[key] for e in logs[1]], key
    assert "absolute RMS error" in capsys.readouterr().out


def test_the_logged_errors_are_those_of_the_saved_model(tmp_path):
    out = tmp_path / "run"
    argv = [
        "pinn",
        "--problem",
        "poisson2d",
        "--steps",
        "3",
        "--log-every",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    problem = PROBLEMS["poisson2d"]
    model = BackpropMLP(problem.sizes, "tanh", dtype=torch.float64)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    points = torch.rand(9000, 2, generator=torch.Generator().manual_seed(10_000), dtype=torch.float64)
    with torch.no_grad():
        error = model(points)[:, 0] - torch.sin(torch.pi * points).prod(-1)
    last = json.loads((out / "metrics.json").read_text())["log"][-1]
    assert last["step"] == 3
    assert_close(
        torch.tensor(last["rms_error"], dtype=torch.float64),
        error.square().mean().sqrt(),
        F64,
        "RMS error",
    )
    relative = error.norm() / torch.sin(torch.pi * points).prod(-1).norm()
    assert_close(torch.tensor(last["relative_l2"], dtype=torch.float64), relative, F64, "relative L2 error")


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_each_exact_solution_solves_its_pde(name):
    # The preset's residuals vanish at u* (by torch.func on u* itself), and its boundary points lie on ∂Ω.
    problem = PROBLEMS[name]
    x_in, x_bd = problem.sample(torch.Generator().manual_seed(0), torch.float64)
    x = x_in[:64]
    u, grad, hess = (
        problem.exact(x),
        torch.func.vmap(torch.func.grad(lambda p: problem.exact(p[None])[0]))(x),
        torch.func.vmap(torch.func.hessian(lambda p: problem.exact(p[None])[0]))(x),
    )
    operator = problem.operator(x)
    coordinates = operator.get("coordinates", list(range(problem.dim)))
    diagonal = operator.get("diagonal", torch.ones(len(coordinates), dtype=torch.float64))
    Du = (hess[:, coordinates][:, :, coordinates].diagonal(dim1=1, dim2=2) * diagonal).sum(-1)
    if "drift" in operator:
        Du = Du + grad @ operator["drift"]
    d = InputDerivatives(u[:, None], grad[:, None, coordinates], Du[:, None])
    assert_close(
        problem.interior_residual(x, d), torch.zeros(64, dtype=torch.float64), (0, 1e-9), "r_Ω at u*"
    )
    on_face = ((x_bd == 0) | (x_bd == 1))[:, int(problem.heat) :].any(-1) | (
        problem.heat and (x_bd[:, 0] == 0)
    )
    assert bool(on_face.all()) and x_in.shape == (problem.interior, problem.dim)
    assert x_bd.shape == (problem.boundary, problem.dim)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problem", "nope"], "invalid choice: 'nope'"),
        (["--steps", "-1"], "expected an integer >= 0, got '-1'"),
        (
            ["--optimizer", "adam", "--damping", "1e-3"],
            "--damping, --momentum and --ema-factor are ENGD's and KFAC's",
        ),
        (["--optimizer", "kfac", "--solver", "cholesky"], "--solver and --initialize-to-identity are ENGD's"),
        (
            ["--optimizer", "engd", "--inverse-every", "2"],
            "--inverse-every: KFAC's; --optimizer engd takes none",
        ),
        (["--optimizer", "kfac", "--momentum", "0.5"], "KFAC's --line-search auto chooses the momentum"),
        (
            ["--optimizer", "kfac", "--lr", "0.1", "--line-search", "grid"],
            "--lr 0.1 is a fixed step size; leave out --line-search grid",
        ),
        (["--optimizer", "kfac", "--inverse-every", "0"], "expected an integer >= 1, got '0'"),
        (["--lr", "0"], "expected a finite number > 0, got '0'"),
        (
            ["--resume", "/nonexistent-run"],
            "--resume expected the folder of a pinn run, got /nonexistent-run",
        ),
    ],
)
def test_bad_options_are_one_line_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert exit_code(["pinn", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_out_below_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["pinn", "--out", str(tmp_path / "file" / "run")]) == 2
    assert "below the file" in capsys.readouterr().err


def test_resume_of_an_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["pinn", "--resume", str(tmp_path)]) == 2
    assert "cannot read checkpoint.pt" in capsys.readouterr().err


def test_resume_of_another_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pinn", "--problem", "heat1d", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert main(["pinn", "--problem", "heat1d", "--steps", "2", "--seed", "3", "--resume", str(out)]) == 2
    assert "is a run with --seed 0, got 3" in capsys.readouterr().err


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own refusals
        return exit.code


def test_kfac_runs_log_their_step_rule_and_skipped_counts(tmp_path):
    out = tmp_path / "run"
    argv = ["pinn", "--problem", "poisson2d", "--optimizer", "kfac", "--steps", "3", "--log-every", "3"]
    argv += ["--line-search", "grid", "--momentum", "0.3", "--ema-factor", "0.5", "--inverse-every", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["log"][-1]
    assert set(last["skipped"]) == {"steps", "factors", "inverses"} and last["skipped"]["factors"] == 0
    assert last["lr"] >= 0 and last["momentum"] in (0.0, 0.3)  # 0 after a step the grid left out
    assert metrics["config"]["line_search"] == "grid" and metrics["config"]["inverse_every"] == 2
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    state = saved["optimizer"]["state"]["kfac"]
    assert state["step"] == 3 and state["basis_step"] == 3 and state["update"].dtype == torch.float64
