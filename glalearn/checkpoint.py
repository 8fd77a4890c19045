"""Checkpoints written as one set, and checked against a manifest when read (chapter 9).

A checkpoint is a folder of files that only make sense together (the weights, their config, the
optimizer's moments, the step they belong to). :func:`write_set` never lets a reader see half of one:

1. every file is written into a temporary folder beside the target (``PARENT/.NAME.tmp-PID``) and
   fsynced (its bytes are on the disk, not only in the page cache);
2. ``manifest.json`` records each file's size and SHA-256, and is fsynced too, then the folder itself;
3. one ``os.rename`` gives the folder its name, and the parent folder is fsynced (the rename is on disk).

A crash or a kill at any moment leaves either no new folder (only a ``.tmp`` one, which the next run
removes) or the complete new one. :func:`verify` compares a folder with its manifest and lists every
missing, truncated or changed file, so a damaged checkpoint is reported instead of half-loaded.

A training run's folder holds its latest checkpoint as ``checkpoint-NNNNNNNN`` (the step, 8 digits);
the previous one is removed only after the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "glalearn-checkpoint-1"
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d{8,})")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` steps: checkpoint-00000252."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable. A no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (a reader sees the old file or the new one), fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_set(parent: Path, name: str, writers: dict[str, Callable[[Path], None]], meta: dict | None = None,
              replace: bool = False) -> Path:
    """Write the files of one checkpoint as a set: ``writers[file](path)`` writes each file at ``path``.

    Returns ``parent / name``. With ``replace`` an existing folder of that name that holds only
    checkpoint files (the names in ``writers`` and the manifest) is replaced; otherwise an existing
    folder is an error. See the module docstring for the order of writes, fsyncs and the rename.
    """
    parent, final = Path(parent), Path(parent) / name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {}
        for fname, write in writers.items():
            path = tmp / fname
            write(path)
            fsync_file(path)
            files[fname] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {"format": FORMAT, **(meta or {}), "files": files}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists already; a checkpoint folder is never overwritten")
            extra = {p.name for p in final.iterdir()} - set(writers) - {MANIFEST}
            if not final.is_dir() or extra:
                raise FileExistsError(f"{final} holds other files than a checkpoint's ({sorted(extra)}); "
                                      "choose another folder")
            trash = parent / f".trash-{name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return final


def read_manifest(folder: Path) -> dict:
    """The folder's manifest.json; ValueError when it is not a readable manifest."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not valid JSON: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} is not a glalearn checkpoint manifest (format {FORMAT!r})")
    return manifest


def verify(folder: Path, required: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[str]:
    """Every problem of a checkpoint folder, in words ([] when it is complete and intact).

    ``required``: files that must exist (and be in the manifest). ``only``: check just these files'
    hashes (default: every file the manifest lists). A folder without a manifest is one problem.
    """
    folder = Path(folder)
    problems = [f"{f} is missing" for f in required if not (folder / f).is_file()]
    if not (folder / MANIFEST).is_file():
        return problems + [f"{MANIFEST} is missing (a checkpoint is complete only with its manifest)"]
    try:
        files = read_manifest(folder)["files"]
    except ValueError as err:
        return problems + [str(err)]
    problems += [f"{f} is not listed in {MANIFEST}" for f in required if f not in files and (folder / f).is_file()]
    for fname, entry in files.items():
        if only is not None and fname not in only:
            continue
        path = folder / fname
        if not path.is_file():
            if fname not in required:
                problems.append(f"{fname} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{fname} is truncated or changed ({size:,} bytes, {MANIFEST} says {entry.get('bytes'):,})")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{fname} is corrupt (its SHA-256 differs from the one in {MANIFEST})")
    return problems


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint-NNNNNNNN folder in a run folder, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CHECKPOINT_RE.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


_STALE_RE = re.compile(r"\.(checkpoint-\d{8,}|train_log\.json)\.tmp-\d+|\.trash-checkpoint-\d{8,}-\d+")


def remove_stale(out: Path) -> None:
    """Remove what an interrupted write left behind in a run folder: the temporary folders of
    checkpoints (.checkpoint-*.tmp-PID), the log's temporary file and checkpoints being deleted."""
    out = Path(out)
    if not out.is_dir():
        return
    for p in out.iterdir():
        if _STALE_RE.fullmatch(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def prune(out: Path, keep: Path) -> None:
    """Remove every checkpoint folder of ``out`` but ``keep`` (each renamed away first, then deleted)."""
    for _, p in list_checkpoints(out):
        if p.resolve() != Path(keep).resolve():
            trash = Path(out) / f".trash-{p.name}-{os.getpid()}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(Path(out))
