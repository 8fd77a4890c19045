"""The grader's probe: the only thing ``glalearn grade`` runs inside a learner's kernel.

After each check cell the grader runs one cell of its own (never shown to the learner; it executes a
copy of the notebook)::

    __import__("glalearn.checks.probe", fromlist=["answer"]).answer("3.2", lambda: chunk_states, "/tmp/...")

:func:`answer` reads the inputs the grader drew (``cases.json`` / ``cases.safetensors``), runs the
learner's function on them with the library's answer refused (:mod:`glalearn.checks.guard`), and writes
what it returned or raised to ``answers.json`` / ``answers.safetensors`` in the same folder. It holds no
reference and decides nothing: the grader compares in its own process. It prints nothing and raises
nothing, so a broken function cannot stop the notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from glalearn.checks.core import Answer, Raised, collect_answers, describe_exception
from glalearn.checks.exchange import load_cases, save_answers


def answer(exercise_id: str, get_function: Callable, folder: str | Path) -> None:
    """Write the learner's answers to the cases in ``folder`` (see the module docstring)."""
    from glalearn import checks

    exercise = checks.get(exercise_id)
    cases = load_cases(folder)
    try:
        fn = get_function()
    except Exception as exc:  # noqa: BLE001  (e.g. NameError: the function's cell did not run)
        raised = describe_exception(exc)
        raised.setup = True
        if exc.__class__ is NameError:
            raised.message = (f"{exc}: the function this check names was never defined "
                              "(did its cell run without an error?)")
        else:
            raised.message = f"{type(exc).__name__}: {exc}"
        answers = [Answer(raised=raised) for _ in cases]
    else:
        try:
            answers = collect_answers(exercise, fn, cases)
        except Exception as exc:  # noqa: BLE001  (anything that escaped: report it as the answer)
            answers = [Answer(raised=Raised(type(exc).__name__, str(exc), setup=True)) for _ in cases]
    save_answers(folder, answers)
