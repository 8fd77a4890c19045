"""The project's own promises: dependency lists agree, the layout is as documented."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda package name -> PyPI name


def _name(spec: str) -> str:
    return re.split(r"[<>=!;\s\[]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_and_pyproject_declare_the_same_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pip_names = {_name(d) for d in pyproject["project"]["dependencies"]}
    conda_names = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        m = re.match(r"^\s+-\s+([A-Za-z0-9_.-]+)", line)
        if m and not line.strip().startswith("- -e") and m.group(1) not in ("python", "pip"):
            conda_names.add(CONDA_NAMES.get(m.group(1).lower(), m.group(1).lower()))
    assert pip_names == conda_names, f"only in pyproject: {pip_names - conda_names}; only in environment.yml: {conda_names - pip_names}"


def test_fixed_top_level_layout():
    for name in ["chapters", "glalearn", "kernels", "exercises", "solutions", "tests", "environment.yml",
                 "pyproject.toml", "Makefile", "README.md", "CONTRIBUTING.md", ".ci/run"]:
        assert (ROOT / name).exists(), name


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_kernels_are_importable_as_glalearn_kernels_only():
    import glalearn.kernels  # noqa: F401  (mapped from kernels/ by pyproject.toml)

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"]["glalearn.kernels"] == "kernels"


def test_corpus_is_package_data():
    from importlib.resources import files

    text = (files("glalearn") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert len(text) == 1_115_394


def test_public_functions_document_shapes_and_chapter():
    import glalearn
    from glalearn import gates

    for fn in [glalearn.recurrent_gla, glalearn.parallel_gla, glalearn.chunk_gla, glalearn.two_level_chunk_gla,
               gates.gla_gate, gates.decay_mask]:
        doc = fn.__doc__ or ""
        assert "chapter" in doc.lower(), fn.__name__
        assert "[" in doc, fn.__name__  # a shape such as [B, T, H, K]
