"""exercises/ is generated from solutions/: stubs, cleared outputs, marker errors, and staleness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from glalearn import checks, exercises
from glalearn.exercises import BEGIN, END, MarkerError

ROOT = Path(__file__).resolve().parents[1]


def test_exercises_folder_is_up_to_date_with_solutions():
    """CI fails when someone edits solutions/ (or exercises/) without `python -m glalearn.exercises build`."""
    problems = exercises.stale()
    assert not problems, "run `python -m glalearn.exercises build`: " + "; ".join(problems)


def test_every_exercise_notebook_has_one_stub_per_exercise_and_no_solution_or_output():
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert BEGIN not in text and END not in text, path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        for ex in checks.for_notebook(path.stem):
            stub = f'raise NotImplementedError("Exercise {ex.id} ({ex.title}): write your solution here")'
            assert stub in text, f"{path.name} lacks the stub of {ex.id}"
        assert nb.metadata["kernelspec"]["name"] == "python3"


def _write(tmp_path: Path, sources: list[str], name="03_chunkwise.ipynb") -> Path:
    solutions = tmp_path / "solutions"
    solutions.mkdir(exist_ok=True)
    cells = [new_markdown_cell("# t")]
    for src in sources:
        cell = new_code_cell(src)
        cell.outputs = [nbformat.v4.new_output("stream", text="old output\n")]
        cell.execution_count = 3
        cells.append(cell)
    path = solutions / name
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


def test_build_replaces_regions_by_stubs_at_their_indentation_and_clears_outputs(tmp_path):
    source = ("def chunk_states(k, v, G, S0=None):\n    x = 1\n    ### BEGIN SOLUTION\n    secret = 42\n"
              "    if secret:\n        pass\n    ### END SOLUTION\n    return x")
    _write(tmp_path, [source, 'glalearn.check("3.2", chunk_states)'])
    built = exercises.build(tmp_path / "solutions", tmp_path / "exercises")
    nb = nbformat.read(built[0], as_version=4)
    code = nb.cells[1].source
    assert code == ("def chunk_states(k, v, G, S0=None):\n    x = 1\n"
                    '    raise NotImplementedError("Exercise 3.2 (chunk states): write your solution here")\n    return x')
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert exercises.stale(tmp_path / "solutions", tmp_path / "exercises") == []


@pytest.mark.parametrize(("source", "words"), [
    (f"{BEGIN}\na\n{BEGIN}\nb\n{END}\n{END}", "line 3: nested ### BEGIN SOLUTION (one is already open since line 1)"),
    (f"x = 1\n{BEGIN}\na", "line 2: ### BEGIN SOLUTION is never closed"),
    (f"a\n{END}", "line 2: ### END SOLUTION without a ### BEGIN SOLUTION"),
])
def test_bad_markers_are_errors_naming_notebook_cell_and_line(tmp_path, source, words):
    _write(tmp_path, [source, 'glalearn.check("3.2", f)'])
    with pytest.raises(MarkerError) as info:
        exercises.build(tmp_path / "solutions", tmp_path / "exercises")
    assert f"03_chunkwise.ipynb, cell 2, {words}" in str(info.value)


def test_a_region_without_a_following_check_is_an_error(tmp_path):
    _write(tmp_path, ['glalearn.check("3.2", f)', f"{BEGIN}\na\n{END}"])
    with pytest.raises(MarkerError, match="cell 3, line 1: a solution region with no glalearn.check"):
        exercises.build(tmp_path / "solutions", tmp_path / "exercises")


def test_stale_detection_and_the_check_command(tmp_path):
    _write(tmp_path, [f"def f():\n    {BEGIN}\n    return 1\n    {END}", 'glalearn.check("5.1", f)'])
    sol, ex = tmp_path / "solutions", tmp_path / "exercises"
    assert exercises.stale(sol, ex) == ["03_chunkwise.ipynb: missing"]
    exercises.build(sol, ex)
    assert exercises.stale(sol, ex) == []
    (ex / "03_chunkwise.ipynb").write_text((ex / "03_chunkwise.ipynb").read_text().replace("Exercise 5.1", "Ex 5.1"))
    (ex / "99_orphan.ipynb").write_text("{}")
    assert exercises.stale(sol, ex) == ["03_chunkwise.ipynb: differs from its solutions notebook",
                                        "99_orphan.ipynb: has no solutions notebook"]
    cmd = [sys.executable, "-m", "glalearn.exercises", "check", "--solutions", str(sol), "--exercises", str(ex)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the command CI would run
    assert done.returncode == 1 and "stale" in done.stderr and "99_orphan.ipynb" in done.stderr
    exercises.build(sol, ex)
    assert not (ex / "99_orphan.ipynb").exists()
    assert exercises.main(["check", "--solutions", str(sol), "--exercises", str(ex)]) == 0
