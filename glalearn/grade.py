"""Grade exercise notebooks: `glalearn grade NOTEBOOK... [--json FILE] [--timeout SECONDS] [--jobs N]`.

The verdict is computed here, outside the notebook. Each notebook runs top to bottom in a fresh kernel
(nbclient), continuing after errors, with a time limit per cell (default 120 s). Right after each check
cell (``glalearn.check("3.2", chunk_states)``) the grader runs one cell of its own, the probe: this
process draws fresh random inputs, writes them to a private temporary folder just before the probe,
the probe calls the learner's function on them in the kernel — with the library's own answer to the
exercise made to raise — and writes back what it returned, which this process reads at once, compares
with the reference it holds and deletes. Nothing the notebook prints or displays is read, and
redefining ``glalearn.check`` changes nothing. An exercise whose probe wrote nothing is graded from
how its cells ran:

    timed out    the probe (the learner's function on the grader's inputs), the check cell or a cell
                 since the previous check ran past the time limit (the kernel is interrupted —
                 restarted, with the earlier cells replayed, if it does not answer — and grading goes on)
    error        the learner's function raised, is not there (e.g. its cell had a SyntaxError, whose
                 error is quoted), or called the library's answer
    not started / failed / passed    as the comparison found them

The scorecard lists ID, title, status, points and the first line of the reason (wrapped, never cut),
then the total. ``--jobs N`` grades N notebooks at once (separate processes and kernels; scorecards keep
the given order). The result of every graded notebook is recorded for `glalearn progress` (one record
per notebook, by exercise ID, wherever the notebook lives; ``--no-record`` skips it).

``--json FILE`` writes, for one notebook, one object
    {"notebook", "score", "max_score", "exercises": [{"id", "title", "status", "points", "max_points",
    "message", "seed"}]}
and for several notebooks a list of such objects, in the order given.

Exit status: 0 when every exercise passed, 1 otherwise, 2 for usage errors (one line on stderr: a
missing file, a file that is not a notebook, a bad option).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glalearn.checks.core import ERROR, PASSED, TIMED_OUT, UNDER_GRADER

CHECK_CALL = re.compile(r"\bcheck\(\s*[\"']([0-9]+\.[0-9]+)[\"']")
PROBE_SECONDS = 15  # how long an interrupted kernel gets to answer before it is restarted
MAX_RESTARTS = 3  # per notebook; after that the remaining cells are not run
_TIMEOUT = "GlalearnCellTimeout"
PROBE_TAG = "glalearn-grader-probe"


@dataclass
class ExerciseGrade:
    id: str
    title: str
    status: str
    points: int
    max_points: int
    message: str
    seed: int | None = None


@dataclass
class NotebookGrade:
    notebook: str
    exercises: list[ExerciseGrade] = field(default_factory=list)

    @property
    def score(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def max_score(self) -> int:
        return sum(e.max_points for e in self.exercises)

    @property
    def all_passed(self) -> bool:
        return all(e.status == PASSED for e in self.exercises)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "score": self.score, "max_score": self.max_score,
                "exercises": [asdict(e) for e in self.exercises]}

    def scorecard(self, width: int | None = None) -> str:
        """ID, title, status, points, then the first line of each message, wrapped to ``width`` columns
        (default: the terminal's width, at least 100)."""
        if width is None:
            width = max(100, shutil.get_terminal_size((120, 24)).columns)
        rows = [("id", "title", "status", "points")] + [
            (e.id, e.title, e.status, f"{e.points}/{e.max_points}") for e in self.exercises]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        indent = 2 + sum(w + 2 for w in widths)
        lines = [self.notebook]
        for i, r in enumerate(rows):
            head = "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))
            message = "message" if i == 0 else _first_line(self.exercises[i - 1].message)
            wrapped = textwrap.wrap(message, max(30, width - indent), break_on_hyphens=False) or [""]
            lines.append(head + "  " + wrapped[0])
            lines += [" " * indent + part for part in wrapped[1:]]
        passed = sum(e.status == PASSED for e in self.exercises)
        lines.append(f"  total: {self.score}/{self.max_score} points, {passed}/{len(self.exercises)} exercises passed")
        return "\n".join(lines)


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


@dataclass
class CellRun:
    """How one code cell ran: 'ok', 'error' (with ename/evalue), 'timeout' or 'not run'."""

    state: str = "not run"
    ename: str = ""
    evalue: str = ""


# ----------------------------------------------------------------------------- the plan
@dataclass
class CheckCall:
    """One ``check("ID", expr)`` call of a cell: the ID and the source of the function argument."""

    exercise_id: str
    function: str | None  # None when the cell does not parse


def check_calls(source: str) -> list[CheckCall]:
    """The check calls of a cell, in order (by regex when the cell does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return [CheckCall(i, None) for i in CHECK_CALL.findall(source)]
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name != "check" or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        exercise_id = node.args[0].value
        if not isinstance(exercise_id, str) or not re.fullmatch(r"[0-9]+\.[0-9]+", exercise_id):
            continue
        fn = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "fn"), None)
        calls.append(CheckCall(exercise_id, ast.get_source_segment(source, fn) if fn is not None else None))
    return sorted(calls, key=lambda c: source.find(c.exercise_id))


def probe_source(exercise_id: str, function: str, folder: str) -> str:
    return (f'__import__("glalearn.checks.probe", fromlist=["answer"]).answer('
            f'{exercise_id!r}, lambda: ({function}), {folder!r})')


# ----------------------------------------------------------------------------- execution
def _first_error(cell) -> tuple[str, str] | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return out.get("ename", ""), out.get("evalue", "")
    return None


Hook = Callable[[], None]


def execute(nb, cwd: str | Path, timeout: float = 120, hooks: dict[int, tuple[Hook, Hook]] | None = None,
            env: dict | None = None) -> dict[int, CellRun]:
    """Run every code cell of ``nb`` in place in a fresh kernel; return how each cell ran.

    ``hooks[i] = (before, after)`` run in this process around cell i (the grader's probes). Errors do
    not stop the run. A cell past ``timeout`` seconds is interrupted; if the kernel does not answer
    within PROBE_SECONDS it is restarted and the cells that ran cleanly before are replayed (their
    outputs discarded; probes and check cells are not replayed) so later exercises still see their
    definitions.
    """
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbformat.v4 import new_code_cell

    hooks = hooks or {}

    class Client(NotebookClient):
        """Remembers the content of the last execute_reply (to tell a timeout from other errors)."""

        last_reply: dict | None = None

        async def _check_raise_for_error(self, cell, cell_index, exec_reply):
            self.last_reply = (exec_reply or {}).get("content", {})
            return await super()._check_raise_for_error(cell, cell_index, exec_reply)

    runs: dict[int, CellRun] = {}
    # On a timeout nbclient interrupts the kernel and answers with this error at once; it also stops
    # listening for the cell's output, so no stray listener steals the next cells' messages.
    client = Client(nb, timeout=timeout, kernel_name="python3", allow_errors=True, record_timing=False,
                    interrupt_on_timeout=True,
                    error_on_timeout={"ename": _TIMEOUT, "evalue": "", "traceback": []},
                    resources={"metadata": {"path": str(cwd)}})

    def run(cell, index, seconds) -> CellRun:
        client.timeout = seconds
        client.last_reply = {}
        original = nb.cells[index]  # nbclient stores the executed cell at nb.cells[index]: keep ours
        try:
            client.execute_cell(cell, index)
        except CellTimeoutError:
            return CellRun("timeout", "TimeoutError", f"{seconds:g} s")
        except DeadKernelError:
            return CellRun("error", "DeadKernelError", "the kernel died while running this cell")
        finally:
            client.timeout = timeout
            nb.cells[index] = original
        if (client.last_reply or {}).get("ename") == _TIMEOUT:
            return CellRun("timeout", "TimeoutError", f"{seconds:g} s")
        err = _first_error(cell)
        return CellRun("error", *err) if err else CellRun("ok")

    def replayable(i: int) -> bool:
        cell = nb.cells[i]
        return (runs.get(i, CellRun()).state == "ok" and not CHECK_CALL.search(cell.source)
                and PROBE_TAG not in cell.metadata.get("tags", []))

    def restart_and_replay(upto: int) -> bool:
        """A fresh kernel with the clean cells before ``upto`` replayed; False if that fails too."""
        run_sync(client.km.restart_kernel)(now=True)
        run_sync(client.kc.wait_for_ready)(timeout=60)
        for i in range(upto):
            if replayable(i) and run(copy.deepcopy(nb.cells[i]), i, max(timeout, 60)).state == "timeout":
                return False
        return True

    restarts = 0
    kwargs = {"stderr": subprocess.DEVNULL}
    if env is not None:
        kwargs["env"] = env
    with client.setup_kernel(**kwargs):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            if restarts > MAX_RESTARTS:
                runs[index] = CellRun("not run", "KernelUnresponsive",
                                      f"not run: the kernel was restarted {MAX_RESTARTS} times and still hangs")
                continue
            before, after = hooks.get(index, (None, None))
            if before is not None:
                before()
            try:
                result = run(cell, index, timeout)
            finally:
                if after is not None:
                    after()
            runs[index] = result
            if result.state == "timeout":
                why = f"the cell ran past the time limit of {result.evalue}"
                cell.outputs.append({"output_type": "error", "ename": result.ename, "evalue": why,
                                     "traceback": [f"{result.ename}: {why}"]})
                if run(new_code_cell("pass"), index, PROBE_SECONDS).state != "ok":
                    restarts += 1
                    if not restart_and_replay(index):
                        restarts = MAX_RESTARTS + 1
            elif result.ename == "DeadKernelError":
                restarts += 1
                if not restart_and_replay(index):
                    restarts = MAX_RESTARTS + 1
    return runs


# ----------------------------------------------------------------------------- grading
@dataclass
class _Probe:
    """One exercise's probe: where it runs, its cases (kept here) and what came back."""

    spec: object
    function: str
    folder: Path
    seed: int = 0
    cases: list = field(default_factory=list)
    answers: list | None = None
    index: int = -1  # the probe cell's index in the executed notebook


def _with_probes(nb, probes: dict[str, _Probe]) -> tuple[object, dict[int, int]]:
    """A copy of ``nb`` with a probe cell after each check cell; and executed index -> original index."""
    from nbformat.v4 import new_code_cell

    out = copy.deepcopy(nb)
    cells, origin = [], {}
    for i, cell in enumerate(nb.cells):
        origin[len(cells)] = i
        cells.append(copy.deepcopy(cell))
        if cell.cell_type != "code":
            continue
        for call in check_calls(cell.source):
            probe = probes.get(call.exercise_id)
            if probe is None or probe.index >= 0:
                continue
            probe.index = len(cells)
            probe_cell = new_code_cell(probe_source(call.exercise_id, probe.function, str(probe.folder)))
            probe_cell.metadata["tags"] = [PROBE_TAG]
            cells.append(probe_cell)
    out.cells = cells
    return out, origin


def _hooks(probes: dict[str, _Probe]) -> dict[int, tuple[Hook, Hook]]:
    """Write a probe's inputs just before it runs; read its answers just after and delete the folder,
    so that no other cell of the notebook ever sees either."""
    from glalearn.checks.core import draw_cases
    from glalearn.checks.exchange import load_answers, save_cases

    hooks = {}
    for probe in probes.values():
        def before(p=probe):
            p.seed, p.cases = draw_cases(p.spec)
            save_cases(p.folder, p.cases)

        def after(p=probe):
            try:
                p.answers = load_answers(p.folder)
            except Exception:  # noqa: BLE001  (a half-written or tampered file: no answers)
                p.answers = None
            shutil.rmtree(p.folder, ignore_errors=True)
        hooks[probe.index] = (before, after)
    return hooks


def grade_cells(nb, runs: dict[int, CellRun], notebook_name: str, stem: str,
                probes: dict[str, _Probe] | None = None, origin: dict[int, int] | None = None) -> NotebookGrade:
    """Score an executed notebook from its probes' answers and how its cells ran.

    ``nb`` is the notebook as executed (probe cells included), ``origin`` maps its cell indices to the
    learner's notebook (for messages), ``probes`` holds what each exercise's probe brought back.
    """
    from glalearn import checks
    from glalearn.checks.core import evaluate

    probes = probes or {}
    origin = origin if origin is not None else {i: i for i in range(len(nb.cells))}
    check_cells: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and PROBE_TAG not in cell.metadata.get("tags", []):
            for call in check_calls(cell.source):
                check_cells.setdefault(call.exercise_id, index)
    registered = {e.id: e for e in checks.for_notebook(stem)}
    ids = list(registered) + [i for i in sorted(check_cells, key=check_cells.get) if i not in registered]
    grade = NotebookGrade(notebook_name)
    # where each exercise's span of cells ends: its probe when there is one, else its check cell
    ends = {i: (probes[i].index if i in probes and probes[i].index >= 0 else check_cells[i]) for i in check_cells}
    end_positions = sorted(ends.values())
    for exercise_id in ids:
        spec = registered.get(exercise_id)
        if spec is None:
            try:
                spec = checks.get(exercise_id)
            except ValueError:
                spec = None
        title = spec.title if spec else "?"
        max_points = spec.points if spec else 0
        probe, seed = probes.get(exercise_id), None
        if exercise_id not in check_cells:
            status, message = ERROR, f'no check cell: the notebook never calls glalearn.check("{exercise_id}", ...)'
        elif spec is None:
            status, message = ERROR, f"unknown exercise {exercise_id!r}"
        elif probe is not None and probe.answers is not None and len(probe.answers) == len(probe.cases):
            try:
                result = evaluate(spec, probe.cases, probe.answers, probe.seed)
                status, message, seed = result.status, result.message, probe.seed
            except Exception as exc:  # noqa: BLE001  (say so in the scorecard rather than crash the grader)
                status, message = ERROR, f"the grader could not compare the answers: {type(exc).__name__}: {exc}"
            raised = probe.answers[0].raised if probe.answers else None
            if raised is not None and raised.setup and raised.type == "NameError":
                _, cell_message = _status_from_cells(ends[exercise_id], end_positions, runs, origin)
                if cell_message.startswith(("SyntaxError", "IndentationError")) or "(in cell" in cell_message:
                    message = cell_message  # the learner's first error says more than the missing name
        else:
            status, message = _status_from_cells(ends[exercise_id], end_positions, runs, origin)
        points = max_points if status == PASSED else 0
        grade.exercises.append(ExerciseGrade(exercise_id, title, status, points, max_points, message, seed))
    return grade


def _status_from_cells(end: int, end_positions: list[int], runs: dict[int, CellRun],
                       origin: dict[int, int]) -> tuple[str, str]:
    """The status of an exercise whose probe brought nothing back, from how its cells ran."""
    previous = max([p for p in end_positions if p < end], default=-1)
    span = [i for i in sorted(runs) if previous < i <= end]
    timed_out = [i for i in span if runs[i].state == "timeout"]
    if timed_out:
        i = timed_out[-1]
        where = "your function, run on the grader's inputs," if i not in origin else f"cell {origin[i] + 1}"
        return TIMED_OUT, f"{where} ran past the time limit of {runs[i].evalue} (an endless loop?)"
    errors = [i for i in span if runs[i].state == "error"]
    if errors:
        first, last = errors[0], errors[-1]
        where = f"in cell {origin[first] + 1}" if first in origin else "in your function, run on the grader's inputs"
        text = f"{runs[first].ename}: {runs[first].evalue} ({where})"
        if last != first:
            text += f"; then {runs[last].ename}: {runs[last].evalue}"
        return ERROR, text
    not_run = [i for i in span if runs[i].state == "not run"]
    if not_run:
        return ERROR, runs[not_run[0]].evalue or "the check cell did not run"
    return ERROR, "the function's answers did not come back from the kernel (was the kernel restarted?)"


def grade_notebook(path: str | Path, timeout: float = 120) -> NotebookGrade:
    """Execute one notebook (a copy; the file is not changed) and grade it."""
    import nbformat

    from glalearn import checks

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    workdir = Path(tempfile.mkdtemp(prefix="glalearn-grade-"))
    try:
        probes: dict[str, _Probe] = {}
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            for call in check_calls(cell.source):
                try:
                    spec = checks.get(call.exercise_id)
                except ValueError:
                    continue
                if call.exercise_id not in probes:
                    function = call.function or spec.function_name
                    probes[call.exercise_id] = _Probe(spec, function, workdir / call.exercise_id.replace(".", "_"))
        executed, origin = _with_probes(nb, probes)
        env = {**os.environ, UNDER_GRADER: "1"}
        runs = execute(executed, path.parent.resolve(), timeout, hooks=_hooks(probes), env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    name = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    return grade_cells(executed, runs, name, path.stem, probes, origin)


# ----------------------------------------------------------------------------- command line
def _usage_problem(path: Path) -> str:
    if not path.exists():
        return f"{path}: no such file"
    if path.is_dir():
        return f"{path}: is a directory, not a notebook"
    if path.suffix != ".ipynb":
        return f"{path}: not a notebook (expected a .ipynb file)"
    try:
        import nbformat

        nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001  (unreadable JSON, wrong schema, ...)
        return f"{path}: not a readable notebook ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return ""


def main(argv=None) -> int:
    from glalearn.clierror import OneLineParser, UserError

    parser = OneLineParser(prog="glalearn grade", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path, help="exercise (or solutions) notebooks")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the scores as JSON")
    parser.add_argument("--timeout", type=float, default=120, metavar="SECONDS", help="per cell (default 120)")
    parser.add_argument("--no-record", action="store_true", help="do not record the scores for glalearn progress")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="grade N notebooks at once, each in its own kernel (default 1)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UserError(f"--timeout must be a finite number of seconds > 0, got {args.timeout:g}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    problems = [p for p in (_usage_problem(path) for path in args.notebooks) if p]
    if problems:
        raise UserError("; ".join(problems))
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        what = "is a directory" if args.json.is_dir() else f"its folder {args.json.parent} does not exist"
        raise UserError(f"--json {args.json}: {what}; expected a file to write")
    if not _has_cuda():  # CPU: any Triton kernel in a notebook runs in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    grades = []
    for grade in _grade_all(args.notebooks, args.timeout, args.jobs):
        grades.append(grade)
        print(grade.scorecard(), flush=True)
    if len(grades) > 1:
        print(f"overall: {sum(g.score for g in grades)}/{sum(g.max_score for g in grades)} points "
              f"in {len(grades)} notebooks")
    if args.json:
        data = grades[0].to_json() if len(grades) == 1 else [g.to_json() for g in grades]
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not args.no_record:
        _record(args.notebooks, grades)
    return 0 if all(g.all_passed for g in grades) else 1


def _record(paths: list[Path], grades: list[NotebookGrade]) -> None:
    """Record every grade for `glalearn progress`; a problem with the records is a warning, never a crash."""
    from glalearn import progress

    for path, grade in zip(paths, grades):
        try:
            problems = progress.record(path, grade)
        except (OSError, ValueError) as exc:
            problems = [f"could not record the grade of {path}: {exc}"]
        for problem in problems:
            print(f"glalearn grade: warning: {problem}", file=sys.stderr)


def _grade_all(paths: list[Path], timeout: float, jobs: int):
    """Grade notebooks in the order given; with jobs > 1, that many at once (each its own process and kernel)."""
    if jobs <= 1 or len(paths) == 1:
        for path in paths:
            yield grade_notebook(path, timeout=timeout)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(paths)), mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(grade_notebook, paths, [timeout] * len(paths))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    from glalearn.clierror import guarded

    sys.exit(guarded("glalearn grade", main))
