"""Graded exercises: ``glalearn.check(exercise_id, fn)`` and the registry of exercise specs.

    import glalearn
    glalearn.check("3.2", chunk_states)           # run your function against the library
    glalearn.check("3.2", chunk_states, hint=1)   # ... with the first hint (2, 3: stronger)

Each chapter's exercises live in one module (``ch01.py`` ... ``ch05.py``) that defines ``NOTEBOOK``
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
    MIME_TYPE,
    NOT_STARTED,
    PASSED,
    STATUSES,
    TIMED_OUT,
    Case,
    CheckFailed,
    CheckResult,
    Exercise,
    Mistake,
    check_exercise,
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


def check(exercise_id: str, fn: Callable, hint: int | None = None, seed: int | None = None) -> None:
    """Check your solution of an exercise on fresh random inputs against the library's reference.

    Prints one line per test case (sizes and gate strength, max abs error, relative error, pass/fail),
    where the first failing output first diverges, and what the mistake looks like when it is a known
    one. ``hint=1..3`` prints progressively stronger hints first. ``seed`` repeats a run exactly (the
    seed of every run is printed).

    Not implemented yet (the stub raises NotImplementedError): one friendly "not started" line.
    Wrong outputs, shapes or dtypes: raises :class:`CheckFailed` (an ``AssertionError``).
    An exception inside your function is re-raised after the report, so its traceback shows your code.
    For the result as data, use :func:`run_check` (``run_check(get("3.2"), fn)``).
    """
    __tracebackhide__ = True
    check_exercise(get(exercise_id), fn, hint=hint, seed=seed)  # returns nothing: no echo in a notebook


def hints(exercise_id: str, level: int = 3) -> None:
    """Print hints 1..level of an exercise without running it."""
    print(show_hints(get(exercise_id), level))


def describe(exercise_id: str) -> None:
    """Print an exercise's statement, signature and points."""
    ex = get(exercise_id)
    print(f"{ex.name} · {ex.points} points\n{ex.signature}\n\n{ex.statement}")


__all__ = [
    "CHAPTER_MODULES", "ERROR", "FAILED", "MIME_TYPE", "NOT_STARTED", "PASSED", "STATUSES", "TIMED_OUT",
    "Case", "CheckFailed", "CheckResult", "Exercise", "Mistake", "check", "describe", "exercises",
    "for_notebook", "get", "hints", "register", "run_check",
]
