"""`glalearn progress`: your last score on every exercise notebook.

`glalearn grade` records each notebook's score in a small JSON file — ``.glalearn/progress.json`` in
the project root when running from a clone (git-ignored), else ``~/.glalearn/progress.json``; the
environment variable ``GLALEARN_PROGRESS`` names another file. Nothing is written into notebooks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def progress_file() -> Path:
    if os.environ.get("GLALEARN_PROGRESS"):
        return Path(os.environ["GLALEARN_PROGRESS"])
    if (ROOT / "exercises").is_dir() and (ROOT / "pyproject.toml").exists():
        return ROOT / ".glalearn" / "progress.json"
    return Path.home() / ".glalearn" / "progress.json"


def _key(path: str | Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def load() -> dict:
    f = progress_file()
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return {}


def record(path: str | Path, grade) -> None:
    """Remember a notebook's latest grade (a glalearn.grade.NotebookGrade)."""
    data = load()
    data[_key(path)] = {
        "score": grade.score, "max_score": grade.max_score,
        "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exercises": {e.id: e.status for e in grade.exercises},
    }
    f = progress_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(f)


def report(exercises_dir: Path | None = None) -> str:
    exercises_dir = exercises_dir or ROOT / "exercises"
    data = load()
    lines = [f"progress ({progress_file()})"]
    total = best = 0
    for nb in sorted(exercises_dir.glob("*.ipynb")):
        entry = data.get(_key(nb))
        if entry is None:
            lines.append(f"  {nb.name:<40} not graded yet (glalearn grade {os.path.relpath(nb)})")
            continue
        passed = sum(s == "passed" for s in entry["exercises"].values())
        lines.append(f"  {nb.name:<40} {entry['score']:>3}/{entry['max_score']:<3} points  "
                     f"{passed}/{len(entry['exercises'])} passed  (graded {entry['graded_at']})")
        total += entry["score"]
        best += entry["max_score"]
    lines.append(f"  total of graded notebooks: {total}/{best} points")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="glalearn progress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exercises", type=Path, default=None, help="folder of exercise notebooks")
    args = parser.parse_args(argv)
    print(report(args.exercises))
    return 0


if __name__ == "__main__":
    sys.exit(main())
