"""The machinery behind ``glalearn.check`` and ``glalearn grade``: exercise specs, answers, verdicts.

An :class:`Exercise` says everything the book knows about one exercise: its stable ID ("3.2"), title,
points, statement (with shapes and dtypes), three progressively stronger hints, a reference
implementation taken from the library, a generator of fresh random test cases at awkward sizes and gate
strengths, the tolerance, the known :class:`Mistake` s that the diagnosis recognises by their outputs,
and the library functions that compute its answer (they raise while a learner's function is checked,
see :mod:`glalearn.checks.guard`).

A check has two halves that may run in different processes:

- :func:`collect_answers` runs the learner's function on the cases' inputs and records what it returned
  or raised (:class:`Answer`). ``glalearn.check`` calls it in the notebook; ``glalearn grade`` calls it
  in the notebook's kernel through :mod:`glalearn.checks.probe`, on inputs it drew itself.
- :func:`evaluate` compares the answers with the reference and names the mistake
  (:class:`CheckResult`). ``glalearn grade`` runs it in its own process, so nothing the notebook prints,
  displays or redefines can change a grade.

:func:`check_exercise` (``glalearn.check``) prints the per-case table and the verdict and returns the
:class:`CheckResult`; it never raises for a wrong answer, so *Run All* goes on to the next exercise.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glalearn.checks import guard
from glalearn.numerics import first_divergence, max_abs_error, relative_rmse

PASSED, FAILED, NOT_STARTED, ERROR, TIMED_OUT = "passed", "failed", "not started", "error", "timed out"
STATUSES = (PASSED, FAILED, NOT_STARTED, ERROR, TIMED_OUT)

# Set by ``glalearn grade`` in the environment of the kernels it starts: ``glalearn.check`` then only
# says that the grader checks this exercise in its own process (its probe runs right after the cell).
UNDER_GRADER = "GLALEARN_UNDER_GRADER"

# Every GLA form of the library computes o and S_T; the sequence-level exercises forbid them all.
FORMS = (
    "glalearn.forms.recurrent.recurrent_gla",
    "glalearn.forms.parallel.parallel_gla",
    "glalearn.forms.chunk.chunk_gla",
    "glalearn.forms.chunk.ChunkGLAFunction.forward",
    "glalearn.forms.two_level.two_level_chunk_gla",
    "glalearn.flash.flash_gla",
    "glalearn.flash.flash_forward",
)

# The recognised mistakes of every exercise that returns or takes a state ([..., K, V]).
STATE_TRANSPOSED = ("{name} {verb} transposed: a state is [K, V] (row c belongs to key channel c, "
                    "S = Σ k_tᵀ v_t), not [V, K]")
STATE_STORED_TRANSPOSED = ("{name} {verb} stored in [V, K] order: element (c, v) of a state belongs at offset "
                           "c·V + v (row c for key channel c, S = Σ k_tᵀ v_t)")
STATE_LAYOUT = ("the state layout: your function works on the state as [V, K] (it runs when given the "
                "state transposed); the book keeps S as [K, V], row c for key channel c (S = Σ k_tᵀ v_t)")
KV_TRANSPOSED = ("k_tᵀ v_t is transposed: the outer product that enters the state is "
                 "k_t.unsqueeze(-1) * v_t.unsqueeze(-2), [K, V] like the state (v_tᵀ k_t is [V, K])")
KV_MIXUP = ("a [K, V] / [V, K] mix-up: the error names both K = {K} and V = {V}; the state and k_tᵀ v_t "
            "are [K, V] (k_t.unsqueeze(-1) * v_t.unsqueeze(-2)), never [V, K]")


@dataclass
class Case:
    """One test case: the arguments handed to the function, and a short label of sizes and gate.

    ``expected`` (optional) is the exact answer when it does not come from ``Exercise.reference``
    (e.g. a gradient from autograd). It stays in the process that grades.
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
    statement: str  # markdown, with the shapes and dtypes
    hints: tuple[str, str, str]
    reference: Callable  # same signature as the learner's function
    cases: Callable[[torch.Generator], list[Case]]  # fresh random cases from a seeded generator
    outputs: tuple[tuple[str, str], ...]  # (name, layout) per returned tensor, e.g. (("o", "[B, T, H, V]"),)
    tolerance: float = 1e-6  # relative RMSE allowed per output
    atol: float = 1e-10  # ... or this max abs error, for outputs that are exactly zero (e.g. dg at T = 1)
    mistakes: tuple[Mistake, ...] = ()
    # Library functions (dotted names or function objects) that compute this exercise's answer: they
    # raise while the learner's function is checked. The reference itself is always refused.
    forbidden: tuple = ()
    state_outputs: tuple[str, ...] = ()  # outputs laid out [..., K, V] (a state or its gradient)
    state_inputs: tuple[str, ...] = ()  # parameters laid out [..., K, V]
    # Kernel exercises: launch(kernel, *case.args, **case.kwargs) -> outputs. The learner hands in a
    # @triton.jit kernel and the check launches it.
    launch: Callable | None = None
    notebook: str = ""  # set on registration: the stem of the solutions/exercises notebook

    def __post_init__(self):
        if len(self.hints) != 3:
            raise ValueError(f"exercise {self.id}: give exactly 3 hints (weak to strong), got {len(self.hints)}")
        if self.points < 1:
            raise ValueError(f"exercise {self.id}: points must be >= 1, got {self.points}")
        names = [n for n, _ in self.outputs]
        unknown = [n for n in self.state_outputs if n not in names]
        if unknown:
            raise ValueError(f"exercise {self.id}: state_outputs {unknown} are not among the outputs {names}")
        unknown = [n for n in self.state_inputs if n not in self.parameters]
        if unknown:
            raise ValueError(f"exercise {self.id}: state_inputs {unknown} are not parameters of {self.signature}")

    @property
    def name(self) -> str:
        return f"Exercise {self.id} ({self.title})"

    @property
    def function_name(self) -> str:
        """The name the stub gives the learner's function (or kernel): the signature's first word."""
        return self.signature.split("(", 1)[0].strip()

    @property
    def parameters(self) -> list[str]:
        """The parameter names of the signature (up to its closing parenthesis, not the return part)."""
        inside = self.signature.split("(", 1)[1].split(")", 1)[0] if "(" in self.signature else ""
        return [p.split("=")[0].split(":")[0].strip() for p in inside.split(",") if p.strip()]

    @property
    def is_kernel(self) -> bool:
        return self.launch is not None

    @property
    def all_mistakes(self) -> tuple[Mistake, ...]:
        """The listed mistakes, then the "transposed state" ones: every state output at once, then each."""
        text = STATE_STORED_TRANSPOSED if self.is_kernel else STATE_TRANSPOSED
        groups = [self.state_outputs] if len(self.state_outputs) > 1 else []
        groups += [(n,) for n in self.state_outputs]
        auto = tuple(Mistake(text.format(name=" and ".join(g), verb="are" if len(g) > 1 else "is"),
                             _transposed_state_mistake(self, g)) for g in groups)
        return self.mistakes + auto

    def refused(self) -> tuple:
        """What :func:`glalearn.checks.guard.refusing` refuses for this exercise."""
        return (*self.forbidden, self.reference)

    def expected(self, case: Case) -> tuple:
        with torch.no_grad():
            if case.expected is not None:
                return _as_tuple(case.expected, len(self.outputs))
            return _as_tuple(self.reference(*_clone(case.args), **_clone(case.kwargs)), len(self.outputs))

    def problem_with(self, fn) -> str:
        """Why ``fn`` is not the kind of object this exercise grades ('' when it is)."""
        name = _fn_name(fn)
        if self.is_kernel:
            if not is_triton_kernel(fn):
                kind = "plain Python function" if callable(fn) else type(fn).__name__
                return (f"{self.name} grades a @triton.jit kernel that the check launches itself; {name} is a "
                        f"{kind}. Write the kernel with @triton.jit (signature as in the statement) and pass "
                        f'the kernel: glalearn.check("{self.id}", {self.function_name})')
            module = getattr(getattr(fn, "fn", None), "__module__", "") or ""
            if module.split(".")[0] in ("glalearn", "kernels"):
                return f"{name} is the library's own kernel ({module}); write your own"
            if type(fn).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
                return (f"{name} was compiled for a GPU and this machine has none: set "
                        "os.environ['TRITON_INTERPRET'] = '1' before triton is imported (the notebook's first "
                        "cell does), restart the kernel and run the cells again")
            return ""
        if not callable(fn):
            return f"{self.name} grades a function; got a {type(fn).__name__}"
        return ""

    def caller(self, fn) -> Callable:
        if self.is_kernel:
            launch = self.launch

            def call(*args, **kwargs):
                return launch(fn, *args, **kwargs)
            return call
        return fn


def is_triton_kernel(obj) -> bool:
    """A ``@triton.jit`` function (compiled or interpreted), without importing Triton (older Tritons'
    InterpretedFunction does not derive from KernelInterface, so the class names are checked too)."""
    names = ("KernelInterface", "JITFunction", "InterpretedFunction")
    return any(c.__name__ in names and c.__module__.startswith("triton") for c in type(obj).__mro__)


def _fn_name(fn) -> str:
    inner = getattr(fn, "fn", None) if is_triton_kernel(fn) else None
    return getattr(inner or fn, "__name__", None) or "your function"


def _transposed_state_mistake(exercise: Exercise, names: tuple[str, ...]) -> Callable:
    indices = [i for i, (n, _) in enumerate(exercise.outputs) if n in names]
    stored = exercise.is_kernel

    def fn(*args, **kwargs):
        out = list(_as_tuple(exercise.reference(*args, **kwargs), len(exercise.outputs)))
        for index in indices:
            x = out[index].transpose(-1, -2)
            out[index] = x.contiguous().reshape(out[index].shape) if stored else x
        return out[0] if len(out) == 1 else tuple(out)
    return fn


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise, notebook: str) -> Exercise:
    """Add an exercise to the registry under its ID; IDs are unique and stable."""
    if exercise.id in _REGISTRY and _REGISTRY[exercise.id] is not exercise:
        raise ValueError(f"exercise ID {exercise.id!r} is registered twice")
    exercise.notebook = notebook
    _REGISTRY[exercise.id] = exercise
    return exercise


# ----------------------------------------------------------------------------- answers
@dataclass
class Raised:
    """An exception from the learner's function, as text (it may have to cross processes)."""

    type: str
    message: str
    where: str = ""  # the learner's last frame: "in f (Cell In[3], line 7): `code`"
    trace: str = ""  # every frame in the learner's code, formatted
    not_implemented: bool = False
    stub: str = ""  # "Exercise 3.2 (chunk states)" when it is a stub's NotImplementedError
    setup: bool = False  # not a failure of the code: the object handed in is not what the exercise grades

    @property
    def first_line(self) -> str:
        text = self.message.strip()
        return text.splitlines()[0] if text else ""


@dataclass
class Answer:
    """What the learner's function did with one case: returned ``value``, or ``raised``.

    ``layout_value``: after it raised, what it returned for the same case with its state inputs
    transposed (None if that raised too or was not tried). ``refused``: library references it called.
    """

    value: Any = None
    raised: Raised | None = None
    layout_value: Any = None
    refused: list[str] = field(default_factory=list)
    function: str = ""

    def encode(self, tensors: dict, key: str) -> dict:
        from glalearn.checks.exchange import encode

        return {"value": encode(self.value, tensors, f"{key}.v"),
                "raised": None if self.raised is None else vars(self.raised),
                "layout_value": encode(self.layout_value, tensors, f"{key}.l"),
                "refused": list(self.refused), "function": self.function}

    @classmethod
    def decode(cls, record: dict, tensors: dict) -> Answer:
        from glalearn.checks.exchange import decode

        raised = record.get("raised")
        return cls(decode(record["value"], tensors), None if raised is None else Raised(**raised),
                   decode(record["layout_value"], tensors), list(record.get("refused", [])),
                   str(record.get("function", "")))


def _library_roots() -> tuple[str, ...]:
    roots = {str(Path(__file__).resolve().parents[1]), os.path.dirname(os.__file__)}
    for name in ("torch", "triton", "IPython", "ipykernel", "numpy"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            roots.add(os.path.dirname(os.path.dirname(module.__file__)))
    kernels = sys.modules.get("glalearn.kernels")
    if kernels is not None and getattr(kernels, "__file__", None):
        roots.add(os.path.dirname(kernels.__file__))
    return tuple(roots)


def _cell_name(filename: str) -> str:
    """IPython's 'Cell In[3]' for a cell's file, else the file name."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        number = shell.compile._filename_map.get(filename) if shell is not None else None
        if number is not None:
            return f"Cell In[{number}]"
    except Exception:  # noqa: BLE001, S110  (no IPython, or another version's internals)
        pass
    return os.path.basename(filename)


def _learner_frames(exc: BaseException) -> list[tuple[str, int, str, str]]:
    """(where, line, function, code) of each traceback frame outside the library and its dependencies."""
    import linecache
    import traceback

    roots = _library_roots()
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename) if not frame.filename.startswith("<") else frame.filename
        if path.startswith(roots) or "site-packages" in path or "dist-packages" in path:
            continue
        if frame.filename.startswith("<reference guard"):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno) or "").strip()
        frames.append((_cell_name(frame.filename), frame.lineno or 0, frame.name, code))
    return frames


def describe_exception(exc: BaseException) -> Raised:
    """A :class:`Raised` for an exception from the learner's code (Triton's wrapper unwrapped)."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    real = chain[-1] if type(exc).__name__ == "InterpreterError" and len(chain) > 1 else exc
    not_impl = next((e for e in chain if isinstance(e, NotImplementedError)), None)
    message = str(not_impl if not_impl is not None else real)
    stub = message.split(":")[0] if not_impl is not None and message.startswith("Exercise ") else ""
    frames = _learner_frames(real)
    trace = "\n".join(f"  in {fn} ({where}, line {line}):\n      {code}" for where, line, fn, code in frames)
    last = frames[-1] if frames else None
    where = f"in {last[2]} ({last[0]}, line {last[1]}): `{last[3]}`" if last and last[3] else ""
    return Raised(type(not_impl if not_impl is not None else real).__name__, message, where, trace,
                  not_implemented=not_impl is not None, stub=stub)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(y) for y in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _transpose_states(exercise: Exercise, case: Case) -> tuple[tuple, dict] | None:
    """The case's arguments with every state input transposed ([..., K, V] -> [..., V, K]), or None."""
    params = exercise.parameters
    args, kwargs, changed = list(_clone(case.args)), dict(_clone(case.kwargs)), False
    for i, name in enumerate(params):
        if name not in exercise.state_inputs:
            continue
        if i < len(args) and isinstance(args[i], torch.Tensor):
            args[i], changed = args[i].transpose(-1, -2).contiguous(), True
        elif isinstance(kwargs.get(name), torch.Tensor):
            kwargs[name], changed = kwargs[name].transpose(-1, -2).contiguous(), True
    return (tuple(args), kwargs) if changed else None


def collect_answers(exercise: Exercise, fn, cases: list[Case]) -> list[Answer]:
    """Run the learner's ``fn`` on every case, with the library's answer refused; never raises.

    A stub's NotImplementedError stops at the first case (every later case would raise it too). After
    any other exception, a case with state inputs is tried once more with those transposed, which tells
    a function that keeps the state as [V, K] from other errors.
    """
    name = _fn_name(fn)
    problem = exercise.problem_with(fn)
    if problem:
        return [Answer(raised=Raised("TypeError", problem, setup=True), function=name) for _ in cases]
    call = exercise.caller(fn)
    answers: list[Answer] = []
    with guard.refusing(exercise.refused(), exercise.name) as refusals:
        for case in cases:
            answer = Answer(function=name)
            try:
                with torch.no_grad():
                    answer.value = call(*_clone(case.args), **_clone(case.kwargs))
            except Exception as exc:  # noqa: BLE001  (the learner's code raised: that is the answer)
                answer.raised = describe_exception(exc)
            if answer.raised is not None and answer.raised.not_implemented:
                answers += [answer] * (len(cases) - len(answers))
                break
            if answer.raised is not None and exercise.state_inputs:
                transposed = _transpose_states(exercise, case)
                if transposed is not None:
                    try:
                        with torch.no_grad():
                            answer.layout_value = call(*transposed[0], **transposed[1])
                    except Exception:  # noqa: BLE001, S110  (it fails with the other layout too)
                        pass
            answers.append(answer)
    for answer in answers:
        answer.refused = list(refusals.names)
    return answers


# ----------------------------------------------------------------------------- results
@dataclass
class CaseResult:
    label: str
    ok: bool
    max_abs: float = math.nan
    rel: float = math.nan
    problem: str = ""  # wrong shape / dtype / type, non-finite values, an exception, ...
    divergence: str = ""  # "states[b=0, h=1, n=1, k=0, v=2] = 0.31 (expected 0.12)"


@dataclass
class CheckResult:
    """What one check found: ``status`` (passed / failed / not started / error), ``points``, the
    per-case table (``cases``, :meth:`table`), the recognised ``mistake`` and the ``message``."""

    exercise: Exercise
    status: str
    message: str
    seed: int
    cases: list[CaseResult] = field(default_factory=list)
    mistake: str = ""
    trace: str = ""  # the learner's frames when their code raised
    _shown_in: int | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def points(self) -> int:
        return self.exercise.points if self.status == PASSED else 0

    def summary(self) -> str:
        ex = self.exercise
        if self.status == PASSED:
            return f"✓ {ex.name}: passed, {ex.points}/{ex.points} points"
        if self.status == NOT_STARTED:
            return f"○ {ex.name}: not started — {self.message}"
        return f"✗ {ex.name}: {self.status}, 0/{ex.points} points — {self.message}"

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
        if self.trace:
            lines.append("  where your code raised it:\n" + "\n".join("  " + t for t in self.trace.splitlines()))
        if self.mistake:
            lines.append(f"  likely mistake: {self.mistake}")
        return "\n".join(lines)

    def report(self) -> str:
        """What ``glalearn.check`` prints: the table (not for a stub), then the one-line verdict."""
        if self.status == NOT_STARTED or not self.cases and not self.trace:
            return self.summary()
        grade_with = f"glalearn grade exercises/{self.exercise.notebook}.ipynb" if self.exercise.notebook else \
            "glalearn grade"
        note = (f"  (feedback, not the grade: `{grade_with}` grades your code on inputs of its own, "
                "outside the notebook)")
        return f"{self.table()}\n{note}\n{self.summary()}"

    def __repr__(self) -> str:
        return f"<CheckResult {self.exercise.id}: {self.status}, {self.points}/{self.exercise.points} points>"

    def _ipython_display_(self):
        """Shown once: the check cell printed the report already, so its echo adds nothing."""
        count = _execution_count()
        if count is not None and count == self._shown_in:
            return
        print(self.report())


def _execution_count() -> int | None:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return None if shell is None else shell.execution_count
    except ImportError:
        return None


def _fmt(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1e}"


def _finite_or_none(x: float):
    return None if (math.isnan(x) or math.isinf(x)) else x


# ----------------------------------------------------------------------------- comparing outputs
def _as_tuple(out, n: int):
    if n == 1 and not isinstance(out, (tuple, list)):
        return (out,)
    return out


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


def _run_mistake(exercise: Exercise, mistake: Mistake, case: Case):
    with torch.no_grad():
        return _as_tuple(mistake.fn(*_clone(case.args), **_clone(case.kwargs)), len(exercise.outputs))


def _value_mistake(exercise: Exercise, runs: list[tuple[Case, Any]]) -> str:
    """The first known mistake whose outputs equal the learner's on every case that returned, or ''.

    Candidates are dropped at the first case they disagree on, so most cost one evaluation.
    """
    candidates = list(exercise.all_mistakes)
    for case, got in runs:
        survivors = []
        for mistake in candidates:
            try:
                wrong = _run_mistake(exercise, mistake, case)
            except Exception:  # noqa: BLE001, S112  (a mistake that cannot run here is not the learner's)
                continue
            if _matches(exercise, got, tuple(wrong)):
                survivors.append(mistake)
        candidates = survivors
        if not candidates:
            return ""
    return candidates[0].description if candidates else ""


def _untranspose_states(exercise: Exercise, value):
    """A layout-retry answer with its state outputs transposed back to [..., K, V]."""
    names = [n for n, _ in exercise.outputs]
    out = list(_as_tuple(value, len(names))) if isinstance(value, (tuple, list)) or len(names) == 1 else None
    if out is None or len(out) != len(names):
        return value
    for i, name in enumerate(names):
        if name in exercise.state_outputs and isinstance(out[i], torch.Tensor) and out[i].dim() >= 2:
            out[i] = out[i].transpose(-1, -2)
    return out[0] if len(out) == 1 else tuple(out)


def _state_sizes(exercise: Exercise, case: Case, expected: tuple) -> tuple[int, int] | None:
    """(K, V) of the case's states, from a state output or a state input."""
    for (name, _), ref in zip(exercise.outputs, expected):
        if name in exercise.state_outputs and ref.dim() >= 2:
            return int(ref.shape[-2]), int(ref.shape[-1])
    transposed = dict(zip(exercise.parameters, case.args)) | case.kwargs
    for name in exercise.state_inputs:
        x = transposed.get(name)
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[-2]), int(x.shape[-1])
    return None


def _error_mistake(exercise: Exercise, case: Case, answer: Answer, expected: tuple) -> str:
    """A recognised cause of an exception: the state layout, a mistake that raises the same error, or a
    [K, V] / [V, K] mix-up that the error message gives away."""
    if answer.layout_value is not None and _matches(exercise, _untranspose_states(exercise, answer.layout_value),
                                                    expected):
        return STATE_LAYOUT
    for mistake in exercise.all_mistakes:
        try:
            _run_mistake(exercise, mistake, case)
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == answer.raised.type and str(exc) == answer.raised.message:
                return mistake.description
    sizes = _state_sizes(exercise, case, expected)
    if sizes is not None and sizes[0] != sizes[1] and answer.raised.type in ("RuntimeError", "ValueError",
                                                                             "InterpreterError", "AssertionError"):
        K, V = sizes
        numbers = set(re.findall(r"\d+", answer.raised.message))
        if {str(K), str(V)} <= numbers:
            return KV_MIXUP.format(K=K, V=V)
    return ""


def evaluate(exercise: Exercise, cases: list[Case], answers: list[Answer], seed: int) -> CheckResult:
    """Compare the learner's answers with the reference (computed here) and name the mistake."""
    result = CheckResult(exercise, PASSED, "", seed)
    if len(answers) != len(cases):
        raise ValueError(f"{exercise.name}: {len(answers)} answers for {len(cases)} cases")
    fname = next((a.function for a in answers if a.function), "") or exercise.function_name
    setup = next((a.raised for a in answers if a.raised is not None and a.raised.setup), None)
    if setup is not None:
        result.status, result.message = ERROR, setup.message
        return result
    refused = next((a.refused for a in answers if a.refused), None)
    if refused:
        result.status = ERROR
        result.message = (f"{fname} calls {refused[0]}, the library's answer to this exercise; it raises while "
                          "your function is checked and scores nothing: compute it yourself")
        return result
    stub = next((a.raised for a in answers if a.raised is not None and a.raised.not_implemented), None)
    if stub is not None:
        elsewhere = (f" (from the stub of {stub.stub})"
                     if stub.stub and not stub.stub.startswith(f"Exercise {exercise.id} ") else "")
        result.status = NOT_STARTED
        result.message = (f"{fname} still raises NotImplementedError{elsewhere}; write your solution in its "
                          f'place (stuck? glalearn.check("{exercise.id}", {fname}, hint=1))')
        return result
    expected = [exercise.expected(case) for case in cases]
    first_bad = None
    for n, (case, answer, exp) in enumerate(zip(cases, answers, expected), 1):
        if answer.raised is not None:
            problem = f"raised {answer.raised.type}: {answer.raised.first_line}"
            case_result = CaseResult(case.label, False, problem=problem)
        else:
            case_result = _compare(exercise, case.label, answer.value, exp)
        result.cases.append(case_result)
        if not case_result.ok and first_bad is None:
            first_bad = n
    if first_bad is None:
        result.message = f"all {len(result.cases)} cases within rel err {exercise.tolerance:.0e}"
        return result
    runs = [(c, a.value) for c, a in zip(cases, answers) if a.raised is None]
    wrong_runs = any(not r.ok for r, a in zip(result.cases, answers) if a.raised is None)
    result.mistake = _value_mistake(exercise, runs) if wrong_runs else ""
    if not result.mistake:
        for case, answer, exp in zip(cases, answers, expected):
            if answer.raised is not None:
                result.mistake = _error_mistake(exercise, case, answer, exp)
                break
    case, answer, case_result = cases[first_bad - 1], answers[first_bad - 1], result.cases[first_bad - 1]
    prefix = f"likely mistake: {result.mistake}. " if result.mistake else ""
    if answer.raised is not None:
        result.status = ERROR
        where = f"; {answer.raised.where}" if answer.raised.where else ""
        result.message = f"{prefix}{answer.raised.type}: {answer.raised.first_line} (case {case.label}{where})"
        result.trace = answer.raised.trace
        return result
    result.status = FAILED
    reason = case_result.problem
    if case_result.divergence and not case_result.problem.startswith(("returned", "has shape")):
        reason += f"; first divergence at {case_result.divergence}"
    result.message = f"{prefix}case {first_bad} ({case.label}): {reason}"
    return result


# ----------------------------------------------------------------------------- running a check
def draw_cases(exercise: Exercise, seed: int | None = None) -> tuple[int, list[Case]]:
    seed = secrets.randbits(31) if seed is None else int(seed)
    return seed, exercise.cases(torch.Generator().manual_seed(seed))


def run_check(exercise: Exercise, fn: Callable, seed: int | None = None) -> CheckResult:
    """Run ``fn`` on fresh random cases against the reference, in this process; never prints or raises."""
    if fn is None or not (callable(fn) or is_triton_kernel(fn)):
        raise TypeError(f"check({exercise.id!r}, fn): fn must be your function, got {type(fn).__name__}")
    seed, cases = draw_cases(exercise, seed)
    return evaluate(exercise, cases, collect_answers(exercise, fn, cases), seed)


def show_hints(exercise: Exercise, level: int) -> str:
    """Hints 1..level of an exercise, as text."""
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 3:
        raise ValueError(f"hint must be 1, 2 or 3 (progressively stronger), got {level!r}")
    return "\n".join(f"Hint {i} for {exercise.name}: {exercise.hints[i - 1]}" for i in range(1, level + 1))


def check_exercise(exercise: Exercise, fn: Callable, hint: int | None = None, seed: int | None = None,
                   verbose: bool = True) -> CheckResult | None:
    """Run and print a check; return its :class:`CheckResult`. See :func:`glalearn.checks.check`."""
    if hint is not None:
        print(show_hints(exercise, hint))
    if os.environ.get(UNDER_GRADER):
        print(f"○ {exercise.name}: checked by glalearn grade in its own process, right after this cell")
        return None
    result = run_check(exercise, fn, seed)
    print(result.report() if verbose else result.summary())
    result._shown_in = _execution_count()
    return result
