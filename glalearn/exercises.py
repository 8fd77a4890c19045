"""Exercises from solutions: `python -m glalearn.exercises build | check`.

    python -m glalearn.exercises build   # write exercises/NN_slug.ipynb from solutions/NN_slug.ipynb
    python -m glalearn.exercises check   # exit 1 if exercises/ differs from what build would write

``solutions/`` is the single source. In a code cell, every region

    ### BEGIN SOLUTION
    ...the worked answer...
    ### END SOLUTION

(nbgrader's markers) becomes one line, at the indentation of the BEGIN marker,

    raise NotImplementedError("Exercise 3.2 (chunk states): write your solution here")

The exercise ID is that of the first ``glalearn.check("3.2", ...)`` call at or after the cell; its
title comes from the registry (``glalearn.checks``). Outputs are cleared and execution counts reset.
Nested, unclosed or unopened markers are errors naming the notebook, the cell and the line.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CHECK_CALL = re.compile(r"\bcheck\(\s*[\"']([0-9]+\.[0-9]+)[\"']")


class MarkerError(ValueError):
    """A solution notebook's markers are nested, unclosed or unopened, or a region has no check."""


def statement_markdown(exercise) -> str:
    """The markdown cell that states an exercise in its solutions notebook (and so in exercises/).

    Generated from the registry (``glalearn.checks``), so the notebook and ``glalearn.describe`` say the
    same; ``tests/test_exercises.py`` fails when a notebook's statement cell differs from it.
    """
    plural = "s" if exercise.points != 1 else ""
    return (f"## Exercise {exercise.id} · {exercise.title} ({exercise.points} point{plural})\n\n"
            f"{exercise.statement}\n\n`{exercise.signature}`")


def stub_line(indent: str, exercise_id: str, title: str) -> str:
    return f'{indent}raise NotImplementedError("Exercise {exercise_id} ({title}): write your solution here")'


def _check_ids(cells) -> list[str | None]:
    """For each cell, the ID of the first check call at or after it (None if there is none)."""
    ids: list[str | None] = [None] * len(cells)
    upcoming = None
    for i in reversed(range(len(cells))):
        if cells[i].cell_type == "code":
            found = CHECK_CALL.findall(cells[i].source)
            if found:
                upcoming = found[0]
        ids[i] = upcoming
    return ids


def strip_solutions(source: str, where: str, exercise_id: str | None, title_of) -> str:
    """Replace each BEGIN/END region of one cell's source by a stub line. ``where`` names the cell."""
    out: list[str] = []
    opened_at = None
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if opened_at is not None:
                raise MarkerError(f"{where}, line {number}: nested {BEGIN} (one is already open since line {opened_at})")
            if exercise_id is None:
                raise MarkerError(f"{where}, line {number}: a solution region with no glalearn.check(\"ID\", ...) "
                                  "call at or after this cell, so its exercise ID is unknown")
            opened_at = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(stub_line(indent, exercise_id, title_of(exercise_id)))
        elif marker == END:
            if opened_at is None:
                raise MarkerError(f"{where}, line {number}: {END} without a {BEGIN} before it")
            opened_at = None
        elif opened_at is None:
            out.append(line)
    if opened_at is not None:
        raise MarkerError(f"{where}, line {opened_at}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def _registered_title(exercise_id: str) -> str:
    from glalearn import checks

    try:
        return checks.get(exercise_id).title
    except ValueError:
        raise MarkerError(f"exercise {exercise_id} is not registered in glalearn.checks "
                          f"(known: {', '.join(checks.exercises())})") from None


def build_notebook(solution_path: str | Path, title_of=_registered_title):
    """The exercise notebook (an nbformat node) generated from one solutions notebook."""
    import nbformat

    solution_path = Path(solution_path)
    nb = nbformat.read(solution_path, as_version=4)
    ex = copy.deepcopy(nb)
    ids = _check_ids(ex.cells)
    for index, cell in enumerate(ex.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        where = f"{solution_path.name}, cell {index + 1}"
        cell.source = strip_solutions(cell.source, where, ids[index], title_of)
        cell.outputs = []
        cell.execution_count = None
    return ex


def render(nb) -> str:
    """The exact text build writes for a notebook (so check can compare byte for byte)."""
    import nbformat

    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _plan(solutions: Path, exercises: Path) -> dict[Path, str]:
    paths = sorted(solutions.glob("*.ipynb"))
    return {exercises / p.name: render(build_notebook(p)) for p in paths}


def build(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> list[Path]:
    """Write every exercise notebook; remove generated notebooks whose solution is gone."""
    plan = _plan(solutions, exercises)
    exercises.mkdir(parents=True, exist_ok=True)
    for path, text in plan.items():
        path.write_text(text, encoding="utf-8")
    for path in exercises.glob("*.ipynb"):
        if path not in plan:
            path.unlink()
    return list(plan)


def stale(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> list[str]:
    """Why exercises/ differs from what build would write (empty when up to date)."""
    plan = _plan(solutions, exercises)
    problems = []
    for path, text in plan.items():
        if not path.exists():
            problems.append(f"{path.name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.name}: differs from its solutions notebook")
    for path in sorted(exercises.glob("*.ipynb")):
        if path not in plan:
            problems.append(f"{path.name}: has no solutions notebook")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glalearn.exercises", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--solutions", type=Path, default=SOLUTIONS)
    parser.add_argument("--exercises", type=Path, default=EXERCISES)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for path in build(args.solutions, args.exercises):
                print(f"wrote {path}")
            return 0
        problems = stale(args.solutions, args.exercises)
    except MarkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if problems:
        print("exercises/ is stale (run `python -m glalearn.exercises build`):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"exercises/ is up to date ({len(list(args.solutions.glob('*.ipynb')))} notebooks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
