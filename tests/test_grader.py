"""glalearn grade: full marks for solutions, 0 for fresh exercises, nothing but the learner's own code scores,
it survives broken learner cells, and every user error is one line.

The tests that execute notebooks start Jupyter kernels (a few seconds each) and are marked slow; `make test`
runs them (only `-m "not slow"` leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from glalearn import checks, cli, grade

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
FAKE_PASS = {"id": "1.1", "title": "one recurrent step", "status": "passed", "points": 1, "max_points": 1,
             "message": "all 4 cases within rel err 1e-06", "seed": 1, "cases": []}


@pytest.fixture(autouse=True)
def _private_progress_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GLALEARN_PROGRESS", str(tmp_path / "progress"))


def _notebook(path: Path, sources: list[str]) -> Path:
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources], metadata={"kernelspec": KERNELSPEC}), path)
    return path


@pytest.mark.slow
def test_every_solutions_notebook_scores_full_marks(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert cli.main(["grade", *map(str, SOLUTIONS), "--json", str(out), "--jobs", "2"]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == len(SOLUTIONS)
    for nb, path in zip(data, SOLUTIONS):
        ids = [e["id"] for e in nb["exercises"]]
        assert ids == [e.id for e in checks.for_notebook(path.stem)], path.name
        assert nb["score"] == nb["max_score"] > 0, nb
        assert all(e["status"] == "passed" and e["points"] == e["max_points"] for e in nb["exercises"])
    assert sum(nb["score"] for nb in data) == sum(e.points for e in checks.exercises().values()) == 42
    printed = capsys.readouterr().out
    assert "total: " in printed and "overall: 42/42 points in 10 notebooks" in printed


@pytest.mark.slow
def test_fresh_exercises_notebooks_grade_zero_with_every_exercise_not_started(tmp_path):
    """Through kernels for two notebooks (the in-process test below covers every notebook)."""
    chosen = [p for p in EXERCISES if p.stem in ("01_linear_attention_and_the_gate", "06_triton_from_zero")]
    out = tmp_path / "scores.json"
    assert cli.main(["grade", *map(str, chosen), "--json", str(out), "--jobs", "2"]) == 1
    data = json.loads(out.read_text())
    assert len(data) == len(chosen) == 2
    for nb in data:
        assert nb["score"] == 0 and nb["max_score"] > 0
        assert nb["exercises"] and all(e["status"] == "not started" for e in nb["exercises"]), nb
    records = list((tmp_path / "progress").glob("*.json"))
    assert len(records) == len(chosen) and all(json.loads(r.read_text())["score"] == 0 for r in records)


@pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_every_exercise_stub_is_not_started(path):
    """Each exercise notebook's functions, as generated, are graded "not started" by their checks."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {}
    seen = []
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code:
        calls = grade.check_calls(cell.source)
        if calls:
            result = checks.run_check(checks.get(calls[0].exercise_id), eval(calls[0].function, namespace))
            assert result.status == "not started", (calls[0], result.message)
            seen.append(calls[0].exercise_id)
        elif "def " in cell.source or cell is code[0]:  # the imports, then the stubs
            exec(compile(cell.source, path.name, "exec"), namespace)  # noqa: S102  (our own notebooks)
    assert seen == [e.id for e in checks.for_notebook(path.stem)]


@pytest.mark.slow
def test_the_grader_survives_an_exception_an_endless_loop_and_a_syntax_error(tmp_path):
    path = _notebook(tmp_path / "01_linear_attention_and_the_gate.ipynb", [
        "import torch\nimport glalearn",
        "def recurrent_step(state, q_t, k_t, v_t, g_t, scale):\n    raise RuntimeError('my bug')",
        'glalearn.check("1.1", recurrent_step)',
        "def recurrent_gla(q, k, v, g, scale=None, initial_state=None):\n    while True:\n        pass",
        'glalearn.check("1.2", recurrent_gla)',
        "def gate(x, W1, W2, b, normalizer=16.0)\n    return x",
        'glalearn.check("1.3", gate)',
        ("def parallel_gla_naive(q, k, v, g, scale=None):\n"
         "    K = q.shape[-1]\n    scale = K ** -0.5 if scale is None else scale\n"
         "    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))\n    G = g.cumsum(2)\n"
         "    P = ((q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)).tril()\n"
         "    return (scale * P @ v).transpose(1, 2)"),
        'glalearn.check("2.1", parallel_gla_naive)',
    ])
    out = tmp_path / "one.json"
    assert cli.main(["grade", str(path), "--timeout", "20", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert isinstance(data, dict) and data["notebook"].endswith(path.name)
    by_id = {e["id"]: e for e in data["exercises"]}
    assert by_id["1.1"]["status"] == "error" and "RuntimeError: my bug" in by_id["1.1"]["message"]
    assert by_id["1.2"]["status"] == "timed out" and "20 s" in by_id["1.2"]["message"]
    assert by_id["1.3"]["status"] == "error" and "SyntaxError" in by_id["1.3"]["message"]
    assert by_id["2.1"]["status"] == "passed", "grading must go on after the timeout and the errors"
    assert data["score"] == 2 and data["max_score"] == 1 + 2 + 1 + 2


@pytest.mark.slow
def test_every_way_to_fake_a_grade_scores_zero(tmp_path):
    """A forged check output, a replaced glalearn.check, and the library's reference handed in: 0 points each.

    Notebook named like chapter 1's, so it is graded on 1.1, 1.2 and 1.3; none is solved honestly.
    """
    fake = json.dumps(FAKE_PASS)
    path = _notebook(tmp_path / "01_linear_attention_and_the_gate.ipynb", [
        "import torch\nimport glalearn\nfrom IPython.display import display",
        # 1.1: an unfilled stub, and an extra cell that displays a passing check output and its summary line
        ("def recurrent_step(state, q_t, k_t, v_t, g_t, scale):\n"
         "    raise NotImplementedError('Exercise 1.1 (one recurrent step): write your solution here')"),
        'glalearn.check("1.1", recurrent_step)',
        (f"display({{'text/plain': '✓ Exercise 1.1 (one recurrent step): passed, 1/1 points', "
         f"'application/vnd.glalearn.check+json': {fake}}}, raw=True)"),
        # 1.2: a wrong function, and glalearn.check replaced by one that always says "passed"
        "def recurrent_gla(q, k, v, g, scale=None, initial_state=None):\n    return torch.zeros_like(v), None",
        (f"fake = {fake}\nfake.update(id='1.2', title='the recurrent form', points=2, max_points=2)\n"
         "glalearn.check = lambda *a, **k: display({'text/plain': '✓ passed', "
         "'application/vnd.glalearn.check+json': fake}, raw=True)"),
        'glalearn.check("1.2", recurrent_gla)',
        # 1.3: the library's own answer
        ("from glalearn.gates import gla_gate\n\n"
         "def gate(x, W1, W2, b, normalizer=16.0):\n    return gla_gate(x, W1, W2, b, normalizer)"),
        'glalearn.check("1.3", gate)',
    ])
    out = tmp_path / "fake.json"
    assert cli.main(["grade", str(path), "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    by_id = {e["id"]: e for e in data["exercises"]}
    assert data["score"] == 0, data
    assert by_id["1.1"]["status"] == "not started"
    assert by_id["1.2"]["status"] == "failed" and "case 1" in by_id["1.2"]["message"]
    assert by_id["1.3"]["status"] == "error" and "calls glalearn.gates.gla_gate" in by_id["1.3"]["message"]
    assert "the library's answer" in by_id["1.3"]["message"]


def test_displayed_check_outputs_award_nothing():
    """Grading reads no output: a notebook whose cells show passing check outputs but whose function's
    answers never came back is graded error, 0 points."""
    nb = new_notebook(cells=[new_code_cell("pass"), new_code_cell('glalearn.check("5.1", f)'),
                             new_code_cell('glalearn.check("5.2", h)')])
    for i, exercise_id in ((1, "5.1"), (2, "5.2")):
        payload = {**FAKE_PASS, "id": exercise_id}
        nb.cells[i].outputs = [new_output("display_data", data={"text/plain": "✓ passed",
                                                                "application/vnd.glalearn.check+json": payload})]
    runs = {0: grade.CellRun("ok"), 1: grade.CellRun("ok"), 2: grade.CellRun("ok")}
    g = grade.grade_cells(nb, runs, "05_backward.ipynb", "05_backward")
    assert g.score == 0 and [e.status for e in g.exercises] == ["error", "error"]


def test_the_probe_sees_its_inputs_only_while_it_runs(tmp_path):
    """The grader writes a probe's inputs just before it and deletes its folder just after it, so the
    notebook's other cells never find the cases (to precompute answers) or the answers (to rewrite them)."""
    from glalearn.checks.exchange import save_answers

    probe = grade._Probe(checks.get("5.1"), "reverse_cumsum", tmp_path / "5_1", index=3)
    before, after = grade._hooks({"5.1": probe})[3]
    assert not probe.folder.exists()
    before()
    assert (probe.folder / "cases.json").exists() and probe.cases
    answers = checks.collect_answers(checks.get("5.1"), lambda x, dim: x.flip(dim).cumsum(dim).flip(dim),
                                     probe.cases)
    save_answers(probe.folder, answers)
    after()
    assert not probe.folder.exists() and len(probe.answers) == len(probe.cases)
    result = checks.evaluate(probe.spec, probe.cases, probe.answers, probe.seed)
    assert result.status == "passed"


def test_grading_from_cells_without_a_result():
    """The status of exercises whose probe brought nothing back comes from how the cells ran."""
    nb = new_notebook(cells=[new_code_cell("x"), new_code_cell('glalearn.check("5.1", f)'),
                             new_code_cell("y"), new_code_cell('glalearn.check("5.2", h)')])
    runs = {0: grade.CellRun("error", "SyntaxError", "invalid syntax"), 1: grade.CellRun("error", "NameError", "f"),
            2: grade.CellRun("ok"), 3: grade.CellRun("timeout", "TimeoutError", "5 s")}
    g = grade.grade_cells(nb, runs, "05_backward.ipynb", "05_backward")
    (a, b) = g.exercises
    assert (a.status, b.status) == ("error", "timed out")
    assert a.message.startswith("SyntaxError: invalid syntax (in cell 1)")
    assert g.score == 0 and g.max_score == 4 and "total: 0/4 points" in g.scorecard()


def test_a_missing_check_cell_is_an_error_not_a_smaller_maximum():
    nb = new_notebook(cells=[new_code_cell("pass")])
    g = grade.grade_cells(nb, {0: grade.CellRun("ok")}, "05_backward.ipynb", "05_backward")
    assert [e.status for e in g.exercises] == ["error", "error"] and g.max_score == 4
    assert "never calls glalearn.check" in g.exercises[0].message


def test_check_calls_are_read_from_the_cells_code():
    assert [(c.exercise_id, c.function) for c in grade.check_calls(
        '# glalearn.check("9.9", nothing)\nr = glalearn.check("3.2", my_states, hint=1)\ncheck("5.1", fn=f)')] == [
        ("3.2", "my_states"), ("5.1", "f")]
    assert [(c.exercise_id, c.function) for c in grade.check_calls('glalearn.check("1.1", f')] == [("1.1", None)]


def test_the_scorecard_shows_the_whole_first_line_wrapped():
    clue = ("likely mistake: new_state is transposed: a state is [K, V] (row c belongs to key channel c, "
            "S = Σ k_tᵀ v_t), not [V, K]. case 2 (B=2 H=3 K=20 V=36 τ=0.1): new_state has shape (2, 3, 36, 20), "
            "expected (2, 3, 20, 36) = [B, H, K, V]")
    g = grade.NotebookGrade("01.ipynb", [grade.ExerciseGrade("1.1", "one recurrent step", "failed", 0, 1,
                                                             clue + "\nsecond line not shown")])
    card = g.scorecard(width=80)
    assert "…" not in card and "second line" not in card
    assert " ".join(card.split()).count(" ".join(clue.split())) == 1  # every word, in order
    assert all(len(line) <= 80 for line in card.splitlines())


# ----------------------------------------------------------------------------- the command line
def _one_line_error(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"glalearn {argv[0]}: error: "), err
    assert words in err[0], err
    return err[0]


@pytest.mark.parametrize(("argv", "words"), [
    (["grade", "missing.ipynb"], "missing.ipynb: no such file"),
    (["grade", "{notes}"], "not a notebook"),
    (["grade", "{broken}"], "not a readable notebook"),
    (["grade"], "the following arguments are required: notebooks"),
    (["grade", "{solution}", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["grade", "{solution}", "--timeout", "nan"], "--timeout must be a finite number of seconds > 0, got nan"),
    (["grade", "{solution}", "--timeout", "-1"], "got -1"),
    (["grade", "{solution}", "--timeout", "soon"], "invalid float value: 'soon'"),
    (["grade", "{solution}", "--json", "{tmp}/no/such/dir/x.json"], "does not exist"),
    (["grade", "{solution}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["progress", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["doctor", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_every_user_error_is_one_line_with_exit_2(tmp_path, capsys, argv, words):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.ipynb").write_text("{not json")
    names = {"notes": tmp_path / "notes.txt", "broken": tmp_path / "broken.ipynb", "solution": SOLUTIONS[0],
             "tmp": tmp_path}
    _one_line_error(capsys, [a.format(**names) for a in argv], words)


def test_debug_shows_the_traceback_instead(capsys):
    from glalearn.clierror import UserError

    with pytest.raises(UserError, match="--jobs must be at least 1"):
        cli.main(["grade", str(SOLUTIONS[0]), "--jobs", "0", "--debug"])


def test_a_bad_progress_record_never_stops_grading(tmp_path, monkeypatch, capsys):
    """The --json file is written before the progress record, and a record that is not valid JSON (or `[]`)
    is set aside with a warning; the grade goes on and a fresh record is written."""
    from glalearn import progress

    nb = SOLUTIONS[0]
    fake = grade.NotebookGrade(str(nb), [grade.ExerciseGrade("1.1", "one recurrent step", "passed", 1, 1, "ok"),
                                         grade.ExerciseGrade("1.2", "the recurrent form", "failed", 0, 2, "no"),
                                         grade.ExerciseGrade("1.3", "the gate parameterization", "error", 0, 1, "x")])
    monkeypatch.setattr(grade, "_grade_all", lambda paths, timeout, jobs: iter([fake]))
    for bad in ("[]", "{not json", ""):
        target = progress.record_path(nb)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(bad)
        out = tmp_path / "out.json"
        assert cli.main(["grade", str(nb), "--json", str(out)]) == 1
        assert json.loads(out.read_text())["score"] == 1
        err = capsys.readouterr().err
        assert "glalearn grade: warning:" in err and str(target) in err and ".bak" in err
        assert target.with_name(target.name + ".bak").read_text() == bad
        assert progress.load().records[0]["score"] == 1


def test_the_command_line_dispatches_and_names_unknown_commands(capsys):
    assert cli.main([]) == 2 and "usage: glalearn COMMAND" in capsys.readouterr().out
    assert cli.main(["grades"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glalearn: error: unknown command 'grades'")
