"""The front matter is generated from the book: README's chapter table and chapter 0's table against
``glalearn.frontmatter`` and the exercise registry, and the chapter list against the notebooks."""

import json
import re
from pathlib import Path

import pytest

from glalearn import frontmatter
from glalearn.checks import exercises

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
ASSETS = ROOT / "glalearn" / "assets"


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def _notebook(ch):
    return CHAPTERS / f"{ch.stem}.ipynb"


def test_readme_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert frontmatter.readme_with_table(text) == text, "README is stale: run python -m glalearn.frontmatter"
    assert frontmatter.chapter_table("readme") in text


def test_readme_check_command_agrees(tmp_path, capsys):
    assert frontmatter.main(["--check"]) == 0
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "README.md").read_text().replace("| 9 | Training a tiny GLA", "| 9 | Training"))
    assert frontmatter.main(["--check", "--readme", str(stale)]) == 1
    assert frontmatter.main(["--readme", str(stale)]) == 0 and frontmatter.main(["--check", "--readme", str(stale)]) == 0


def test_readme_without_markers_is_a_clear_error(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text("# no table here\n")
    with pytest.raises(ValueError, match="markers"):
        frontmatter.main(["--check", "--readme", str(bad)])
    with pytest.raises(FileNotFoundError, match="--readme"):
        frontmatter.main(["--readme", str(tmp_path / "missing.md")])


def test_chapter_zero_shows_the_generated_table():
    cells = [c for c in _cells(CHAPTERS / "00_orientation.ipynb")
             if c["cell_type"] == "code" and "frontmatter.show(" in _source(c)]
    assert len(cells) == 1, "chapter 0 shows the chapter table from glalearn.frontmatter in one cell"
    shown = ["".join(o["data"]["text/markdown"]) for o in cells[0]["outputs"] if "text/markdown" in o.get("data", {})]
    assert shown == [frontmatter.chapter_table("orientation")], "re-execute chapter 0"


def test_chapter_zero_types_no_gpu_or_exercise_counts_of_its_own():
    # what chapter 0 says about other chapters' exercises and GPUs comes from the generated table only
    prose = "\n".join(_source(c) for c in _cells(CHAPTERS / "00_orientation.ipynb") if c["cell_type"] == "markdown")
    assert not re.search(r"[AH]100|H200", prose)
    assert not re.search(r"no exercises|has no exercise", prose)


def test_the_chapter_list_is_the_book():
    stems = sorted(p.stem for p in CHAPTERS.glob("*.ipynb"))
    assert [ch.stem for ch in frontmatter.CHAPTERS] == stems
    assert [ch.number for ch in frontmatter.CHAPTERS] == [int(s[:2]) for s in stems]
    for ch in frontmatter.CHAPTERS:
        heading = _source(_cells(_notebook(ch))[0]).splitlines()[0]
        assert re.fullmatch(rf"# (Chapter {ch.number}|Appendix \(chapter {ch.number}\)) — {re.escape(ch.title)}",
                            heading), heading


def test_every_registered_exercise_belongs_to_a_chapter_that_points_to_it():
    by_stem = {ch.stem: ch for ch in frontmatter.CHAPTERS}
    registered = exercises()
    assert registered
    for ex in registered.values():
        assert ex.notebook in by_stem, f"exercise {ex.id} is registered for {ex.notebook}, which is no chapter"
        assert ex.id.split(".")[0] == str(by_stem[ex.notebook].number)
    for ch in frontmatter.CHAPTERS:
        ids = [e.id for e in frontmatter.exercises_of(ch)]
        closing = _source(_cells(_notebook(ch))[-1])
        mentioned = set(re.findall(rf"(?<![§.\d]){ch.number}\.\d+\b", closing))  # not "§4.3"
        assert mentioned <= set(ids), f"chapter {ch.number}'s summary names {mentioned - set(ids)}, not registered"
        if ids:
            assert f"exercises/{ch.stem}.ipynb" in closing
            assert (ROOT / "exercises" / f"{ch.stem}.ipynb").is_file()
            assert set(ids) <= mentioned, f"chapter {ch.number}'s summary leaves out {set(ids) - mentioned}"


def _marker(path: str) -> str:
    """What a notebook's code names to read a results file: its file name, a checkpoint's name, or the
    fixed part of a glob."""
    folder, _, name = path.rpartition("/")
    if folder.startswith("checkpoints/"):
        return folder.split("/", 1)[1]
    return name.split("*")[0] if "*" in name else name


def test_each_chapters_gpu_results_exist_record_their_gpu_and_are_read_by_it():
    for ch in frontmatter.CHAPTERS:
        code = "\n".join(_source(c) for c in _cells(_notebook(ch)) if c["cell_type"] == "code")
        text = "\n".join(_source(c) for c in _cells(_notebook(ch)))
        for pattern in ch.results:
            assert _marker(pattern) in text, f"chapter {ch.number} does not read {pattern}"
        for path in frontmatter.results_files(ch):
            assert (ASSETS / path).is_file()
            assert re.search(r"NVIDIA|GPU", frontmatter.results_gpu(path))
        # conversely: every GPU results file the chapter's code names is in its row
        for file in sorted(ASSETS.glob("*/*.json")):
            rel = f"{file.parent.name}/{file.name}"
            if not _is_gpu_file(rel) or file.name not in code:
                continue
            assert any(re.fullmatch(p.replace("*", ".*"), rel) for p in ch.results), \
                f"chapter {ch.number} reads {rel}, which its row in glalearn.frontmatter leaves out"


def _is_gpu_file(rel):
    try:
        frontmatter.results_gpu(rel)
    except ValueError:
        return False
    return True


def test_results_gpu_reads_the_machine_and_counts_cards():
    assert frontmatter.results_gpu("benchmarks/h200.json") == "NVIDIA H200"
    scaling = json.loads((ASSETS / "results" / "scaling_h200.json").read_text())
    assert frontmatter.results_gpu("results/scaling_h200.json") == f"{len(scaling['machine']['gpus'])} × NVIDIA H200"
    with pytest.raises(ValueError, match="records no GPU"):
        frontmatter.results_gpu("results/recall_cpu.json")
    with pytest.raises(FileNotFoundError):
        frontmatter.results_gpu("results/none.json")
    with pytest.raises(ValueError, match="chapter must be one of"):
        frontmatter.chapter(12)
    with pytest.raises(ValueError, match="kind must be"):
        frontmatter.chapter_table("html")


def test_totals_count_the_registry():
    registered = list(exercises().values())
    line = frontmatter.totals()
    assert line.startswith(f"{len(registered)} exercises ({sum(e.points for e in registered)} points)")


def test_chapter_zero_prints_the_notation_contract_of_contributing():
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    contract = contributing[contributing.index("**Indices count from 0"):contributing.index("## Adding a form")].strip()
    notation = [_source(c) for c in _cells(CHAPTERS / "00_orientation.ipynb")
                if c["cell_type"] == "markdown" and _source(c).startswith("## 1. Notation")]
    assert len(notation) == 1 and notation[0].strip().endswith(contract), "chapter 0 §1 and CONTRIBUTING.md differ"
