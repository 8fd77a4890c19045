"""glalearn progress: one record per notebook, written atomically by the grader, validated on read, counted by
exercise ID wherever the notebook lives; bad records are reported, kept aside and replaced."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from glalearn import grade, progress
from glalearn.checks.core import UNDER_GRADER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_progress_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GLALEARN_PROGRESS", str(tmp_path / "progress"))


def _grade(path, statuses: dict[str, str]) -> grade.NotebookGrade:
    from glalearn import checks

    exercises = []
    for exercise_id, status in statuses.items():
        ex = checks.get(exercise_id)
        exercises.append(grade.ExerciseGrade(exercise_id, ex.title, status, ex.points if status == "passed" else 0,
                                             ex.points, ""))
    return grade.NotebookGrade(str(path), exercises)


def test_a_record_is_written_and_reported_by_exercise_id(tmp_path):
    nb = tmp_path / "exercises" / "01_linear_attention_and_the_gate.ipynb"
    assert progress.record(nb, _grade(nb, {"1.1": "passed", "1.2": "failed", "1.3": "not started"})) == []
    (record,) = progress.load().records
    assert record["score"] == 1 and record["max_score"] == 4 and record["notebook"] == str(nb.resolve())
    report = progress.report(tmp_path / "exercises")
    line = next(x for x in report.splitlines() if "01_linear_attention_and_the_gate" in x)
    assert " 1/4  points  1/3 passed" in line
    assert "03_chunkwise" in report and "not graded yet" in report
    assert progress.main(["--exercises", str(tmp_path / "exercises")]) == 0


def test_a_notebook_graded_outside_exercises_counts_for_its_chapter(tmp_path):
    copy = tmp_path / "elsewhere" / "my attempt.ipynb"
    progress.record(copy, _grade(copy, {"3.1": "passed", "3.2": "passed", "3.3": "error", "3.4": "failed"}))
    report = progress.report()
    line = next(x for x in report.splitlines() if "03_chunkwise" in x)
    assert " 4/9  points  2/4 passed" in line and "my attempt.ipynb" in line
    assert "total: 4/9 points in the graded notebooks (42 points in all)" in report


def test_the_latest_result_of_an_exercise_wins_whichever_notebook_it_came_from(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "01_x.ipynb", tmp_path / "b" / "01_y.ipynb"
    progress.record(first, _grade(first, {"1.1": "passed", "1.2": "passed", "1.3": "passed"}))
    data = json.loads(progress.record_path(first).read_text())
    assert data["graded_at"]
    progress.record(second, _grade(second, {"1.1": "failed"}))
    # make the second record certainly later, through the grader's own writer (the digest covers graded_at)
    key = (progress.progress_dir() / progress.KEY_FILE).read_bytes().strip()
    rec = json.loads(progress.record_path(second).read_text())
    rec["graded_at"] = "9999-01-01T00:00:00+00:00"
    rec["digest"] = progress._digest(key, rec)
    progress.record_path(second).write_text(json.dumps(rec))
    line = next(x for x in progress.report().splitlines() if "01_linear_attention_and_the_gate" in x)
    assert " 3/4  points  2/3 passed" in line  # 1.1 from the later record, 1.2 and 1.3 from the first


@pytest.mark.parametrize(("content", "why"), [
    ("{not json", "not JSON"),
    ("", "the file is empty"),
    ("[]", "a record is a JSON object, this is a list"),
    ('{"format": 1, "score": "all of them"}', "must be a"),
])
def test_a_corrupt_empty_or_wrong_typed_record_is_reported_kept_aside_and_replaced(tmp_path, content, why):
    nb = tmp_path / "03_chunkwise.ipynb"
    other = tmp_path / "01_linear_attention_and_the_gate.ipynb"
    progress.record(other, _grade(other, {"1.1": "passed"}))
    target = progress.record_path(nb)
    target.write_text(content)
    loaded = progress.load()
    assert len(loaded.records) == 1 and loaded.records[0]["score"] == 1  # the other notebook is untouched
    (problem,) = loaded.problems
    assert str(target) in problem and why in problem and ".bak" in problem
    assert not target.exists() and target.with_name(target.name + ".bak").read_text() == content
    report = progress.report()  # nothing crashes; the bad file was set aside already
    assert "warning" not in report
    # grading goes on: the next grade writes a fresh, valid record
    target.write_text(content)
    problems = progress.record(nb, _grade(nb, {"3.1": "passed", "3.2": "failed"}))
    assert len(problems) == 1 and str(target) in problems[0]
    assert sorted(r["score"] for r in progress.load().records) == [1, 1]
    assert progress.load().problems == []


def test_a_forged_or_hand_edited_record_is_not_believed(tmp_path):
    nb = tmp_path / "05_backward.ipynb"
    progress.record(nb, _grade(nb, {"5.1": "failed", "5.2": "failed"}))
    target = progress.record_path(nb)
    record = json.loads(target.read_text())
    record["exercises"]["5.1"] = {"status": "passed", "points": 1, "max_points": 1}
    record["score"] = 1
    target.write_text(json.dumps(record))  # a consistent edit, without the grader's key
    loaded = progress.load()
    assert loaded.records == [] and "digest does not match" in loaded.problems[0]
    # points that disagree with the registry are refused even before the digest is checked
    progress.record(nb, _grade(nb, {"5.1": "failed", "5.2": "failed"}))
    record = json.loads(target.read_text())
    record["exercises"]["5.2"] = {"status": "passed", "points": 30, "max_points": 30}
    record["score"] = record["max_score"] = 31
    target.write_text(json.dumps(record))
    assert "5.2 is worth 3 points, the record says 30" in progress.load().problems[0]


def test_a_notebook_cannot_write_a_record(tmp_path, monkeypatch):
    """Inside a kernel started by the grader (and in any IPython session) record() refuses."""
    monkeypatch.setenv(UNDER_GRADER, "1")
    with pytest.raises(PermissionError, match="written by glalearn grade only"):
        progress.record(tmp_path / "01_x.ipynb", _grade(tmp_path / "01_x.ipynb", {"1.1": "passed"}))
    assert not progress.progress_dir().exists()


def _hammer(args):
    """Record one shared notebook and one of its own, many times (runs in another process)."""
    folder, worker, rounds = args
    os.environ["GLALEARN_PROGRESS"] = folder
    shared, own = Path(folder).parent / "02_parallel_form.ipynb", Path(folder).parent / f"own_{worker}.ipynb"
    problems = []
    for i in range(rounds):
        status = "passed" if (i + worker) % 2 else "failed"
        problems += progress.record(shared, _grade(shared, {"2.1": status, "2.2": "failed"}))
        problems += progress.record(own, _grade(own, {"5.1": status}))
        problems += progress.load().problems
    return problems


def test_concurrent_graders_never_leave_a_broken_record(tmp_path):
    folder = str(progress.progress_dir())
    workers, rounds = 4, 15
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        problems = pool.map(_hammer, [(folder, w, rounds) for w in range(workers)])
    assert problems == [[]] * workers, problems  # no reader ever saw a half-written or invalid file
    loaded = progress.load()
    assert loaded.problems == [] and len(loaded.records) == workers + 1
    assert not [p for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".bak"))]


def test_the_progress_folder_must_be_a_folder(tmp_path, monkeypatch, capsys):
    from glalearn import cli

    (tmp_path / "a file").write_text("x")
    monkeypatch.setenv("GLALEARN_PROGRESS", str(tmp_path / "a file"))
    assert cli.main(["progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glalearn progress: error: ") and "is a file" in err[0]
