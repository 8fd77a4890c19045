"""Fixtures for the real-browser test: Debian's Chromium, Playwright, and a throw-away JupyterLab server.

Everything is installed and started here and removed afterwards:

- ``chromium``: ``/usr/bin/chromium``, installed with apt-get when missing (the one reason to skip is that
  apt-get cannot install it). Playwright never downloads a browser: it drives this executable.
- ``playwright_api``: the ``playwright`` package from PyPI (a project dependency), pip-installed into the
  running interpreter when missing.
- ``lab``: JupyterLab on a free localhost port with a random token, serving a temporary copy of
  ``chapters/`` and ``exercises/`` (so running cells never touches the committed notebooks), with its
  runtime, config, data, settings and workspace directories in a temporary folder; stopped and deleted
  at the end of the module.
- ``page``: a fresh Chromium profile (``--user-data-dir`` in a temporary folder) and one page.

``GLALEARN_BOOK_ROOT`` points the test at another checkout's ``chapters/`` and ``exercises/``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOK_ROOT = Path(os.environ.get("GLALEARN_BOOK_ROOT", REPO))
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 1000}

# JupyterLab user settings for the test server: no autosave (the copy is thrown away anyway), no news or
# update pop-ups over the screenshots, every cell kept in the DOM (no virtual scrolling).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def artifacts_dir() -> Path:
    """test-artifacts/browser/ (git-ignored), created on first use."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _log(message: str) -> None:
    print(f"[browser-test] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium; installed with apt-get (update first) when missing, else the test is skipped."""
    if not CHROMIUM.exists():
        apt = shutil.which("apt-get")
        if apt is None:
            pytest.skip(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _log("installing chromium with apt-get (first run only)")
        for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium"]):
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                pytest.skip(f"Chromium cannot be installed here: `{' '.join(cmd)}` exited with "
                            f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")
        if not CHROMIUM.exists():
            pytest.skip(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


@pytest.fixture(scope="session")
def playwright_api():
    """``playwright.sync_api`` (pip-installed into this interpreter when missing; never a browser download)."""
    try:
        import playwright.sync_api as api
    except ImportError:
        _log("installing playwright from PyPI into this interpreter")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"],
                              check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"pip install playwright failed:\n{proc.stdout}\n{proc.stderr}"
        import playwright.sync_api as api
    return api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: ``url(path)`` opens a notebook; ``root`` is the temporary copy it serves."""

    port: int
    token: str
    root: Path
    log: Path
    source: Path = BOOK_ROOT

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{path}?token={self.token}&reset"

    def api(self, endpoint: str):
        """GET /api/<endpoint> as JSON (e.g. "sessions", "kernels")."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/{endpoint}?token={self.token}",
                                    timeout=10) as r:
            return json.load(r)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _shut_down_kernels(port: int, token: str) -> None:
    """Ask the server to shut down every kernel it started (they run in their own sessions)."""
    base = f"http://127.0.0.1:{port}/api/kernels"
    try:
        with urllib.request.urlopen(f"{base}?token={token}", timeout=5) as r:
            kernels = json.load(r)
        for kernel in kernels:
            req = urllib.request.Request(f"{base}/{kernel['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()
    except OSError as exc:
        _log(f"could not shut the kernels down through the API ({exc}); the server does it on exit")


@pytest.fixture(scope="module")
def lab():
    """JupyterLab 4 on a free port with a token, serving a temporary copy of chapters/ and exercises/."""
    tmp = Path(tempfile.mkdtemp(prefix="glalearn-lab-"))
    proc = None
    log_file = None
    try:
        root = tmp / "book"
        for folder in ("chapters", "exercises"):
            if (BOOK_ROOT / folder).is_dir():
                shutil.copytree(BOOK_ROOT / folder, root / folder,
                                ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        settings = tmp / "lab-settings"
        for name, value in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(value))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "MPLBACKEND"))}
        env.update({
            # A learner's kernel: inline matplotlib (make test sets MPLBACKEND=Agg, which would hide figures).
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_DATA_DIR": str(tmp / "data"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "IPYTHONDIR": str(tmp / "ipython"),
            "MPLCONFIGDIR": str(tmp / "mpl"), "PYTHONDONTWRITEBYTECODE": "1",
        })
        port, token = _free_port(), secrets.token_hex(16)
        log = tmp / "jupyterlab.log"
        log_file = open(log, "wb")  # noqa: SIM115 (closed in the finally below)
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--port-retries=0", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.password=", "--LabApp.news_url=None", "--allow-root"]
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        server = Lab(port=port, token=token, root=root, log=log)
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                url = f"http://127.0.0.1:{port}/api/status?token={token}"
                with urllib.request.urlopen(url, timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in 90 s:\n{server.log_tail()}")
                time.sleep(0.3)
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            _shut_down_kernels(port, token)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_file is not None:
            log_file.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(chromium, playwright_api):
    """Chromium driven by Playwright, with a fresh temporary profile; closed and deleted afterwards."""
    profile = Path(tempfile.mkdtemp(prefix="glalearn-chromium-"))
    try:
        with playwright_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(profile), executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
                viewport=VIEWPORT, accept_downloads=False)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, request):
    """One page; on a test failure a full-page screenshot goes to test-artifacts/browser/."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    messages: list[str] = []
    page.on("pageerror", lambda exc: messages.append(f"page error: {exc}"))
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        try:
            page.screenshot(path=str(artifacts_dir() / f"FAILED_{request.node.name}.png"), full_page=True)
        except Exception as exc:  # noqa: BLE001 (the failure itself is what matters)
            _log(f"no failure screenshot: {exc}")
        if messages:
            _log("\n".join(messages))
    page.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
