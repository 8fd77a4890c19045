"""Grade exercise notebooks: `glalearn grade NOTEBOOK... [--json FILE] [--timeout SECONDS]`.

Each notebook runs top to bottom in a fresh kernel (nbclient), continuing after errors, with a time
limit per cell (default 120 s). Every ``glalearn.check(...)`` publishes its result as a display output
of MIME type ``application/vnd.glalearn.check+json``; the grader reads those from the executed
notebook. An exercise whose check cell produced no result is graded from the cells' errors:

    timed out    its check cell, or a cell since the previous check, ran past the time limit
                 (the kernel is interrupted — restarted, with the earlier cells replayed, if it does
                 not answer — and grading goes on)
    error        the check cell raised before a result (e.g. a SyntaxError or NameError from the
                 learner's cell, whose error is quoted)
    not started / failed / passed    as the check reported them

The scorecard lists ID, title, status, points and the first line of the reason, then the total.
``--jobs N`` grades N notebooks at once (separate processes and kernels; scorecards keep the given order).
The score of every graded notebook is recorded for `glalearn progress`.

``--json FILE`` writes, for one notebook, one object
    {"notebook", "score", "max_score", "exercises": [{"id", "title", "status", "points", "max_points",
    "message"}]}
and for several notebooks a list of such objects, in the order given.

Exit status: 0 when every exercise passed, 1 otherwise, 2 for usage errors (a missing file, or a file
that is not a notebook).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glalearn.checks.core import ERROR, MIME_TYPE, PASSED, TIMED_OUT

CHECK_CALL = re.compile(r"\bcheck\(\s*[\"']([0-9]+\.[0-9]+)[\"']")
PROBE_SECONDS = 15  # how long an interrupted kernel gets to answer before it is restarted
MAX_RESTARTS = 3  # per notebook; after that the remaining cells are not run
_TIMEOUT = "GlalearnCellTimeout"


@dataclass
class ExerciseGrade:
    id: str
    title: str
    status: str
    points: int
    max_points: int
    message: str


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

    def scorecard(self, width: int = 72) -> str:
        rows = [("id", "title", "status", "points", "message")]
        for e in self.exercises:
            message = e.message.strip().splitlines()[0] if e.message.strip() else ""
            if len(message) > width:
                message = message[: width - 1] + "…"
            rows.append((e.id, e.title, e.status, f"{e.points}/{e.max_points}", message))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [self.notebook]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        passed = sum(e.status == PASSED for e in self.exercises)
        lines.append(f"  total: {self.score}/{self.max_score} points, {passed}/{len(self.exercises)} exercises passed")
        return "\n".join(lines)


@dataclass
class CellRun:
    """How one code cell ran: 'ok', 'error' (with ename/evalue), 'timeout' or 'not run'."""

    state: str = "not run"
    ename: str = ""
    evalue: str = ""


# ----------------------------------------------------------------------------- execution
def _first_error(cell) -> tuple[str, str] | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return out.get("ename", ""), out.get("evalue", "")
    return None


def execute(nb, cwd: str | Path, timeout: float = 120) -> dict[int, CellRun]:
    """Run every code cell of ``nb`` in place in a fresh kernel; return how each cell ran.

    Errors do not stop the run. A cell past ``timeout`` seconds is interrupted; if the kernel does not
    answer within PROBE_SECONDS it is restarted and the cells that ran cleanly before are replayed
    (their outputs discarded) so later exercises still see their definitions.
    """
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbformat.v4 import new_code_cell

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

    def restart_and_replay(upto: int) -> bool:
        """A fresh kernel with the clean cells before ``upto`` replayed; False if that fails too."""
        run_sync(client.km.restart_kernel)(now=True)
        run_sync(client.kc.wait_for_ready)(timeout=60)
        for i in range(upto):
            clean = runs.get(i, CellRun()).state == "ok" and not CHECK_CALL.search(nb.cells[i].source)
            if clean and run(copy.deepcopy(nb.cells[i]), i, max(timeout, 60)).state == "timeout":
                return False
        return True

    restarts = 0
    with client.setup_kernel(stderr=subprocess.DEVNULL):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            if restarts > MAX_RESTARTS:
                runs[index] = CellRun("not run", "KernelUnresponsive",
                                      f"not run: the kernel was restarted {MAX_RESTARTS} times and still hangs")
                continue
            result = run(cell, index, timeout)
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
def _check_payloads(nb) -> dict[str, dict]:
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if out.get("output_type") in ("display_data", "execute_result") and MIME_TYPE in data:
                payload = data[MIME_TYPE]
                if isinstance(payload, str):
                    payload = json.loads(payload)
                found[payload["id"]] = payload
    return found


def grade_cells(nb, runs: dict[int, CellRun], notebook_name: str, stem: str) -> NotebookGrade:
    """Score an executed notebook from its check outputs and how its cells ran."""
    from glalearn import checks

    check_cells: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for exercise_id in CHECK_CALL.findall(cell.source):
                check_cells.setdefault(exercise_id, index)
    registered = {e.id: e for e in checks.for_notebook(stem)}
    ids = list(registered) + [i for i in sorted(check_cells, key=check_cells.get) if i not in registered]
    payloads = _check_payloads(nb)
    grade = NotebookGrade(notebook_name)
    check_positions = sorted(check_cells.values())
    for exercise_id in ids:
        spec = registered.get(exercise_id)
        if spec is None:
            try:
                spec = checks.get(exercise_id)
            except ValueError:
                spec = None
        title = spec.title if spec else "?"
        max_points = spec.points if spec else 0
        payload = payloads.get(exercise_id)
        if payload is not None:
            status, message = payload["status"], payload.get("message", "")
        elif exercise_id not in check_cells:
            status, message = ERROR, f'no check cell: the notebook never calls glalearn.check("{exercise_id}", ...)'
        else:
            status, message = _status_from_cells(check_cells[exercise_id], check_positions, runs)
        points = max_points if status == PASSED else 0
        grade.exercises.append(ExerciseGrade(exercise_id, title, status, points, max_points, message))
    return grade


def _status_from_cells(check_index: int, check_positions: list[int], runs: dict[int, CellRun]) -> tuple[str, str]:
    """The status of an exercise whose check cell gave no result, from how its cells ran."""
    previous = max([p for p in check_positions if p < check_index], default=-1)
    span = [i for i in sorted(runs) if previous < i < check_index]
    own = runs.get(check_index, CellRun())
    timed_out = [i for i in span + [check_index] if runs.get(i, CellRun()).state == "timeout"]
    if timed_out:
        i = timed_out[-1]
        where = "the check cell" if i == check_index else f"cell {i + 1}"
        return TIMED_OUT, f"{where} ran past the time limit of {runs[i].evalue} (an endless loop?)"
    errors = [i for i in span if runs[i].state == "error"]
    if own.state == "error":
        if errors:
            i = errors[0]
            return ERROR, f"{runs[i].ename}: {runs[i].evalue} (in cell {i + 1}); then {own.ename}: {own.evalue}"
        return ERROR, f"{own.ename}: {own.evalue}"
    if own.state == "not run":
        return ERROR, own.evalue or "the check cell did not run"
    return ERROR, "the check cell ran but published no result (is glalearn.check called in it?)"


def grade_notebook(path: str | Path, timeout: float = 120) -> NotebookGrade:
    """Execute one notebook (a copy; the file is not changed) and grade it."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    runs = execute(nb, path.parent.resolve(), timeout)
    name = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    return grade_cells(nb, runs, name, path.stem)


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
    parser = argparse.ArgumentParser(prog="glalearn grade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path, help="exercise (or solutions) notebooks")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the scores as JSON")
    parser.add_argument("--timeout", type=float, default=120, metavar="SECONDS", help="per cell (default 120)")
    parser.add_argument("--no-record", action="store_true", help="do not record the scores for glalearn progress")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="grade N notebooks at once, each in its own kernel (default 1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.timeout <= 0 or args.jobs < 1:
        print("glalearn grade: --timeout must be > 0 seconds and --jobs at least 1", file=sys.stderr)
        return 2
    problems = [p for p in (_usage_problem(path) for path in args.notebooks) if p]
    if problems:
        for p in problems:
            print(f"glalearn grade: {p}", file=sys.stderr)
        return 2
    if not _has_cuda():  # CPU: any Triton kernel in a notebook runs in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    grades = []
    for path, grade in zip(args.notebooks, _grade_all(args.notebooks, args.timeout, args.jobs)):
        grades.append(grade)
        print(grade.scorecard(), flush=True)
        if not args.no_record:
            from glalearn import progress

            progress.record(path, grade)
    if len(grades) > 1:
        print(f"overall: {sum(g.score for g in grades)}/{sum(g.max_score for g in grades)} points "
              f"in {len(grades)} notebooks")
    if args.json:
        data = grades[0].to_json() if len(grades) == 1 else [g.to_json() for g in grades]
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if all(g.all_passed for g in grades) else 1


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
    sys.exit(main())
