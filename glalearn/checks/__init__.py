"""Graded exercises: ``glalearn.check(exercise_id, fn)`` and the registry of exercise specs.

    import glalearn
    glalearn.check("3.2", chunk_states)           # run your function against the library
    glalearn.check("3.2", chunk_states, hint=1)   # ... with the first hint (2, 3: stronger)

Each chapter's exercises live in one module (``ch01.py`` ... ``ch10.py``) that defines ``NOTEBOOK``
(the stem of its notebook in ``solutions/`` and ``exercises/``) and ``EXERCISES`` (a list of
:class:`Exercise`). A new chapter's module is added with one line in :data:`CHAPTER_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from glalearn.checks.core import (
    _REGISTRY,
    ERROR,
    FAILED,
    NOT_STARTED,
    PASSED,
    STATUSES,
    TIMED_OUT,
    Answer,
    Case,
    CheckResult,
    Exercise,
    Mistake,
    check_exercise,
    collect_answers,
    evaluate,
    register,
    run_check,
    show_hints,
)

# One line per chapter with exercises: the module defines NOTEBOOK and EXERCISES.
CHAPTER_MODULES = (
    "glalearn.checks.ch01",
    "glalearn.checks.ch02",
    "glalearn.checks.ch03",
    "glalearn.checks.ch04",
    "glalearn.checks.ch05",
    "glalearn.checks.ch06",
    "glalearn.checks.ch07",
    "glalearn.checks.ch08",
    "glalearn.checks.ch09",
    "glalearn.checks.ch10",
)

_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module_name in CHAPTER_MODULES:
        module = importlib.import_module(module_name)
        for exercise in module.EXERCISES:
            register(exercise, module.NOTEBOOK)
    _loaded = True


def exercises() -> dict[str, Exercise]:
    """Every registered exercise, by ID, in chapter order."""
    _load()
    return dict(_REGISTRY)


def get(exercise_id: str) -> Exercise:
    """The spec of one exercise; a clear error listing the known IDs otherwise."""
    _load()
    if not isinstance(exercise_id, str):
        raise TypeError(f"exercise_id must be a string like '3.2', got {exercise_id!r}")
    if exercise_id not in _REGISTRY:
        raise ValueError(f"unknown exercise {exercise_id!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[exercise_id]


def for_notebook(notebook_stem: str) -> list[Exercise]:
    """The exercises a notebook (e.g. '03_chunkwise') is graded on, in order."""
    return [e for e in exercises().values() if e.notebook == notebook_stem]


def check(exercise_id: str, fn: Callable, hint: int | None = None, seed: int | None = None) -> CheckResult | None:
    """Check your solution of an exercise on fresh random inputs against the library's reference.

    Prints one line per test case (sizes and gate strength, max abs error, relative error, pass/fail),
    where the first failing output first diverges, what the mistake looks like when it is a known one,
    and the verdict. ``hint=1..3`` prints progressively stronger hints first. ``seed`` repeats a run
    exactly (the seed of every run is printed).

    Returns the :class:`CheckResult` (``.status``, ``.passed``, ``.points``, ``.cases``, ``.table()``)
    and never raises for a wrong answer, so *Run All* goes on to the next exercise. Not implemented yet
    (the stub raises NotImplementedError): one friendly "not started" line. An exception inside your
    function is reported with the lines of your code it passed through.

    This is feedback, not the grade: ``glalearn grade NOTEBOOK`` runs your function on inputs it draws
    itself and compares in its own process. While your function runs here or there, the library's own
    answer to the exercise raises (returning it scores nothing).
    """
    return check_exercise(get(exercise_id), fn, hint=hint, seed=seed)


def hints(exercise_id: str, level: int = 3) -> None:
    """Print hints 1..level of an exercise without running it."""
    print(show_hints(get(exercise_id), level))


def describe(exercise_id: str) -> None:
    """Print an exercise's statement, signature and points."""
    ex = get(exercise_id)
    print(f"{ex.name} · {ex.points} points\n{ex.signature}\n\n{ex.statement}")


__all__ = [
    "CHAPTER_MODULES", "ERROR", "FAILED", "NOT_STARTED", "PASSED", "STATUSES", "TIMED_OUT",
    "Answer", "Case", "CheckResult", "Exercise", "Mistake", "check", "collect_answers", "describe", "evaluate",
    "exercises", "for_notebook", "get", "hints", "register", "run_check",
]
