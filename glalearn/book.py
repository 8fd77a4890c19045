"""Re-execute the book's notebooks in place, top to bottom, in a fresh kernel: `python -m glalearn.book`.

    python -m glalearn.book                      # every chapter and solution notebook
    python -m glalearn.book chapters/03_*.ipynb  # just these

Each notebook runs from a fresh kernel with the working directory set to its folder, so no cell can
depend on hidden state. Notebooks seed their own random generators in their first code cell. The
time each one took is printed (and never stored in the notebook).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def execute_notebook(path: str | Path, timeout: int = 600) -> float:
    """Execute one notebook in place; return the seconds it took. Raises on the first failing cell."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: Triton kernels in the interpreter
    try:
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("TRITON_INTERPRET", None)
    nbformat.write(nb, path)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glalearn.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="default: chapters/*.ipynb solutions/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(glob.glob(str(ROOT / "chapters" / "*.ipynb"))) + sorted(
        glob.glob(str(ROOT / "solutions" / "*.ipynb")))
    for p in paths:
        seconds = execute_notebook(p, timeout=args.timeout)
        print(f"{seconds:7.1f} s  {os.path.relpath(p)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
