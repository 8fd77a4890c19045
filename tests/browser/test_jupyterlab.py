"""The book as a learner meets it: chapter 1 and its exercises in JupyterLab, in a real browser.

A learner opens ``chapters/01_*.ipynb``, runs all cells, drags the gate-decay explorer's τ slider and
expects the plot to change; then opens ``exercises/01_*.ipynb``, runs it with the stubs unfilled and
expects a friendly "not started" message rather than a traceback; then fills the first exercise in wrongly,
runs all cells, and expects the failed check's diagnosis, no traceback, and every later cell run. This test does
exactly that in Chromium (see conftest.py for how the browser and the server are started and removed). Screenshots go
to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"  # git-ignored
RUN_TIMEOUT_S = 150  # chapters run in under 60 s on a 2-core CPU under nbval
CHECK_CALL = re.compile(r"^(?!\s*def\s).*\bcheck\(", re.MULTILINE)  # a call glalearn.check(...) / check(...)
NOT_STARTED = re.compile(r"not (yet )?started", re.IGNORECASE)
MAX_NOT_STARTED_CHARS = 600  # the "not started" line with its hint is ~200
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b.*$", re.MULTILINE)


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _notebook(lab, folder: str) -> Path:
    found = sorted((lab.source / folder).glob("01_*.ipynb"))
    assert found, f"no {folder}/01_*.ipynb in {lab.source}"
    return found[0]


def _deliberate_errors(path: Path) -> frozenset[int]:
    """Indices of the cells tagged ``raises-exception`` (an error shown on purpose)."""
    nb = nbformat.read(path, as_version=4)
    return frozenset(i for i, cell in enumerate(nb.cells) if "raises-exception" in cell.metadata.get("tags", []))


def _code_cells(path: Path) -> list[tuple[int, str]]:
    """(index among all cells, source) of every non-empty code cell; the notebook must name its kernel."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name"), f"{path.name} has no kernelspec: JupyterLab would ask"
    return [(i, cell.source) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]


def _open(page, lab, relpath: str) -> None:
    """Open a notebook and wait until its kernel has started and is idle.

    The server must list a kernel for this notebook, and the toolbar's execution indicator must then
    read "idle" for a second: the indicator alone reads "idle" for a moment before the kernel exists,
    and a Run All in that moment makes JupyterLab ask for a kernel.
    """
    page.goto(lab.url(relpath), wait_until="domcontentloaded")
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Cell").first.wait_for(state="visible", timeout=60_000)
    deadline = time.monotonic() + 90
    while not any(s["path"] == relpath and s.get("kernel") for s in lab.api("sessions")):
        assert time.monotonic() < deadline, f"JupyterLab started no kernel for {relpath}:\n{lab.log_tail()}"
        assert page.locator(".jp-Dialog").count() == 0, f"JupyterLab asks: {page.locator('.jp-Dialog').inner_text()}"
        page.wait_for_timeout(250)
    indicator = panel.locator(".jp-Notebook-ExecutionIndicator")
    idle_since = None
    while idle_since is None or time.monotonic() - idle_since < 1.0:
        assert time.monotonic() < deadline, f"the kernel of {relpath} is not idle: {indicator.get_attribute('data-status')}"
        idle = indicator.count() == 1 and indicator.get_attribute("data-status") == "idle"
        idle_since = (idle_since or time.monotonic()) if idle else None
        page.wait_for_timeout(200)
    assert page.locator(".jp-Dialog").count() == 0, f"JupyterLab asks: {page.locator('.jp-Dialog').inner_text()}"


def _run_menu(page, item: str) -> None:
    """Run → <item>, through the menu bar as a learner would."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^" + re.escape(item))).first.click()


_PROMPTS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')).map(e => e.textContent.trim())"""


def _wait_for_run(page, expected: int, timeout_s: float = RUN_TIMEOUT_S) -> list[str]:
    """Wait until no cell is queued or running ("[*]"); return the code cells' prompts."""
    deadline, started = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        prompts = page.evaluate(_PROMPTS_JS)
        running = any("*" in p for p in prompts)
        started = started or running or sum(bool(re.search(r"\[\d+\]", p)) for p in prompts) >= expected
        if started and not running:
            page.wait_for_timeout(500)  # let the last outputs and widget views land
            if not any("*" in p for p in page.evaluate(_PROMPTS_JS)):
                return page.evaluate(_PROMPTS_JS)
        page.wait_for_timeout(250)
    raise AssertionError(f"cells still running after {timeout_s:.0f} s: {page.evaluate(_PROMPTS_JS)}")


def _visible_errors(page, deliberate: frozenset[int] = frozenset()) -> list[str]:
    """Texts of stderr/error outputs that look like tracebacks (JupyterLab renders errors as stderr).

    ``deliberate``: indices of cells tagged ``raises-exception`` (their error is the lesson; nbval and
    JupyterLab's Run All both go on after them).
    """
    found = page.evaluate("""() => {
        const cells = Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell'));
        return Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) '
            + '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
            .map(e => [cells.indexOf(e.closest('.jp-Cell')), e.innerText]);
    }""")
    return [f"(cell {i}) {text}" for i, text in found if i not in deliberate and TRACEBACK.search(text)]


def _output_texts(page) -> list[str]:
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')).map(e => e.innerText)""")


def _check_ran_cleanly(page, name: str, expected: int, prompts: list[str],
                       deliberate: frozenset[int] = frozenset()) -> None:
    errors = _visible_errors(page, deliberate)
    assert not errors, f"{name}: a cell shows an error in JupyterLab:\n" + "\n---\n".join(e[-2000:] for e in errors)
    done = sum(bool(re.search(r"\[\d+\]", p)) for p in prompts)
    why = (" (JupyterLab's Run All stops after a cell tagged raises-exception, unlike nbval: show the error"
           " with try/except and print instead)" if deliberate else "")
    assert done == expected, f"{name}: {done} of {expected} code cells ran{why} (prompts {prompts})"


def _screenshot(locator, name: str) -> Path:
    path = artifacts_dir() / name
    locator.screenshot(path=str(path))
    return path


def _wait_for_figure(explorer, previous: str | None, what: str, timeout_s: float = 30) -> str:
    """The src of the explorer's figure once it is a loaded image different from ``previous``.

    Fails at once with the text of an error the explorer shows in place of its figure.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        errors = explorer.locator('.widget-output .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        if errors.count():
            pytest.fail(f"{what}: the explorer shows an error instead of its figure:\n{errors.first.inner_text()}")
        images = explorer.locator(".widget-output img")
        if images.count():
            state = images.first.evaluate("img => ({src: img.src, width: img.naturalWidth, done: img.complete})")
            if state["done"] and state["width"] > 0 and state["src"] != previous:
                return state["src"]
        if time.monotonic() > deadline:
            shown = explorer.locator(".widget-output").inner_text()[:300]
            pytest.fail(f"{what}: no new figure as a loaded image after {timeout_s:.0f} s "
                        f"({'the same image as before' if images.count() else 'no image'}; output text {shown!r})")
        explorer.page.wait_for_timeout(200)


def test_chapter_1_runs_and_the_tau_slider_redraws_the_gate_decay_explorer(page, lab):
    source = _notebook(lab, "chapters")
    expected, deliberate = len(_code_cells(source)), _deliberate_errors(source)
    _open(page, lab, f"chapters/{source.name}")
    _run_menu(page, "Run All Cells")
    prompts = _wait_for_run(page, expected)
    _check_ran_cleanly(page, source.name, expected, prompts, deliberate)

    # The explorer: a widget box holding the τ slider and an Output widget with the figure.
    tau = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="τ"))
    if tau.count() == 0:
        widgets = [t[:200] for t in _output_texts(page) if "Box(" in t or "widget" in t.lower()]
        pytest.fail(f"no τ slider rendered in {source.name} (is the ipywidgets front end active?); "
                    f"widget-like outputs: {widgets}")
    tau = tau.first
    explorer = page.locator(".widget-vbox", has=tau).filter(has=page.locator(".widget-output")).last
    assert explorer.count() == 1, "the τ slider is not in a box with an Output widget (the explorer's figure)"
    assert explorer.locator(".widget-slider").count() >= 2, "the explorer should show its τ and bias sliders"
    explorer.scroll_into_view_if_needed()
    before = _wait_for_figure(explorer, previous=None, what="the explorer's first figure")
    readout = tau.locator(".widget-readout")
    tau_before = float(readout.inner_text())
    _screenshot(explorer, "explorer_before.png")

    # Drag the τ handle a third of the track to the left, as a learner would with the mouse.
    handle, track = tau.locator(".noUi-handle").first, tau.locator(".noUi-target, .slider").first
    hbox, tbox = handle.bounding_box(), track.bounding_box()
    assert hbox and tbox, "the τ slider has no on-screen handle"
    x, y = hbox["x"] + hbox["width"] / 2, hbox["y"] + hbox["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - tbox["width"] / 3, y, steps=12)
    page.mouse.up()
    after = _wait_for_figure(explorer, previous=before, what="the figure after dragging τ")
    tau_after = float(readout.inner_text())
    _screenshot(explorer, "explorer_after.png")
    assert tau_after < tau_before, f"dragging the τ handle left did not lower τ ({tau_before} -> {tau_after})"

    # The keyboard works too: the focused handle moves one step per arrow key.
    handle.focus()
    page.keyboard.press("ArrowRight")
    _wait_for_figure(explorer, previous=after, what="the figure after an arrow key on the τ handle")
    assert float(readout.inner_text()) > tau_after, "the arrow key did not move the focused τ slider"
    assert not _visible_errors(page, deliberate), "moving the sliders printed an error"


def test_exercise_1_check_on_a_stub_says_not_started(page, lab):
    source = _notebook(lab, "exercises")
    code = _code_cells(source)
    checks = [i for i, src in code if CHECK_CALL.search(src)]
    assert checks, f"{source.name} has no check cell (a code cell calling check(...))"
    first_check = checks[0]
    _open(page, lab, f"exercises/{source.name}")

    # Select the first check cell, run everything above it, then the check cell itself: the stub above
    # it is unfilled, so the check must say "not started" rather than show a traceback.
    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(first_check)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputPrompt").click()
    above = sum(1 for i, _ in code if i < first_check)
    _run_menu(page, "Run All Above Selected Cell")
    _check_ran_cleanly(page, source.name + " (cells above the check)", above, _wait_for_run(page, above))
    cell.locator(".jp-InputPrompt").click()
    _run_menu(page, "Run Selected Cell")
    prompts = _wait_for_run(page, above + 1)
    _check_ran_cleanly(page, source.name + " (up to the check cell)", above + 1, prompts)

    outputs = cell.locator(".jp-OutputArea-output")
    texts = outputs.all_inner_texts()
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir() / "exercise_01_not_started.png"))
    assert any(NOT_STARTED.search(t) for t in texts), (
        f"the check cell on an unfilled stub did not say 'not started'; its outputs: {[t[:300] for t in texts]}")
    assert not any(TRACEBACK.search(t) for t in texts), f"the check cell shows a traceback: {texts}"
    # A friendly line, not a wall: e.g. the check's return value shown as a dataclass repr would bury it.
    shown = "\n".join(texts)
    assert len(shown) <= MAX_NOT_STARTED_CHARS, (
        f"the check cell on a stub shows {len(shown)} characters in {len(texts)} outputs, more than a "
        f"'not started' line needs ({MAX_NOT_STARTED_CHARS}); the outputs begin: {[t[:160] for t in texts]}")


WRONG_STEP = ("    new_state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # forgot the gate\n"
              "    return scale * (q_t.unsqueeze(-2) @ new_state).squeeze(-2), new_state")


def test_a_failed_check_shows_its_diagnosis_without_a_traceback_and_run_all_goes_on(page, lab):
    source = _notebook(lab, "exercises")
    nb = nbformat.read(source, as_version=4)
    filled = [c for c in nb.cells if c.cell_type == "code" and 'raise NotImplementedError("Exercise 1.1 ' in c.source]
    assert len(filled) == 1, f"{source.name}: no stub of exercise 1.1"
    filled[0].source = filled[0].source.split("    raise NotImplementedError")[0] + WRONG_STEP
    name = "01_with_a_wrong_answer.ipynb"
    nbformat.write(nb, lab.root / "exercises" / name)
    code = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    first_check = next(i for i, src in code if CHECK_CALL.search(src))

    _open(page, lab, f"exercises/{name}")
    _run_menu(page, "Run All Cells")
    prompts = _wait_for_run(page, len(code))
    _check_ran_cleanly(page, name, len(code), prompts)  # every cell ran: the failure did not stop Run All

    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(first_check)
    cell.scroll_into_view_if_needed()
    texts = cell.locator(".jp-OutputArea-output").all_inner_texts()
    page.screenshot(path=str(artifacts_dir() / "exercise_01_failed_check.png"))
    shown = "\n".join(texts)
    assert "✗ Exercise 1.1 (one recurrent step): failed" in shown, f"no failed verdict; outputs: {texts}"
    assert "likely mistake: the gate is missing" in shown and "first divergence" in shown, shown[:1500]
    assert not TRACEBACK.search(shown), f"the failed check shows a traceback:\n{shown[:2000]}"
    stderr = cell.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    assert stderr.count() == 0, f"the failed check wrote to stderr: {stderr.all_inner_texts()}"
