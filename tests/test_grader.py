"""glalearn grade: full marks for solutions, 0 for fresh exercises, and it survives broken learner cells.

The tests that execute notebooks start Jupyter kernels (a few seconds each) and are marked slow; `make test`
runs them (only `-m "not slow"` leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from glalearn import checks, grade, progress

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


@pytest.fixture(autouse=True)
def _private_progress_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GLALEARN_PROGRESS", str(tmp_path / "progress.json"))


@pytest.mark.slow
def test_every_solutions_notebook_scores_full_marks(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert grade.main([*map(str, SOLUTIONS), "--json", str(out), "--jobs", "2"]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == len(SOLUTIONS)
    for nb, path in zip(data, SOLUTIONS):
        ids = [e["id"] for e in nb["exercises"]]
        assert ids == [e.id for e in checks.for_notebook(path.stem)], path.name
        assert nb["score"] == nb["max_score"] > 0, nb
        assert all(e["status"] == "passed" and e["points"] == e["max_points"] for e in nb["exercises"])
    printed = capsys.readouterr().out
    assert "total: " in printed and "passed" in printed


@pytest.mark.slow
def test_fresh_exercises_notebooks_grade_zero_with_every_exercise_not_started(tmp_path):
    """Through kernels for two notebooks (the in-process test below covers every notebook)."""
    chosen = [p for p in EXERCISES if p.stem in ("01_linear_attention_and_the_gate", "03_chunkwise")]
    out = tmp_path / "scores.json"
    assert grade.main([*map(str, chosen), "--json", str(out), "--jobs", "2"]) == 1
    data = json.loads(out.read_text())
    assert len(data) == len(chosen) == 2
    for nb in data:
        assert nb["score"] == 0 and nb["max_score"] > 0
        assert nb["exercises"] and all(e["status"] == "not started" for e in nb["exercises"]), nb
    recorded = json.loads((tmp_path / "progress.json").read_text())
    assert all(entry["score"] == 0 for entry in recorded.values()) and len(recorded) == len(chosen)


@pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_every_exercise_stub_is_not_started(path):
    """Each exercise notebook's functions, as generated, are graded "not started" by their checks."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {}
    seen = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        calls = grade.CHECK_CALL.findall(cell.source)
        if calls:
            name = cell.source.split(",")[1].strip(" )\n")
            result = checks.run_check(checks.get(calls[0]), namespace[name])
            assert result.status == "not started", (calls[0], result.message)
            seen.append(calls[0])
        elif "def " in cell.source:
            exec(compile(cell.source, path.name, "exec"), namespace)  # noqa: S102  (our own notebooks)
    assert seen == [e.id for e in checks.for_notebook(path.stem)]


@pytest.mark.slow
def test_the_grader_survives_an_exception_an_endless_loop_and_a_syntax_error(tmp_path):
    cells = [
        new_code_cell("import glalearn\nfrom glalearn.forms.parallel import parallel_gla"),
        new_code_cell("def recurrent_step(state, q_t, k_t, v_t, g_t, scale):\n    raise RuntimeError('my bug')"),
        new_code_cell('glalearn.check("1.1", recurrent_step)'),
        new_code_cell("def recurrent_gla(q, k, v, g, scale=None, initial_state=None):\n    while True:\n        pass"),
        new_code_cell('glalearn.check("1.2", recurrent_gla)'),
        new_code_cell("def gate(x, W1, W2, b, normalizer=16.0)\n    return x"),
        new_code_cell('glalearn.check("1.3", gate)'),
        new_code_cell("def parallel_gla_naive(q, k, v, g, scale=None):\n    return parallel_gla(q, k, v, g, scale)[0]"),
        new_code_cell('glalearn.check("2.1", parallel_gla_naive)'),
    ]
    path = tmp_path / "01_linear_attention_and_the_gate.ipynb"
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)
    out = tmp_path / "one.json"
    assert grade.main([str(path), "--timeout", "20", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert isinstance(data, dict) and data["notebook"].endswith(path.name)
    by_id = {e["id"]: e for e in data["exercises"]}
    assert by_id["1.1"]["status"] == "error" and "RuntimeError: my bug" in by_id["1.1"]["message"]
    assert by_id["1.2"]["status"] == "timed out" and "20 s" in by_id["1.2"]["message"]
    assert by_id["1.3"]["status"] == "error" and "SyntaxError" in by_id["1.3"]["message"]
    assert by_id["2.1"]["status"] == "passed", "grading must go on after the timeout and the errors"
    assert data["score"] == 2 and data["max_score"] == 1 + 2 + 1 + 2


def test_usage_errors_exit_2(tmp_path, capsys):
    assert grade.main([str(tmp_path / "missing.ipynb")]) == 2
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert grade.main([str(text)]) == 2
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    assert grade.main([str(broken)]) == 2
    assert grade.main([]) == 2
    assert grade.main([str(SOLUTIONS[0]), "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "not a notebook" in err and "not a readable notebook" in err


def test_grading_from_cells_without_a_result():
    """The status of exercises whose check cell published nothing comes from how the cells ran."""
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


def test_progress_records_and_reports_the_last_grade(tmp_path):
    ex_dir = tmp_path / "exercises"
    ex_dir.mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb"):
        (ex_dir / name).write_text("{}")
    g = grade.NotebookGrade("01_a.ipynb", [grade.ExerciseGrade("1.1", "t", "passed", 1, 1, ""),
                                           grade.ExerciseGrade("1.2", "u", "failed", 0, 2, "")])
    progress.record(ex_dir / "01_a.ipynb", g)
    report = progress.report(ex_dir)
    assert "01_a.ipynb" in report and "1/3   points" in report and "1/2 passed" in report
    assert "02_b.ipynb" in report and "not graded yet" in report
    assert progress.main(["--exercises", str(ex_dir)]) == 0
