"""The `glalearn` command: `glalearn doctor | grade NOTEBOOK... | progress`.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "doctor": ("glalearn.diagnostics", "check this machine: versions, GPU or Triton interpreter, widgets"),
    "grade": ("glalearn.grade", "grade exercise notebooks: glalearn grade NOTEBOOK... [--json FILE]"),
    "progress": ("glalearn.progress", "your last score on every exercise notebook"),
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
        print(f"glalearn: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
