"""No lost runs (issue 20): run folders, checkpoints as one set, --resume, interruption, one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from glalearn import checkpoint
from glalearn.clierror import guarded
from glalearn.train import load_checkpoint, main, preset, train

PROG = "python -m glalearn.train"
# a tiny run of the tiny-cpu preset: ~30 steps/s on one thread of the 2-core machine
TINY = ["--preset", "tiny-cpu", "--batch-size", "2", "--context", "8", "--eval-interval", "1000"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(argv, capsys):
    """(exit status, stderr) of the train command line run in this process, as ``python -m`` runs it."""
    rc = guarded(PROG, main, argv)
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: ") and "Traceback" not in err
    return lines[0]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path, one_thread, capsys):
    """A finished 3-step run in tmp_path/run."""
    out = tmp_path / "run"
    assert _cli([*TINY, "--steps", "3", "--no-progress", "--out", str(out)], capsys)[0] == 0
    return out


def test_existing_run_without_resume_is_an_error_that_changes_nothing(run, capsys):
    before = _snapshot(run)
    rc, err = _cli([*TINY, "--steps", "5", "--no-progress", "--out", str(run)], capsys)
    line = _one_error_line(err)
    assert rc == 2 and str(run) in line and "--resume" in line and "new --out" in line
    assert _snapshot(run) == before
    # an empty folder (e.g. a fresh tempfile.TemporaryDirectory) is no run: training starts there
    (run.parent / "empty").mkdir()
    assert _cli([*TINY, "--steps", "1", "--no-progress", "--out", str(run.parent / "empty")], capsys)[0] == 0


def test_resume_on_an_incomplete_or_corrupt_checkpoint_lists_the_files_and_changes_nothing(run, capsys):
    folder = checkpoint.latest_checkpoint(run)
    (folder / "train_state.json").unlink()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-7] ^= 0x40  # one bit of one weight: the file still parses, only its hash tells
    (folder / "model.safetensors").write_bytes(bytes(data))
    before = _snapshot(run)
    rc, err = _cli([*TINY, "--steps", "6", "--no-progress", "--out", str(run), "--resume"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "incomplete or corrupt" in line
    assert "train_state.json is missing" in line and "model.safetensors is corrupt" in line
    assert _snapshot(run) == before
    # without a manifest the set is not known to be complete: also refused
    (folder / "manifest.json").unlink()
    rc, err = _cli([*TINY, "--steps", "6", "--no-progress", "--out", str(run), "--resume"], capsys)
    assert rc == 2 and "manifest.json is missing" in _one_error_line(err)


def test_resume_with_a_log_but_no_checkpoint_is_an_error(run, capsys):
    for _, folder in checkpoint.list_checkpoints(run):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    rc, err = _cli([*TINY, "--steps", "6", "--no-progress", "--out", str(run), "--resume"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "no checkpoint" in line and "train_log.json" in line
    # a folder with no run at all: --resume starts at step 0, and says so
    rc, err = _cli([*TINY, "--steps", "1", "--no-progress", "--out", str(run.parent / "new"), "--resume"], capsys)
    assert rc == 0 and "starting from step 0" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps must be a whole number of at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1, got 0"),
    (["--batch-size", "3", "--accum-steps", "2"], "--batch-size 3 must be divisible by the number of ranks × --accum-steps = 1 × 2"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a whole number of at least 1, got 0"),
    (["--eval-interval", "0"], "--eval-interval must be a whole number of at least 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    (["--context", "-4"], "--context must be a whole number of at least 1, got -4"),
    (["--device", "gpu7"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu7'"),
])
def test_bad_numbers_are_one_line_before_anything_is_touched(run, capsys, args, message):
    before = _snapshot(run)
    rc, err = _cli([*TINY, "--steps", "6", "--no-progress", "--out", str(run), "--resume", *args], capsys)
    assert rc == 2 and _one_error_line(err) == f"{PROG}: error: {message}"
    assert _snapshot(run) == before  # e.g. --steps 0 no longer wipes train_log.json


def test_resume_to_fewer_steps_and_data_errors_are_one_line(run, tmp_path, capsys):
    rc, err = _cli([*TINY, "--steps", "2", "--no-progress", "--out", str(run), "--resume"], capsys)
    assert rc == 2 and "is at step 3 and --steps 2 asks for no further step" in _one_error_line(err)
    rc, err = _cli([*TINY, "--steps", "2", "--no-progress", "--out", str(tmp_path / "d"), "--data",
                    str(tmp_path / "missing.txt")], capsys)
    assert rc == 2 and "--data: " in _one_error_line(err) and "missing.txt does not exist" in err
    (tmp_path / "bin.txt").write_bytes(b"abc\0def" * 100)
    rc, err = _cli([*TINY, "--steps", "2", "--no-progress", "--out", str(tmp_path / "d"), "--data",
                    str(tmp_path / "bin.txt")], capsys)
    assert rc == 2 and "a NUL byte at byte offset 3" in _one_error_line(err)
    # --debug shows the traceback instead
    with pytest.raises(FileNotFoundError):
        guarded(PROG, main, [*TINY, "--out", str(tmp_path / "d"), "--data", str(tmp_path / "missing.txt"), "--debug"])


def test_checkpoint_every_and_only_the_latest_checkpoint_is_kept(tmp_path, one_thread, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real = checkpoint.write_set

    def spy(parent, name, *args, **kwargs):
        seen.append(name)
        return real(parent, name, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_set", spy)
    assert _cli([*TINY, "--steps", "5", "--checkpoint-every", "2", "--no-progress", "--out", str(out)], capsys)[0] == 0
    assert seen == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000005"]
    assert [p.name for p in sorted(out.iterdir())] == ["checkpoint-00000005", "train_log.json"]
    assert checkpoint.verify(out / "checkpoint-00000005", ("model.safetensors", "train_state.json")) == []


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_folder(tmp_path):
    def good(p):
        p.write_text("one")

    def failing(p):
        p.write_text("half")
        raise OSError("disk full")

    first = checkpoint.write_set(tmp_path, "set", {"a.txt": good})
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_set(tmp_path, "set", {"a.txt": good, "b.txt": failing}, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no .tmp folder left behind
    assert (first / "a.txt").read_text() == "one" and checkpoint.verify(first, ("a.txt",)) == []
    (first / "a.txt").write_text("oneX")
    assert checkpoint.verify(first) == ["a.txt is truncated or changed (4 bytes, manifest.json says 3)"]
    (first / "a.txt").write_text("two")
    assert checkpoint.verify(first) == ["a.txt is corrupt (its SHA-256 differs from the one in manifest.json)"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files than a checkpoint's"):
        checkpoint.write_set(tmp_path, "other", {"a.txt": good}, replace=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_non_finite_weights_are_named_on_load(run):
    folder = checkpoint.latest_checkpoint(run)
    tensors = load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[5] = float("nan")
    bad = run.parent / "nan_model"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' .* holds 1 non-finite values"):
        load_checkpoint(bad)
    model = load_checkpoint(run)  # a run folder loads its latest checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _stderr_reader(proc, seen: list, first_step: threading.Event):
    """Collect the child's stderr; set ``first_step`` once its progress bar shows a finished step."""
    buf = b""
    while chunk := proc.stderr.read1(4096):
        buf += chunk
        if not first_step.is_set() and re.search(rb"\b([1-9]\d*)/\d+ \[", buf):
            first_step.set()
    seen.append(buf.decode(errors="replace"))
    first_step.set()


def interrupt_after_first_step(argv, sig=signal.SIGINT, timeout=120, times=1):
    """Run ``python -m glalearn.train argv`` (one thread), send ``sig`` (``times`` times, 5 ms apart)
    once a step has finished; return (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "glalearn.train", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen, first_step = [], threading.Event()
    reader = threading.Thread(target=_stderr_reader, args=(proc, seen, first_step), daemon=True)
    reader.start()
    assert first_step.wait(timeout), "the run showed no finished step"
    for i in range(times):
        if i:
            time.sleep(0.005)  # two signals of one kind that arrive together are handled once
        proc.send_signal(sig)
    rc = proc.wait(timeout)
    reader.join(timeout)
    return rc, seen[0] if seen else ""


def test_sigint_after_the_first_step_checkpoints_and_resumes_bit_identically(tmp_path, one_thread, capsys):
    """Ctrl-C: the step finishes, a checkpoint is written, exit 130 with one line saying how to resume;
    resuming it gives every weight and AdamW moment bit for bit as an uninterrupted run of the same steps."""
    steps = 80
    args = [*TINY, "--steps", str(steps), "--checkpoint-every", "1000"]
    rc, err = interrupt_after_first_step([*args, "--out", str(tmp_path / "run")])
    assert rc == 130, err
    messages = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(PROG)]
    assert len(messages) == 1 and "Traceback" not in err, err
    m = re.fullmatch(rf"{PROG}: stopped by SIGINT after step (\d+) of {steps}; checkpoint in (\S+)\. To continue: "
                     rf"{PROG} (.*)", messages[0])
    assert m, messages[0]
    stopped = int(m.group(1))
    assert 1 <= stopped < steps
    folder = checkpoint.latest_checkpoint(tmp_path / "run")
    assert str(folder) == m.group(2) and folder.name == f"checkpoint-{stopped:08d}"
    assert checkpoint.verify(folder, ("model.safetensors", "train_state.safetensors", "train_state.json")) == []
    resume_argv = m.group(3).split()
    assert resume_argv[-1] == "--resume" and resume_argv[:-1] == [*args, "--out", str(tmp_path / "run")]

    assert _cli([*resume_argv, "--no-progress"], capsys)[0] == 0  # the printed command, in this process
    assert _cli([*args, "--no-progress", "--out", str(tmp_path / "straight")], capsys)[0] == 0
    a = load_file(str(checkpoint.latest_checkpoint(tmp_path / "run") / "train_state.safetensors"))
    b = load_file(str(checkpoint.latest_checkpoint(tmp_path / "straight") / "train_state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a, log_b = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("run", "straight"))
    assert [r["loss"] for r in log_a["steps"]] == [r["loss"] for r in log_b["steps"]]
    assert log_a["interrupted_at"] == [stopped] and log_a["resumed_at"] == [stopped]


def test_a_second_sigterm_interrupts_at_once_and_still_exits_143(tmp_path):
    """Two SIGTERMs 5 ms apart: the second lands while the first one's step is running and interrupts
    it (or, rarely, while the stop is reported, where it is ignored). Either way one line, no traceback,
    exit 128 + SIGTERM, and whatever checkpoint is there loads."""
    out = tmp_path / "term2"
    rc, err = interrupt_after_first_step([*TINY, "--steps", "200", "--checkpoint-every", "1", "--out", str(out)],
                                         sig=signal.SIGTERM, times=2)
    messages = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(PROG)]
    assert rc == 143 and len(messages) == 1 and "Traceback" not in err, (rc, err)
    if "no checkpoint was written" in messages[0]:  # the second one cut the first checkpoint's write
        assert checkpoint.list_checkpoints(out) == []
    else:
        assert "the latest complete checkpoint is" in messages[0] or "stopped by SIGTERM" in messages[0]
        load_checkpoint(out)


def test_sigterm_and_a_kill_mid_write_never_leave_an_unloadable_checkpoint(tmp_path):
    """SIGTERM exits 143 after its checkpoint; SIGKILL during a run that checkpoints every step (so the
    kill often lands inside a write) leaves the last complete checkpoint, which verifies and loads."""
    rc, err = interrupt_after_first_step([*TINY, "--steps", "200", "--out", str(tmp_path / "term")],
                                         sig=signal.SIGTERM)
    assert rc == 143 and "stopped by SIGTERM" in err
    out = tmp_path / "kill"
    proc = subprocess.Popen([sys.executable, "-m", "glalearn.train", *TINY, "--steps", "400", "--checkpoint-every",
                             "1", "--no-progress", "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(checkpoint.list_checkpoints(out)) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.kill()
    proc.wait(60)
    found = checkpoint.list_checkpoints(out)
    assert found, "no checkpoint was committed before the kill"
    step, folder = found[-1]
    assert checkpoint.verify(folder, ("model.safetensors", "config.json", "train_state.safetensors",
                                      "train_state.json", "train_log.json")) == []
    load_checkpoint(out)
    # the next --resume removes whatever a kill can leave half-written and continues from there
    (out / f".checkpoint-{step + 1:08d}.tmp-99999").mkdir(exist_ok=True)
    (out / ".train_log.json.tmp-99999").write_text("{")
    log = train(preset("tiny-cpu", steps=step + 2, batch_size=2, context=8, eval_interval=1000), out, resume=True,
                progress=False)
    assert log["resumed_at"] == [step]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
