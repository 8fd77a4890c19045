"""`glalearn progress`: your latest result on every exercise, wherever its notebook lives.

`glalearn grade` keeps one record per graded notebook, a small JSON file in the progress folder —
``.glalearn/progress/`` in the project root when running from a clone (git-ignored), else
``~/.glalearn/progress/``; the environment variable ``GLALEARN_PROGRESS`` names another folder. A record
holds the notebook's path, when it was graded and the status and points of each exercise, by exercise
ID, so a copy of ``exercises/03_chunkwise.ipynb`` graded from anywhere counts for chapter 3.

Only the grader writes records, in its own process, each one atomically (a temporary file renamed
over the old one) so that concurrent graders never leave a half-written file. Every record is
validated when read: its structure, its points against the exercise registry, and a digest keyed by a
secret in the folder (``.key``) that catches hand edits and files written by anything but the grader.
A record that fails is reported with its path, kept aside as ``<file>.bak`` and replaced by a fresh
record at the next grade; nothing else is affected. (The digest cannot stop a program that reads the
key and the grader's code on purpose; it keeps honest mistakes and stray cells from showing a score.)
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = 1
KEY_FILE = ".key"


class ProgressError(ValueError):
    """A progress record that cannot be trusted (the message says why)."""


def progress_dir() -> Path:
    if os.environ.get("GLALEARN_PROGRESS"):
        return Path(os.environ["GLALEARN_PROGRESS"])
    if (ROOT / "exercises").is_dir() and (ROOT / "pyproject.toml").exists():
        return ROOT / ".glalearn" / "progress"
    return Path.home() / ".glalearn" / "progress"


def _folder(create: bool) -> Path:
    folder = progress_dir()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the progress folder {folder} is a file (GLALEARN_PROGRESS names a folder)")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _key(folder: Path, create: bool) -> bytes | None:
    """The folder's secret, created (atomically, readable by you only) when missing and ``create``."""
    path = folder / KEY_FILE
    if not path.exists():
        if not create:
            return None
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
        try:
            os.link(tmp, path)  # fails if another grader created it first: then use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise ProgressError(f"{path} is not a progress key (delete it: records written with it are then set aside)")
    return key


def _digest(key: bytes, record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "digest"}
    return hmac.new(key, json.dumps(body, sort_keys=True, ensure_ascii=True).encode(), hashlib.sha256).hexdigest()


def record_path(notebook: str | Path, folder: Path | None = None) -> Path:
    """The record file of one notebook: its stem and a hash of its absolute path."""
    notebook = Path(notebook).resolve()
    digest = hashlib.sha256(str(notebook).encode()).hexdigest()[:12]
    return (folder or progress_dir()) / f"{notebook.stem}-{digest}.json"


def validate(record, key: bytes | None) -> dict:
    """``record`` if it is a well-formed record whose points agree with the registry; else ProgressError."""
    from glalearn import checks
    from glalearn.checks.core import PASSED, STATUSES

    if not isinstance(record, dict):
        raise ProgressError(f"a record is a JSON object, this is a {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise ProgressError(f"unknown format {record.get('format')!r} (expected {FORMAT})")
    for name, kind in (("notebook", str), ("graded_at", str), ("exercises", dict), ("score", int),
                       ("max_score", int), ("digest", str)):
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise ProgressError(f"{name!r} must be a {kind.__name__}, got {record.get(name)!r}")
    known = checks.exercises()
    score = max_score = 0
    for exercise_id, entry in record["exercises"].items():
        if not isinstance(entry, dict):
            raise ProgressError(f"exercise {exercise_id}: expected an object, got {entry!r}")
        status, points, max_points = entry.get("status"), entry.get("points"), entry.get("max_points")
        if status not in STATUSES:
            raise ProgressError(f"exercise {exercise_id}: unknown status {status!r}")
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in (points, max_points)):
            raise ProgressError(f"exercise {exercise_id}: points must be integers, got {points!r}/{max_points!r}")
        if exercise_id in known and max_points != known[exercise_id].points:
            raise ProgressError(f"exercise {exercise_id} is worth {known[exercise_id].points} points, "
                                f"the record says {max_points}")
        if points != (max_points if status == PASSED else 0):
            raise ProgressError(f"exercise {exercise_id}: {points} points for status {status!r}")
        score, max_score = score + points, max_score + max_points
    if (score, max_score) != (record["score"], record["max_score"]):
        raise ProgressError(f"the total {record['score']}/{record['max_score']} is not the sum of the exercises "
                            f"({score}/{max_score})")
    if key is None or not hmac.compare_digest(record["digest"], _digest(key, record)):
        raise ProgressError("its digest does not match: it was not written by glalearn grade "
                            "(edited by hand, or written by a notebook cell)")
    return record


@dataclass
class Loaded:
    """The valid records of the progress folder, and what was wrong with the others (set aside)."""

    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _set_aside(path: Path, why: str) -> str:
    backup = path.with_name(path.name + ".bak")
    try:
        os.replace(path, backup)
        kept = f"kept as {backup}"
    except OSError as exc:
        kept = f"could not be moved aside ({exc})"
    return f"{path} is not a valid progress record ({why}); {kept}, a fresh record is started at the next grade"


def _read(path: Path, key: bytes | None) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgressError(f"unreadable: {exc}") from None
    if not text.strip():
        raise ProgressError("the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProgressError(f"not JSON: {exc}") from None
    return validate(data, key)


def load() -> Loaded:
    """Every record in the progress folder; invalid ones are set aside (``.bak``) and reported."""
    loaded = Loaded()
    folder = _folder(create=False)
    if not folder.is_dir():
        return loaded
    try:
        key = _key(folder, create=False)
    except ProgressError as exc:
        loaded.problems.append(str(exc))
        key = None
    for path in sorted(folder.glob("*.json")):
        try:
            loaded.records.append(_read(path, key))
        except ProgressError as exc:
            loaded.problems.append(_set_aside(path, str(exc)))
    return loaded


def _inside_a_notebook() -> bool:
    from glalearn.checks.core import UNDER_GRADER

    if os.environ.get(UNDER_GRADER):
        return True
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def record(path: str | Path, grade) -> list[str]:
    """Write a notebook's latest grade (a ``glalearn.grade.NotebookGrade``); return the problems found.

    Called by ``glalearn grade`` in its own process; refuses inside a notebook's kernel. The notebook's
    old record, if it is not valid, is set aside as ``.bak`` (and reported) before the new one is written.
    """
    if _inside_a_notebook():
        raise PermissionError("progress records are written by glalearn grade only, not from a notebook")
    folder = _folder(create=True)
    key = _key(folder, create=True)
    target = record_path(path, folder)
    problems = []
    if target.exists():
        try:
            _read(target, key)
        except ProgressError as exc:
            problems.append(_set_aside(target, str(exc)))
    data = {
        "format": FORMAT, "notebook": str(Path(path).resolve()),
        "graded_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "score": grade.score, "max_score": grade.max_score,
        "exercises": {e.id: {"status": e.status, "points": e.points, "max_points": e.max_points}
                      for e in grade.exercises},
    }
    data["digest"] = _digest(key, data)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return problems


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def report(exercises_dir: Path | None = None) -> str:
    """Per chapter notebook: the latest result of each of its exercises, from whichever notebook."""
    from glalearn import checks
    from glalearn.checks.core import PASSED

    exercises_dir = exercises_dir or ROOT / "exercises"
    loaded = load()
    latest: dict[str, tuple[str, str, dict]] = {}  # exercise ID -> (graded_at, notebook, entry)
    for rec in loaded.records:
        for exercise_id, entry in rec["exercises"].items():
            if exercise_id not in latest or rec["graded_at"] >= latest[exercise_id][0]:
                latest[exercise_id] = (rec["graded_at"], rec["notebook"], entry)
    by_notebook: dict[str, list] = {}
    for ex in checks.exercises().values():
        by_notebook.setdefault(ex.notebook, []).append(ex)
    plural = "s" if len(loaded.records) != 1 else ""
    lines = [f"progress ({_shown(str(progress_dir()))}, {len(loaded.records)} graded notebook{plural})"]
    total = graded_max = 0
    for stem, exs in by_notebook.items():
        seen = [latest[e.id] for e in exs if e.id in latest]
        if not seen:
            lines.append(f"  {stem:<36} not graded yet (glalearn grade {_shown(str(exercises_dir / (stem + '.ipynb')))})")
            continue
        points = sum(e.points for e in exs if e.id in latest and latest[e.id][2]["status"] == PASSED)
        passed = sum(1 for e in exs if e.id in latest and latest[e.id][2]["status"] == PASSED)
        worth = sum(e.points for e in exs)
        where = sorted({_shown(nb) for _, nb, _ in seen})
        when = max(at for at, _, _ in seen)[:19].replace("T", " ")
        lines.append(f"  {stem:<36} {points:>2}/{worth:<2} points  {passed}/{len(exs)} passed  "
                     f"(graded {when} UTC: {', '.join(where)})")
        total += points
        graded_max += worth
    all_points = sum(e.points for e in checks.exercises().values())
    lines.append(f"  total: {total}/{graded_max} points in the graded notebooks ({all_points} points in all)")
    for problem in loaded.problems:
        lines.append(f"warning: {problem}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from glalearn.clierror import OneLineParser

    parser = OneLineParser(prog="glalearn progress", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exercises", type=Path, default=None,
                        help="where your exercise notebooks are (for the grade commands it suggests)")
    args = parser.parse_args(argv)
    print(report(args.exercises))
    return 0


if __name__ == "__main__":
    from glalearn.clierror import guarded

    sys.exit(guarded("glalearn progress", main))
