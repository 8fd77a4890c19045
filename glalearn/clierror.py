"""One line for every user error on the command line (argparse's convention).

Every command of the project (``glalearn grade|progress|doctor``, ``python -m glalearn.train``,
``evaluate``, ``experiments``, ``bench``, ``scaling``) runs its ``main`` through :func:`guarded`:

    if __name__ == "__main__":
        sys.exit(guarded("python -m glalearn.train", main))

A mistake of the user's (a bad argument, a missing or corrupt file, a run directory that exists) is
raised inside the library as one of :data:`USER_ERRORS` with a message that names the argument, what
was expected and what was given. ``guarded`` prints that message as ``prog: error: message`` on
stderr and exits with status 2, as argparse does for its own errors. ``--debug`` anywhere on the
command line shows the traceback instead. Anything else (a bug) keeps its traceback. A command that
dispatches to another (``bench model`` inside ``bench``) may nest ``guarded``: the inner one prints
with its own, more precise prog, and ``--debug`` given to the outer one holds for the inner one too.

Every command builds its parser as a :class:`OneLineParser`, so argparse's own errors (an unknown
option, a value that is not a number, a missing subcommand) are the same one line, without the usage
block (``--help`` still prints it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# The error types the project raises for the user's mistakes (every one with a message in words).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(ValueError):
    """A mistake of the user's that a command reports in one line (a ValueError, so library callers
    that catch ValueError keep working)."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`UserError` s (one line through ``guarded``), not a
    usage block and ``SystemExit(2)``. Its subparsers are OneLineParsers too (argparse makes them of
    the parent's class)."""

    def error(self, message: str):
        raise UserError(message)


_debug_depth = 0  # > 0 while a guarded call that saw --debug is running (for nested guarded calls)


def error_line(prog: str, err: BaseException) -> str:
    """``prog: error: <message>`` with the message on one line (later lines joined by '; ')."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return f"{prog}: error: " + "; ".join(line.strip() for line in text.splitlines() if line.strip())


def guarded(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (argv defaults to sys.argv[1:]) and return its exit status.

    A user error prints one line (see :func:`error_line`) and returns 2; with ``--debug`` in argv it
    is re-raised with its traceback. ``--debug`` is removed before ``main`` sees argv.
    """
    global _debug_depth
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or _debug_depth > 0
    args = [a for a in args if a != "--debug"]
    _debug_depth += debug
    try:
        return int(main(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(error_line(prog, err), file=sys.stderr)
        return 2
    finally:
        _debug_depth -= debug
