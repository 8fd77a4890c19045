"""glalearn.doctor() and `glalearn doctor`: versions, device, widget extension, chapters, fixes, exit code."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

import glalearn

doc = importlib.import_module("glalearn.diagnostics")

INTERPRETER = {"TRITON_INTERPRET": "1"}


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _versions(monkeypatch, **overrides):
    """Pretend some distributions are missing (None) or at another version."""
    real = doc._version
    monkeypatch.setattr(doc, "_version", lambda dist: overrides[dist] if dist in overrides else real(dist))


def test_parse_version():
    assert doc.parse_version("2.13.0+cpu") == (2, 13, 0)
    assert doc.parse_version("3.9.0") == (3, 9, 0)
    assert doc.parse_version("8.1.0rc2") == (8, 1, 0)
    assert doc.parse_version("2.5.0.dev20240101") == (2, 5, 0)
    assert doc.parse_version("4.0") < (4, 1)


def test_group_chapters_as_ranges():
    groups = doc.group_chapters({0: "cpu", 1: "cpu", 2: "cpu", 6: "gpu", 7: "gpu", 8: "cpu", 10: "cpu"})
    assert groups == [("0-2, 8, 10", "cpu"), ("6-7", "gpu")]


def test_report_lists_this_machine(monkeypatch):
    _no_gpu(monkeypatch)
    report = doc.diagnose(env=INTERPRETER)
    assert report.finding("torch").value == torch.__version__
    import ipywidgets
    import jupyterlab
    import triton

    assert report.finding("triton").value == triton.__version__
    assert report.finding("jupyterlab").value == jupyterlab.__version__
    assert report.finding("ipywidgets").value == ipywidgets.__version__
    assert report.finding("python").value.startswith(".".join(map(str, sys.version_info[:3])))
    assert report.finding("device").value == "Triton interpreter (TRITON_INTERPRET=1)"
    assert set(report.chapters) == set(range(12))
    assert report.chapters[6] == report.chapters[7] == "on the CPU in the Triton interpreter"
    assert all(report.chapters[c] == "on any CPU" for c in (0, 1, 2, 3, 4, 5, 8, 9, 10, 11))
    text = report.text()
    for needed in ("torch", "triton", "jupyterlab", "ipywidgets", "widget front-end", "0-5, 8-11", "6-7"):
        assert needed in text


def test_doctor_prints_and_returns_the_report(monkeypatch, capsys):
    _no_gpu(monkeypatch)
    report = doc.doctor(env=INTERPRETER)
    out = capsys.readouterr().out
    assert out.strip() == report.text().strip()
    assert "Triton interpreter (TRITON_INTERPRET=1)" in out


def test_cpu_without_interpreter_flag_is_a_note_with_the_command(monkeypatch):
    _no_gpu(monkeypatch)
    report = doc.diagnose(env={})
    device = report.finding("device")
    assert device.ok and "export TRITON_INTERPRET=1" in device.note
    assert "TRITON_INTERPRET=1" in report.chapters[6]


def test_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    report = doc.diagnose(env={})
    assert "GPU: NVIDIA H100 80GB HBM3" in report.finding("device").value
    assert report.chapters[6] == "on the GPU (NVIDIA H100 80GB HBM3)"


def test_missing_ipywidgets_is_a_problem_with_its_fix(monkeypatch):
    _no_gpu(monkeypatch)
    _versions(monkeypatch, ipywidgets=None)
    report = doc.diagnose(env=INTERPRETER)
    assert not report.ok
    problem = report.finding("ipywidgets")
    assert problem.problem and "ipywidgets" in problem.problem
    assert problem.fix == f"{sys.executable} -m pip install 'ipywidgets>=8.1'"
    assert "sliders will not work" in report.chapters[1]
    assert "fix: " + problem.fix in report.text()


def test_old_torch_and_missing_triton_on_linux(monkeypatch):
    _no_gpu(monkeypatch)
    monkeypatch.setattr(doc.platform, "system", lambda: "Linux")
    _versions(monkeypatch, torch="2.1.0", triton=None)
    report = doc.diagnose(env=INTERPRETER)
    names = {f.name for f in report.problems}
    assert {"torch", "triton"} <= names
    assert "torch>=2.5" in report.finding("torch").fix and "triton>=3.2" in report.finding("triton").fix
    assert report.chapters[6] == ""  # cannot run
    assert "cannot run here" in report.text()


def test_no_triton_on_macos_is_not_a_problem(monkeypatch):
    _no_gpu(monkeypatch)
    monkeypatch.setattr(doc.platform, "system", lambda: "Darwin")
    _versions(monkeypatch, triton=None)
    report = doc.diagnose(env=INTERPRETER)
    assert report.finding("triton").ok and "Linux only" in report.finding("triton").note
    assert report.chapters[6] == "" and report.chapters[3] == "on any CPU"


def test_widget_extension_found_missing_and_disabled(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert doc.widget_extension_status([empty], disabled=[]) == (None, False)
    installed = tmp_path / "share" / "labextensions"
    (installed / doc.WIDGET_EXTENSION).mkdir(parents=True)
    (installed / doc.WIDGET_EXTENSION / "package.json").write_text(json.dumps({"version": "5.0.7"}))
    assert doc.widget_extension_status([empty, installed], disabled=[]) == ("5.0.7", False)
    assert doc.widget_extension_status([installed], disabled=[doc.WIDGET_EXTENSION]) == ("5.0.7", True)


def test_widget_extension_problems_name_their_fix(monkeypatch):
    monkeypatch.setattr(doc, "widget_extension_status", lambda: (None, False))
    missing = doc._check_widget_extension("8.1.9")
    assert not missing.ok and "jupyterlab_widgets" in missing.fix
    monkeypatch.setattr(doc, "widget_extension_status", lambda: ("5.0.16", True))
    disabled = doc._check_widget_extension("8.1.9")
    assert not disabled.ok and disabled.fix.endswith("labextension enable @jupyter-widgets/jupyterlab-manager")
    monkeypatch.setattr(doc, "widget_extension_status", lambda: ("3.0.5", False))
    mismatch = doc._check_widget_extension("8.1.9")
    assert not mismatch.ok and "5.x" in mismatch.problem


def test_widget_extension_is_installed_here():
    version, disabled = doc.widget_extension_status()
    assert version is not None and doc.parse_version(version)[0] == 5 and not disabled


def test_main_exit_codes(monkeypatch, capsys):
    _no_gpu(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert doc.main([]) == 0
    assert "No problems found." in capsys.readouterr().out
    _versions(monkeypatch, jupyterlab="3.6.0")
    assert doc.main([]) == 1
    out = capsys.readouterr().out
    assert "jupyterlab 3.6.0 is older than 4.0" in out and "'jupyterlab>=4.0'" in out
    assert doc.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["chapters"]["6"]


def test_glalearn_doctor_stays_the_function_after_the_module_is_imported(monkeypatch, capsys):
    _no_gpu(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.import_module("glalearn.diagnostics")
    assert callable(glalearn.doctor) and glalearn.doctor.__name__ == "doctor"
    assert glalearn.doctor().ok
    assert "glalearn doctor" in capsys.readouterr().out


@pytest.mark.slow
def test_glalearn_doctor_command():
    result = subprocess.run([sys.executable, "-m", "glalearn.cli", "doctor"], check=False, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("glalearn doctor")
    assert f"torch             {torch.__version__}" in result.stdout
