"""`glalearn doctor` / `glalearn.doctor()`: is this machine ready for the book? (chapter 0)

(The module is named diagnostics so that importing it never rebinds the name glalearn.doctor,
which is the function.)

Reports Python, torch, triton, the device the kernels will use (a GPU, or Triton's interpreter on a
CPU), JupyterLab and ipywidgets, whether the widget front-end extension is installed and enabled, and
which chapters can run here. Every problem comes with the exact command that fixes it.
Exit code: 0 when nothing is wrong, 1 when there is a problem.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Minimum versions, as pyproject.toml declares them.
MINIMUM = {"python": (3, 10), "torch": (2, 5), "triton": (3, 2), "jupyterlab": (4, 0), "ipywidgets": (8, 1)}
WIDGET_EXTENSION = "@jupyter-widgets/jupyterlab-manager"
# The book's chapters and what they need beyond torch, numpy and matplotlib.
CPU_CHAPTERS = (0, 1, 2, 3, 4, 5, 8, 9, 10, 11)
TRITON_CHAPTERS = (6, 7)


@dataclass
class Finding:
    """One line of the report: what was checked, what was found, and (for a problem) the fix."""

    name: str
    value: str
    problem: str | None = None
    fix: str | None = None
    note: str | None = None  # advice that is not a problem

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class DoctorReport:
    """The doctor's findings and the chapters that can run here (chapter 0)."""

    findings: list[Finding] = field(default_factory=list)
    chapters: dict[int, str] = field(default_factory=dict)  # chapter -> how it runs, or "" if it cannot

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def ok(self) -> bool:
        return not self.problems

    def finding(self, name: str) -> Finding:
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(name)

    def text(self) -> str:
        width = max(len(f.name) for f in self.findings)
        lines = ["glalearn doctor"]
        for f in self.findings:
            mark = "ok " if f.ok else "!! "
            lines.append(f"  {mark}{f.name:<{width}}  {f.value}")
        lines.append("")
        lines.append("Chapters that can run here:")
        for chapters, how in group_chapters(self.chapters):
            lines.append(f"  {chapters:<10} {how or 'cannot run here (see the problems below)'}")
        notes = [f for f in self.findings if f.note]
        if notes:
            lines.append("")
            lines.append("Notes:")
            for f in notes:
                lines.append(f"  - {f.name}: {f.note}")
        lines.append("")
        if self.ok:
            lines.append("No problems found.")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            for f in self.problems:
                lines.append(f"  - {f.name}: {f.problem}")
                lines.append(f"    fix: {f.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "findings": [vars(f) for f in self.findings],
            "chapters": {str(k): v for k, v in self.chapters.items()},
        }

    def __repr__(self) -> str:
        return f"DoctorReport(ok={self.ok}, problems={[f.name for f in self.problems]})"


def group_chapters(chapters: dict[int, str]) -> list[tuple[str, str]]:
    """{0: a, 1: a, 2: b, 8: a} -> [("0-1, 8", a), ("2", b)]: chapters that run the same way, as ranges."""
    by_how: dict[str, list[int]] = {}
    for ch in sorted(chapters):
        by_how.setdefault(chapters[ch], []).append(ch)
    groups = []
    for how, numbers in by_how.items():
        runs, start = [], numbers[0]
        for prev, cur in zip(numbers, numbers[1:] + [None]):
            if cur != prev + 1:
                runs.append(str(start) if start == prev else f"{start}-{prev}")
                start = cur
        groups.append((", ".join(runs), how))
    return groups


def parse_version(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); leading numeric parts only."""
    parts = []
    for piece in re.split(r"[.+-]", text):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.group() != piece:
            break
    return tuple(parts)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(spec: str) -> str:
    return f"{shlex.quote(sys.executable)} -m pip install {shlex.quote(spec)}"


def _too_old(version: str, minimum: tuple[int, ...]) -> bool:
    return parse_version(version) < minimum


def _check_package(name: str, dist: str, spec: str) -> Finding:
    version = _version(dist)
    minimum = MINIMUM[name]
    need = ".".join(map(str, minimum))
    if version is None:
        return Finding(name, "not installed", problem=f"{dist} is not installed (need >= {need})", fix=_pip(spec))
    if _too_old(version, minimum):
        return Finding(name, version, problem=f"{dist} {version} is older than {need}", fix=_pip(spec))
    return Finding(name, version)


def _labextension_dirs() -> list[Path]:
    from jupyter_core.paths import jupyter_path

    return [Path(p) for p in jupyter_path("labextensions")]


def _disabled_extensions() -> set[str]:
    """Extensions disabled in any labconfig/page_config.json on Jupyter's config path."""
    from jupyter_core.paths import jupyter_config_path

    disabled: set[str] = set()
    for directory in jupyter_config_path():
        page_config = Path(directory) / "labconfig" / "page_config.json"
        if not page_config.is_file():
            continue
        try:
            data = json.loads(page_config.read_text())
        except (OSError, ValueError):
            continue
        entry = data.get("disabledExtensions", {})
        if isinstance(entry, dict):
            disabled |= {name for name, off in entry.items() if off}
        elif isinstance(entry, list):
            disabled |= set(entry)
    return disabled


def widget_extension_status(labextension_dirs=None, disabled=None) -> tuple[str | None, bool]:
    """(version of the installed ipywidgets front-end extension or None, whether it is disabled).

    Reads the extension's package.json where JupyterLab looks for prebuilt extensions
    (what `jupyter labextension list` reports), and labconfig/page_config.json for disabled ones.
    """
    dirs = _labextension_dirs() if labextension_dirs is None else [Path(d) for d in labextension_dirs]
    version = None
    for directory in dirs:
        package = directory / WIDGET_EXTENSION / "package.json"
        if package.is_file():
            try:
                version = json.loads(package.read_text()).get("version", "unknown")
            except (OSError, ValueError):
                version = "unreadable"
            break
    off = (_disabled_extensions() if disabled is None else set(disabled))
    is_disabled = WIDGET_EXTENSION in off or WIDGET_EXTENSION.split("/")[0] in off
    return version, is_disabled


def _check_widget_extension(ipywidgets_version: str | None) -> Finding:
    name = "widget front-end"
    try:
        version, disabled = widget_extension_status()
    except ImportError:  # jupyter_core missing: JupyterLab itself is missing, reported above
        return Finding(name, "unknown (jupyter_core not installed)",
                       problem="cannot look for the ipywidgets JupyterLab extension", fix=_pip("jupyterlab>=4.0"))
    if version is None:
        return Finding(name, f"{WIDGET_EXTENSION} not found",
                       problem="the ipywidgets JupyterLab extension is not installed: sliders show as text",
                       fix=_pip("jupyterlab_widgets>=3.0"))
    if disabled:
        return Finding(name, f"{WIDGET_EXTENSION} {version} (disabled)",
                       problem="the ipywidgets JupyterLab extension is disabled: sliders show as text",
                       fix=f"{shlex.quote(str(Path(sys.executable).with_name('jupyter')))} "
                           f"labextension enable {WIDGET_EXTENSION}")
    # ipywidgets 8 speaks the widget protocol of jupyterlab-manager 5; ipywidgets 7 that of 3.
    if ipywidgets_version and parse_version(ipywidgets_version)[:1] == (8,) and parse_version(version)[:1] != (5,):
        return Finding(name, f"{WIDGET_EXTENSION} {version}",
                       problem=f"extension {version} does not match ipywidgets {ipywidgets_version} (needs 5.x)",
                       fix=_pip("jupyterlab_widgets>=3.0,<4"))
    return Finding(name, f"{WIDGET_EXTENSION} {version}, enabled")


def _check_device(triton_version: str | None, env=None) -> tuple[Finding, str]:
    """The device line, and how chapters 6-7 run ('' when they cannot)."""
    env = os.environ if env is None else env
    interpret = env.get("TRITON_INTERPRET", "") == "1"
    try:
        import torch
    except ImportError:
        return Finding("device", "unknown (torch missing)"), ""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        value = f"GPU: {name} (CUDA {torch.version.cuda})"
        if triton_version is None:
            return Finding("device", value), ""
        if interpret:
            return Finding("device", value + ", but TRITON_INTERPRET=1",
                           note="TRITON_INTERPRET=1 runs the kernels in the slow interpreter even on this GPU; "
                                "unset it to compile them: unset TRITON_INTERPRET"), "on the GPU (interpreter forced)"
        return Finding("device", value), f"on the GPU ({name})"
    if triton_version is None:
        return Finding("device", "CPU only (no GPU, no Triton)"), ""
    if interpret:
        return Finding("device", "Triton interpreter (TRITON_INTERPRET=1)"), "on the CPU in the Triton interpreter"
    return (Finding("device", "CPU only, TRITON_INTERPRET not set",
                    note="no GPU: chapters 6-7 run their kernels in Triton's interpreter, which needs "
                         "TRITON_INTERPRET=1 set before Triton is first imported: export TRITON_INTERPRET=1 "
                         "before `make lab`, or os.environ['TRITON_INTERPRET'] = '1' in a notebook's first "
                         "cell (make test and make book set it for you)"),
            "on the CPU in the Triton interpreter (set TRITON_INTERPRET=1)")


def _project_relative(path: str) -> str:
    """path relative to the project folder when it lies inside it (e.g. .venv/bin/python), else as is:
    the report (and chapter 0's committed output) then names no machine's folders."""
    root = Path(__file__).absolute().parents[1]
    try:
        return str(Path(path).absolute().relative_to(root))
    except ValueError:
        return path


def diagnose(env=None) -> DoctorReport:
    """Look at this machine and return a :class:`DoctorReport` without printing anything (chapter 0)."""
    report = DoctorReport()
    py = sys.version_info
    py_text = f"{py.major}.{py.minor}.{py.micro} ({_project_relative(sys.executable)})"
    if (py.major, py.minor) < MINIMUM["python"]:
        report.findings.append(Finding("python", py_text, problem="Python 3.10 or newer is needed",
                                       fix="install Python >= 3.10, then: make clean-venv && make lab"))
    else:
        report.findings.append(Finding("python", py_text))

    torch_finding = _check_package("torch", "torch", "torch>=2.5")
    report.findings.append(torch_finding)

    triton_version = _version("triton")
    if triton_version is None:
        if platform.system() == "Linux":
            triton = Finding("triton", "not installed", problem="Triton is missing: chapters 6-7 cannot run",
                             fix=_pip("triton>=3.2"))
        else:
            triton = Finding("triton", f"not available on {platform.system()}",
                             note="Triton ships for Linux only; chapters 6-7 can be read but not run here. "
                                  "Everything else runs.")
    elif _too_old(triton_version, MINIMUM["triton"]):
        triton = Finding("triton", triton_version, problem=f"Triton {triton_version} is older than 3.2",
                         fix=_pip("triton>=3.2"))
    else:
        triton = Finding("triton", triton_version)
    report.findings.append(triton)
    usable_triton = triton_version if triton.ok and triton_version else None

    device, kernel_chapters = _check_device(usable_triton, env)
    report.findings.append(device)

    report.findings.append(_check_package("jupyterlab", "jupyterlab", "jupyterlab>=4.0"))
    widgets = _check_package("ipywidgets", "ipywidgets", "ipywidgets>=8.1")
    report.findings.append(widgets)
    report.findings.append(_check_widget_extension(_version("ipywidgets")))
    for dist, spec in (("matplotlib", "matplotlib>=3.7"), ("numpy", "numpy>=1.24")):
        version = _version(dist)
        report.findings.append(Finding(dist, version) if version else
                               Finding(dist, "not installed", problem=f"{dist} is not installed", fix=_pip(spec)))

    base_ok = torch_finding.ok and all(report.finding(d).ok for d in ("matplotlib", "numpy"))
    for ch in CPU_CHAPTERS:
        how = "on any CPU" if base_ok else ""
        if ch == 1 and base_ok and not (widgets.ok and report.finding("widget front-end").ok):
            how = "on any CPU, but the gate-decay explorer's sliders will not work (see the problems)"
        report.chapters[ch] = how
    for ch in TRITON_CHAPTERS:
        report.chapters[ch] = kernel_chapters if base_ok else ""
    return report


def doctor(env=None) -> DoctorReport:
    """Print what this machine has for the book and return the :class:`DoctorReport` (chapter 0).

    The report lists Python, torch, triton, GPU or Triton interpreter, JupyterLab, ipywidgets and the
    widget front-end extension, which chapters can run here, and each problem with its fix command.
    """
    report = diagnose(env)
    print(report.text())
    return report


def main(argv=None) -> int:
    """`glalearn doctor [--json]`: print the report; exit 0 when there is no problem, else 1."""
    from glalearn.clierror import OneLineParser

    parser = OneLineParser(prog="glalearn doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = diagnose()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    from glalearn.clierror import guarded

    sys.exit(guarded("glalearn doctor", main))
