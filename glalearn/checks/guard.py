"""The reference guard: while a learner's function is checked, the library's answer to that exercise raises.

Every :class:`~glalearn.checks.core.Exercise` names the library functions that compute its answer
(``Exercise.forbidden``, plus its own ``reference``). :func:`refusing` swaps the code of each of those
function objects for a two-line body that raises :class:`ReferenceUsed`, runs the learner's function,
and puts the original code back. Swapping the code object (not a module attribute) reaches every alias:
``glalearn.chunk_gla``, ``from glalearn.forms.chunk import chunk_gla as f`` and ``ChunkGLAFunction.apply``
all end in the same function objects. Library functions that an exercise builds on and does not ask
for (``chunk_gla`` inside the layer of exercise 8.1) stay usable.

The guard is active in both places that run a learner's function: ``glalearn.check`` in the notebook
(so the feedback says what the grade will say) and the probe that ``glalearn grade`` runs in the
notebook's kernel. A ``ReferenceUsed`` caught and swallowed by the learner's code is still recorded
(:attr:`Refusals.names`), and the check reports it.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class ReferenceUsed(RuntimeError):
    """A learner's function called the library's own answer to the exercise being checked."""


@dataclass
class Refusals:
    """What one guarded run refused (in call order, each name once)."""

    exercise: str
    names: list[str] = field(default_factory=list)


_ACTIVE: list[Refusals] = []


def refuse(name: str) -> None:
    """The body every guarded function runs instead of its own (called from the swapped code)."""
    what = _ACTIVE[-1].exercise if _ACTIVE else "this exercise"
    for refusals in _ACTIVE:
        if name not in refusals.names:
            refusals.names.append(name)
    raise ReferenceUsed(f"{name} is the library's answer to {what}; while your function is checked it "
                        "raises: compute it yourself")


def resolve(target: str | Callable) -> types.FunctionType | None:
    """The Python function object behind a dotted name (module path, then attributes), or None.

    None when its module cannot be imported here (e.g. ``glalearn.flash`` without Triton); a name that
    imports but does not exist is an error (a typo in an exercise spec).
    """
    if not isinstance(target, str):
        fn = target
    else:
        parts = target.split(".")
        obj = None
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            rest = parts[i:]
            break
        else:
            return None
        for attr in rest:
            obj = getattr(obj, attr)  # AttributeError: a wrong name in the spec
        fn = obj
    fn = getattr(fn, "__func__", fn)  # staticmethod / bound method -> the function
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"the reference guard can only refuse Python functions, {target!r} is {type(fn).__name__}")
    if fn.__code__.co_freevars:
        raise TypeError(f"the reference guard cannot refuse {target!r}: it is a closure "
                        f"(free variables {fn.__code__.co_freevars}); name the function it wraps")
    return fn


def _name(fn: types.FunctionType) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _refusing_code(fn: types.FunctionType, name: str) -> types.CodeType:
    source = ("def refused(*args, **kwargs):\n"
              f"    __import__('glalearn.checks.guard', fromlist=['refuse']).refuse({name!r})\n")
    namespace: dict = {}
    exec(compile(source, f"<reference guard: {name}>", "exec"), namespace)  # noqa: S102  (our own two lines)
    return namespace["refused"].__code__


@contextmanager
def refusing(targets: Iterable[str | Callable], exercise: str) -> Iterator[Refusals]:
    """Within the block, every function in ``targets`` raises :class:`ReferenceUsed` when called."""
    functions: dict[int, types.FunctionType] = {}
    for target in targets:
        fn = resolve(target)
        if fn is not None and fn.__code__.co_filename.startswith("<reference guard"):
            continue  # already refused by an enclosing block
        if fn is not None:
            functions[id(fn)] = fn
    saved = [(fn, fn.__code__) for fn in functions.values()]
    refusals = Refusals(exercise)
    _ACTIVE.append(refusals)
    try:
        for fn, _ in saved:
            fn.__code__ = _refusing_code(fn, _name(fn))
        yield refusals
    finally:
        for fn, code in saved:
            fn.__code__ = code
        _ACTIVE.remove(refusals)
