"""The machinery behind ``glalearn.check``: exercise specs, the registry, running and reporting a check.

An :class:`Exercise` says everything the book knows about one exercise: its stable ID ("3.2"), title,
points, statement (with shapes), three progressively stronger hints, a reference implementation taken
from the library, a generator of fresh random test cases at awkward sizes and gate strengths, the
tolerance, and a list of known :class:`Mistake` s that the diagnosis recognises by their outputs.

:func:`run_check` compares a learner's function with the reference and returns a :class:`CheckResult`
(it never prints or raises); :func:`check` prints the table, publishes the result for the grader
(a display output with MIME type ``application/vnd.glalearn.check+json``) and raises
:class:`CheckFailed` (an ``AssertionError``) on failure so nbval and the grader see it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from glalearn.numerics import first_divergence, max_abs_error, relative_rmse

MIME_TYPE = "application/vnd.glalearn.check+json"

PASSED, FAILED, NOT_STARTED, ERROR, TIMED_OUT = "passed", "failed", "not started", "error", "timed out"
STATUSES = (PASSED, FAILED, NOT_STARTED, ERROR, TIMED_OUT)


class CheckFailed(AssertionError):
    """Raised by :func:`check` when a learner's function gives wrong outputs (or wrong shapes/dtypes)."""


@dataclass
class Case:
    """One test case: the arguments handed to the function, and a short label of sizes and gate.

    ``expected`` (optional) is the exact answer when it does not come from ``Exercise.reference``
    (e.g. a gradient from autograd).
    """

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    expected: Any = None


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong answer: ``fn`` has the exercise's signature; ``description`` names the mistake."""

    description: str
    fn: Callable


@dataclass
class Exercise:
    """The spec of one graded exercise (see CONTRIBUTING.md, "Exercises")."""

    id: str
    title: str
    points: int
    signature: str  # e.g. "chunk_states(k_chunks, v_chunks, G, initial_state=None) -> (states, final_state)"
    statement: str  # markdown, with the shapes
    hints: tuple[str, str, str]
    reference: Callable  # same signature as the learner's function
    cases: Callable[[torch.Generator], list[Case]]  # fresh random cases from a seeded generator
    outputs: tuple[tuple[str, str], ...]  # (name, layout) per returned tensor, e.g. (("o", "[B, T, H, V]"),)
    tolerance: float = 1e-6  # relative RMSE allowed per output
    atol: float = 1e-10  # ... or this max abs error, for outputs that are exactly zero (e.g. dg at T = 1)
    mistakes: tuple[Mistake, ...] = ()
    notebook: str = ""  # set on registration: the stem of the solutions/exercises notebook

    def __post_init__(self):
        if len(self.hints) != 3:
            raise ValueError(f"exercise {self.id}: give exactly 3 hints (weak to strong), got {len(self.hints)}")
        if self.points < 1:
            raise ValueError(f"exercise {self.id}: points must be >= 1, got {self.points}")

    @property
    def name(self) -> str:
        return f"Exercise {self.id} ({self.title})"


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise, notebook: str) -> Exercise:
    """Add an exercise to the registry under its ID; IDs are unique and stable."""
    if exercise.id in _REGISTRY and _REGISTRY[exercise.id] is not exercise:
        raise ValueError(f"exercise ID {exercise.id!r} is registered twice")
    exercise.notebook = notebook
    _REGISTRY[exercise.id] = exercise
    return exercise


# ----------------------------------------------------------------------------- results
@dataclass
class CaseResult:
    label: str
    ok: bool
    max_abs: float = math.nan
    rel: float = math.nan
    problem: str = ""  # wrong shape / dtype / type, non-finite values, ...
    divergence: str = ""  # "states[b=0, h=1, n=1, k=0, v=2] = 0.31 (expected 0.12)"


@dataclass
class CheckResult:
    """What one check found. ``status`` is one of passed / failed / not started / error."""

    exercise: Exercise
    status: str
    message: str
    seed: int
    cases: list[CaseResult] = field(default_factory=list)
    mistake: str = ""
    exception: BaseException | None = None

    @property
    def points(self) -> int:
        return self.exercise.points if self.status == PASSED else 0

    def summary(self) -> str:
        ex = self.exercise
        if self.status == PASSED:
            return f"✓ {ex.name}: passed, {ex.points}/{ex.points} points"
        if self.status == NOT_STARTED:
            return f"○ {ex.name}: not started — {self.message}"
        mark = "✗"
        return f"{mark} {ex.name}: {self.status}, 0/{ex.points} points — {self.message}"

    def to_json(self) -> dict:
        ex = self.exercise
        return {
            "id": ex.id, "title": ex.title, "status": self.status, "points": self.points,
            "max_points": ex.points, "message": self.message, "seed": self.seed,
            "cases": [{"case": c.label, "ok": c.ok, "max_abs_error": _finite_or_none(c.max_abs),
                       "relative_error": _finite_or_none(c.rel), "problem": c.problem} for c in self.cases],
        }

    def table(self) -> str:
        """The per-case table, cmp-style: one line per case, then where the first failure diverges."""
        ex = self.exercise
        lines = [f"{ex.name} · {ex.points} point{'s' if ex.points != 1 else ''} · seed {self.seed}"]
        width = max([len(c.label) for c in self.cases] + [4])
        lines.append(f"  {'#':>2}  {'case':<{width}}  {'max abs err':>11}  {'rel err':>9}  result")
        for i, c in enumerate(self.cases, 1):
            result = "pass" if c.ok else "FAIL" + (f": {c.problem}" if c.problem else "")
            lines.append(f"  {i:>2}  {c.label:<{width}}  {_fmt(c.max_abs):>11}  {_fmt(c.rel):>9}  {result}")
        first_bad = next((i for i, c in enumerate(self.cases, 1) if not c.ok), None)
        if first_bad is not None and self.cases[first_bad - 1].divergence:
            lines.append(f"  first divergence (case {first_bad}): {self.cases[first_bad - 1].divergence}")
        if self.mistake:
            lines.append(f"  likely mistake: {self.mistake}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1e}"


def _finite_or_none(x: float):
    return None if (math.isnan(x) or math.isinf(x)) else x


# ----------------------------------------------------------------------------- comparing outputs
def _as_tuple(out, n: int):
    if n == 1 and not isinstance(out, (tuple, list)):
        return (out,)
    return out


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(y) for y in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _dims(layout: str) -> list[str]:
    return [d.strip().lower() for d in layout.strip("[] ").split(",") if d.strip()]


def _where(name: str, layout: str, index: tuple) -> str:
    dims = _dims(layout)
    if len(dims) == len(index):
        return f"{name}[{', '.join(f'{d}={i}' for d, i in zip(dims, index))}]"
    return f"{name}[{', '.join(map(str, index))}]"


def _shape_problem(exercise: Exercise, got, expected: tuple) -> str:
    """'' if got has the outputs' structure, shapes and dtypes; else a precise description."""
    names = [n for n, _ in exercise.outputs]
    if len(names) > 1:
        if not isinstance(got, (tuple, list)):
            return f"returned a {type(got).__name__}, expected a tuple ({', '.join(names)})"
        if len(got) != len(names):
            return f"returned {len(got)} values, expected {len(names)}: ({', '.join(names)})"
    got = _as_tuple(got, len(names))
    for (name, layout), x, ref in zip(exercise.outputs, got, expected):
        if not isinstance(x, torch.Tensor):
            return f"{name} is a {type(x).__name__}, expected a torch.Tensor {layout}"
        if tuple(x.shape) != tuple(ref.shape):
            return f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} = {layout}"
        if x.dtype != ref.dtype:
            return (f"{name} has dtype {x.dtype}, expected {ref.dtype} (the inputs' dtype; "
                    "create new tensors with dtype=... or new_zeros)")
    return ""


def _compare(exercise: Exercise, label: str, got, expected: tuple) -> CaseResult:
    problem = _shape_problem(exercise, got, expected)
    if problem:
        return CaseResult(label, False, problem=problem)
    got = _as_tuple(got, len(exercise.outputs))
    result = CaseResult(label, True, max_abs=0.0, rel=0.0)
    for (name, layout), x, ref in zip(exercise.outputs, got, expected):
        x = x.detach()
        mae, rel = max_abs_error(x, ref), relative_rmse(x, ref)
        result.max_abs, result.rel = max(result.max_abs, mae), max(result.rel, rel)
        finite = bool(torch.isfinite(x.double()).all()) if x.numel() else True
        if finite and (rel <= exercise.tolerance or mae <= exercise.atol):
            continue
        if result.ok:  # describe the first bad output only
            result.ok = False
            scale = ref.detach().double().abs().max().item() if ref.numel() else 1.0
            index = first_divergence(x, ref, atol=exercise.tolerance * max(scale, 1e-30), rtol=10 * exercise.tolerance)
            if index is None:  # within the element-wise band everywhere, too far off overall: show the worst
                diff = (x.double() - ref.double()).abs().flatten()
                index = tuple(torch.unravel_index(diff.argmax(), x.shape)) if diff.numel() else ()
                index = tuple(int(i) for i in index)
            where = _where(name, layout, index)
            result.divergence = f"{where} = {x[index].item():.4g} (expected {ref[index].item():.4g})"
            if not finite:
                bad = tuple((~torch.isfinite(x)).nonzero()[0].tolist())
                result.problem = f"{name} has non-finite values (first at {_where(name, layout, bad)}: {x[bad].item()})"
            else:
                result.problem = f"{name} off by rel err {rel:.1e} > {exercise.tolerance:.0e}"
    if result.ok is False and math.isnan(result.max_abs):
        result.max_abs = math.inf
    return result


def _matches(exercise: Exercise, got, expected_like) -> bool:
    if _shape_problem(exercise, got, expected_like):
        return False
    got = _as_tuple(got, len(exercise.outputs))
    for x, y in zip(got, expected_like):
        both_bad = ~torch.isfinite(x.double()) & ~torch.isfinite(y.double())
        xd, yd = x.detach().double().masked_fill(both_bad, 0.0), y.detach().double().masked_fill(both_bad, 0.0)
        if not bool(torch.isfinite(xd).all()) or not bool(torch.isfinite(yd).all()):
            return False
        if not relative_rmse(xd, yd) <= max(exercise.tolerance, 1e-9) * 10:  # NaN (overflowing norms) too
            return False
    return True


def _diagnose(exercise: Exercise, runs: list[tuple[Case, Any]]) -> str:
    """The first known mistake whose outputs equal the learner's on every case, or ''.

    Candidates are dropped at the first case they disagree on, so most cost one evaluation.
    """
    candidates = list(exercise.mistakes)
    for case, got in runs:
        survivors = []
        for mistake in candidates:
            try:
                with torch.no_grad():
                    wrong = _as_tuple(mistake.fn(*_clone(case.args), **_clone(case.kwargs)), len(exercise.outputs))
            except Exception:  # noqa: BLE001, S112  (a mistake that cannot run here is not the learner's)
                continue
            if _matches(exercise, got, tuple(wrong)):
                survivors.append(mistake)
        candidates = survivors
        if not candidates:
            return ""
    return candidates[0].description if candidates else ""


# ----------------------------------------------------------------------------- running a check
def run_check(exercise: Exercise, fn: Callable, seed: int | None = None) -> CheckResult:
    """Run ``fn`` on fresh random cases against the reference; report, never print or raise."""
    if not callable(fn):
        raise TypeError(f"check({exercise.id!r}, fn): fn must be your function, got {type(fn).__name__}")
    seed = secrets.randbits(31) if seed is None else int(seed)
    gen = torch.Generator().manual_seed(seed)
    cases = exercise.cases(gen)
    result = CheckResult(exercise, PASSED, "", seed)
    runs: list[tuple[Case, Any]] = []  # (case, the learner's output) for the diagnosis
    first_failure: tuple[int, Case, CaseResult] | None = None
    for case in cases:
        with torch.no_grad():
            if case.expected is not None:
                expected = _as_tuple(case.expected, len(exercise.outputs))
            else:
                expected = _as_tuple(exercise.reference(*_clone(case.args), **_clone(case.kwargs)),
                                     len(exercise.outputs))
        try:
            got = fn(*_clone(case.args), **_clone(case.kwargs))
        except NotImplementedError as exc:
            result.status = NOT_STARTED
            fname = getattr(fn, "__name__", "your function")
            stub = str(exc).split(":")[0] if str(exc).startswith("Exercise ") else ""
            elsewhere = f" (from the stub of {stub})" if stub and not stub.startswith(f"Exercise {exercise.id} ") else ""
            result.message = (f"{fname} still raises NotImplementedError{elsewhere}; write your solution in its "
                              f'place (stuck? glalearn.check("{exercise.id}", {fname}, hint=1))')
            result.cases = []
            return result
        except Exception as exc:  # noqa: BLE001  (the learner's code raised: report, check() re-raises)
            if result.status == FAILED:  # failed already: report that, note this
                result.cases.append(CaseResult(case.label, False, problem=f"raised {type(exc).__name__}: {exc}"))
                continue
            result.status = ERROR
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            result.message = f"{type(exc).__name__}: {first} (case {case.label})"
            result.exception = exc
            return result
        case_result = _compare(exercise, case.label, got, expected)
        result.cases.append(case_result)
        runs.append((case, got))
        if not case_result.ok and result.status == PASSED:
            result.status = FAILED
            first_failure = (len(result.cases), case, case_result)
    if first_failure is not None:
        n, case, case_result = first_failure
        result.mistake = _diagnose(exercise, runs)
        reason = case_result.problem
        if case_result.divergence and not case_result.problem.startswith(("returned", "has shape")):
            reason += f"; first divergence at {case_result.divergence}"
        prefix = f"likely mistake: {result.mistake}. " if result.mistake else ""
        result.message = f"{prefix}case {n} ({case.label}): {reason}"
    if result.status == PASSED:
        result.message = f"all {len(result.cases)} cases within rel err {exercise.tolerance:.0e}"
    return result


def _publish(result: CheckResult) -> None:
    """Show the one-line summary; inside IPython also attach the machine-readable result for the grader."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # plain Python without IPython
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display({"text/plain": result.summary(), MIME_TYPE: result.to_json()}, raw=True)
    else:
        print(result.summary())


def show_hints(exercise: Exercise, level: int) -> str:
    """Hints 1..level of an exercise, as text."""
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 3:
        raise ValueError(f"hint must be 1, 2 or 3 (progressively stronger), got {level!r}")
    return "\n".join(f"Hint {i} for {exercise.name}: {exercise.hints[i - 1]}" for i in range(1, level + 1))


def check_exercise(exercise: Exercise, fn: Callable, hint: int | None = None, seed: int | None = None,
                   verbose: bool = True) -> CheckResult:
    """Run, print and publish a check; raise on failure. See :func:`glalearn.checks.check`."""
    __tracebackhide__ = True
    if hint is not None:
        print(show_hints(exercise, hint))
    result = run_check(exercise, fn, seed)
    if result.status in (PASSED, FAILED) and verbose:
        print(result.table())
    _publish(result)
    if result.status == ERROR and result.exception is not None:
        raise result.exception
    if result.status == FAILED:
        raise CheckFailed(f"{exercise.name} failed: {result.message}")
    return result
