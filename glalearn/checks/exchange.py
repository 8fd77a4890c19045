"""Files that carry a check's inputs into a notebook's kernel and the learner's outputs back.

``glalearn grade`` draws every case in its own process and writes the inputs, and only the inputs, to
a temporary folder per exercise (``cases.json`` for the structure and scalars, ``cases.safetensors``
for the tensors). The probe in the learner's kernel reads them, runs the learner's function and writes
what it returned or raised (``answers.json``, ``answers.safetensors``), atomically, so that a probe
interrupted half-way leaves no answers rather than half of them. The reference and the verdict never
enter the kernel.

A value is encoded as ``{"tensor": key}``, ``{"value": json scalar}``, ``{"tuple" | "list": [...]}``
or ``{"foreign": type name}`` (anything else a learner's function may return: it is reported by its
type, e.g. "returned a dict, expected a tuple").
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SCALARS = (type(None), bool, int, float, str)


def encode(value: Any, tensors: dict[str, torch.Tensor], key: str, depth: int = 0) -> dict:
    """A JSON description of ``value``; its tensors are added to ``tensors`` under keys from ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(value, SCALARS):
        return {"value": value}
    if isinstance(value, (tuple, list)) and depth < 2:
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, tensors, f"{key}.{i}", depth + 1) for i, v in enumerate(value)]}
    return {"foreign": type(value).__name__}


def decode(spec: dict, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "value" in spec:
        return spec["value"]
    if "tuple" in spec:
        return tuple(decode(s, tensors) for s in spec["tuple"])
    if "list" in spec:
        return [decode(s, tensors) for s in spec["list"]]
    if "foreign" in spec:
        return foreign(str(spec["foreign"]))
    raise ValueError(f"not an encoded value: {spec!r}")


def foreign(type_name: str):
    """A stand-in for a returned object that cannot cross processes; it keeps its type's name."""
    cls = type(type_name, (), {"__repr__": lambda self: f"<a {type_name}>"})
    return cls()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(folder: str | Path, name: str, records: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """``name``.json (records) and ``name``.safetensors (tensors) in ``folder``; the JSON last."""
    from safetensors.torch import save as save_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / f"{name}.safetensors", save_bytes(tensors) if tensors else b"")
    _write_atomic(folder / f"{name}.json", json.dumps(records).encode("utf-8"))


def load(folder: str | Path, name: str) -> tuple[list[dict], dict[str, torch.Tensor]] | None:
    """What :func:`save` wrote, or None when ``name``.json is not there (the probe never finished)."""
    from safetensors.torch import load as load_bytes

    folder = Path(folder)
    if not (folder / f"{name}.json").exists():
        return None
    records = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    raw = (folder / f"{name}.safetensors").read_bytes()
    return records, (load_bytes(raw) if raw else {})


# ----------------------------------------------------------------------------- cases
def save_cases(folder: str | Path, cases) -> None:
    """The inputs of every case (label, args, kwargs); never ``expected``."""
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, case in enumerate(cases):
        records.append({
            "label": case.label,
            "args": [encode(a, tensors, f"c{i}.a{j}") for j, a in enumerate(case.args)],
            "kwargs": {k: encode(v, tensors, f"c{i}.k.{k}") for k, v in case.kwargs.items()},
        })
    save(folder, "cases", records, tensors)


def load_cases(folder: str | Path):
    from glalearn.checks.core import Case

    loaded = load(folder, "cases")
    if loaded is None:
        raise FileNotFoundError(f"no cases in {folder}")
    records, tensors = loaded
    return [Case(r["label"], tuple(decode(a, tensors) for a in r["args"]),
                 {k: decode(v, tensors) for k, v in r["kwargs"].items()}) for r in records]


# ----------------------------------------------------------------------------- answers
def save_answers(folder: str | Path, answers) -> None:
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, answer in enumerate(answers):
        records.append(answer.encode(tensors, f"r{i}"))
    save(folder, "answers", records, tensors)


def load_answers(folder: str | Path):
    """The learner's answers, or None when the probe wrote none."""
    from glalearn.checks.core import Answer

    loaded = load(folder, "answers")
    if loaded is None:
        return None
    records, tensors = loaded
    return [Answer.decode(r, tensors) for r in records]
