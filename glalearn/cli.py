"""The `glalearn` command: `glalearn doctor | grade NOTEBOOK... | progress`.

Each subcommand lives in its own module with a `main(argv) -> int`; this file dispatches, and runs it
through :func:`glalearn.clierror.guarded`, so a user error is one line `glalearn grade: error: ...` on
stderr with exit status 2 (`--debug` shows the traceback instead). :class:`OneLineParser` makes
argparse's own errors (an unknown option, a value that is not a number) follow the same rule.
"""

from __future__ import annotations

import importlib
import sys

from glalearn.clierror import OneLineParser, UserError, guarded

COMMANDS = {
    "doctor": ("glalearn.diagnostics", "check this machine: versions, GPU or Triton interpreter, widgets"),
    "grade": ("glalearn.grade", "grade exercise notebooks: glalearn grade NOTEBOOK... [--json FILE]"),
    "progress": ("glalearn.progress", "your latest result on every exercise"),
}


def usage() -> str:
    lines = ["usage: glalearn COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glalearn: error: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return guarded(f"glalearn {name}", module.main, rest)


__all__ = ["COMMANDS", "OneLineParser", "UserError", "main", "usage"]

if __name__ == "__main__":
    sys.exit(main())
