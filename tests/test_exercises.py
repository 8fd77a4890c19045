"""exercises/ is generated from solutions/: stubs, cleared outputs, marker errors, and staleness."""

from __future__ import annotations

import re
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


# ----------------------------------------------------------------------------- every stub has one form
def _stub_functions(path: Path):
    """(exercise ID, the function or kernel definition) of every stub of an exercise notebook."""
    import ast

    from glalearn.grade import check_calls

    nb = nbformat.read(path, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    for i, source in enumerate(code):
        if "raise NotImplementedError(\"Exercise " not in source:
            continue
        exercise_id = next(c.exercise_id for s in code[i:] for c in check_calls(s))
        defs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
        assert len(defs) == 1, f"{path.name}: one function per exercise cell, got {[d.name for d in defs]}"
        yield exercise_id, defs[0]


@pytest.mark.parametrize("path", sorted((ROOT / "exercises").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_stub_is_a_signature_a_docstring_with_shapes_and_raise_nothing_after(path):
    import ast

    seen = []
    for exercise_id, fn in _stub_functions(path):
        ex = checks.get(exercise_id)
        seen.append(exercise_id)
        assert fn.name == ex.function_name, (exercise_id, fn.name)
        params = [a.arg for a in fn.args.args]
        assert params == ex.parameters, (exercise_id, params, ex.parameters)
        doc = ast.get_docstring(fn)
        assert doc and re.search(r"\[[A-Z]", doc), f"{exercise_id}: the docstring must give the shapes"
        assert any(d in doc for d in ("float64", "float32", "int64")), f"{exercise_id}: the docstring names no dtype"
        assert len(fn.body) == 2, f"{exercise_id}: the stub must be the docstring and the raise, nothing after"
        raise_ = fn.body[1]
        assert isinstance(raise_, ast.Raise) and raise_.exc.func.id == "NotImplementedError", exercise_id
        assert ast.literal_eval(raise_.exc.args[0]) == f"Exercise {ex.id} ({ex.title}): write your solution here"
        decorators = [ast.unparse(d) for d in fn.decorator_list]
        assert decorators == (["triton.jit"] if ex.is_kernel else []), (exercise_id, decorators)
    assert seen == [e.id for e in checks.for_notebook(path.stem)]


def test_every_statement_cell_is_the_registrys_statement():
    """The solutions notebooks state each exercise exactly as glalearn.describe does (one source)."""
    for ex in checks.exercises().values():
        nb = nbformat.read(ROOT / "solutions" / f"{ex.notebook}.ipynb", as_version=4)
        cells = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith(f"## Exercise {ex.id} ")]
        assert cells == [exercises.statement_markdown(ex)], f"{ex.notebook}: the statement of {ex.id} differs"


def test_exercise_5_2_cites_the_section_chapter_5_cites():
    chapter = (ROOT / "chapters" / "05_backward.ipynb").read_text(encoding="utf-8")
    assert "§4.3, *memory-efficient dα computation*" in chapter
    assert "§4.3, *memory-efficient dα computation*" in checks.get("5.2").statement


@pytest.mark.slow
def test_run_all_goes_through_a_wrong_and_a_right_solution_and_shows_both_verdicts():
    """nbclient runs every cell with errors not allowed (Run All in JupyterLab stops at the first error):
    exercise 1.1 filled in wrongly, 1.2 rightly, 1.3 left as its stub."""
    from nbclient import NotebookClient

    path = ROOT / "exercises" / "01_linear_attention_and_the_gate.ipynb"
    nb = nbformat.read(path, as_version=4)
    wrong_step = ("    new_state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # forgot the gate\n"
                  "    return scale * (q_t.unsqueeze(-2) @ new_state).squeeze(-2), new_state")
    right_form = ("    B, T, H, K = q.shape\n    scale = K ** -0.5 if scale is None else scale\n"
                  "    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state\n"
                  "    outs = []\n    for t in range(T):\n"
                  "        S = g[:, t].exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)\n"
                  "        outs.append(scale * (q[:, t].unsqueeze(-2) @ S).squeeze(-2))\n"
                  "    return torch.stack(outs, 1), S")
    for cell in nb.cells:
        if 'raise NotImplementedError("Exercise 1.1 ' in cell.source:
            cell.source = cell.source.split("    raise NotImplementedError")[0] + wrong_step
        if 'raise NotImplementedError("Exercise 1.2 ' in cell.source:
            cell.source = cell.source.split("    raise NotImplementedError")[0] + right_form
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]
    assert not [o for _, o in outputs if o.output_type == "error"]
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "every cell ran"
    checks_out = {i: "".join(o.get("text", "") for o in c.outputs) for i, c in enumerate(nb.cells)
                  if c.cell_type == "code" and "glalearn.check(" in c.source}
    texts = list(checks_out.values())
    assert len(texts) == 3
    assert "✗ Exercise 1.1 (one recurrent step): failed, 0/1 points — likely mistake: the gate is missing" in texts[0]
    assert texts[1].count("✓ Exercise 1.2 (the recurrent form): passed, 2/2 points") == 1  # shown once, no echo
    assert texts[2].startswith("○ Exercise 1.3 (the gate parameterization): not started")
    assert not [o for _, o in outputs if o.output_type == "execute_result"], "the returned result is not echoed"
