"""One line for every user error (issue 20): evaluate, bench (every subcommand), train, scaling, argparse's own
errors included; `--debug` through a nested command; the token cache heals itself."""

import json
import shutil

import numpy as np
import pytest

from glalearn.clierror import guarded
from glalearn.data import load_corpus
from glalearn.pretrained import checkpoint_dir


def _one_error_line(prog: str, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


@pytest.fixture
def damaged(tmp_path):
    """A copy of the shipped GLA checkpoint to damage."""
    folder = tmp_path / "model"
    shutil.copytree(checkpoint_dir("shakespeare-gla"), folder)
    return folder


def _evaluate(argv, capsys):
    from glalearn.evaluate import main

    rc = guarded("python -m glalearn.evaluate", main, argv)
    return rc, capsys.readouterr()


def test_evaluate_names_the_damaged_file_in_one_line(damaged, capsys):
    prog = "python -m glalearn.evaluate"
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 3])
    rc, out = _evaluate([str(damaged), "--context", "8"], capsys)
    line = _one_error_line(prog, out.err)
    assert rc == 2 and str(damaged / "model.safetensors") in line and "corrupt or truncated" in line
    (damaged / "model.safetensors").write_bytes(data)
    (damaged / "config.json").write_text('{"model": {"d_model": 25')
    rc, out = _evaluate([str(damaged), "--context", "8"], capsys)
    line = _one_error_line(prog, out.err)
    assert rc == 2 and str(damaged / "config.json") in line and "not valid JSON" in line
    (damaged / "config.json").write_text(json.dumps({"model": {"model_type": "gla", "d_model": 0}}))
    rc, out = _evaluate([str(damaged), "--context", "8"], capsys)
    assert rc == 2 and "is not a glalearn checkpoint config" in _one_error_line(prog, out.err)
    for argv, message in [([str(damaged.parent / "nowhere")], "does not exist"),
                          (["shakespeare-gla", "--context", "0"], "--context must be whole numbers of at least 1"),
                          (["shakespeare-gla", "--batch-size", "0"], "--batch-size must be a whole number"),
                          (["shakespeare-gla", "--device", "tpu:0"], "--device must be auto, cpu, cuda or cuda:N"),
                          (["shakespeare-gla", "--json", str(damaged / "no" / "r.json")], "does not exist")]:
        rc, out = _evaluate(argv, capsys)
        assert rc == 2 and message in _one_error_line(prog, out.err), argv


def test_evaluate_loads_a_training_run_folder(tmp_path, one_thread, capsys):
    from glalearn.train import preset, train

    small = {"d_model": 32, "n_layers": 2, "num_heads": 2, "ffn_hidden": 64, "context_length": 32}
    train(preset("tiny-cpu", model=small, steps=2, batch_size=4, context=16, eval_interval=2,
                 eval_batches=1), tmp_path / "run", progress=False)
    rc, out = _evaluate([str(tmp_path / "run"), "--context", "256", "--batch-size", "64"], capsys)
    assert rc == 0 and out.err == ""
    rows = [line.split() for line in out.out.splitlines()[2:]]
    assert rows[0][0] == "256" and 3.0 < float(rows[0][1]) < 4.5  # near log(65) = 4.17 after two steps


def test_bench_user_errors_are_one_line(capsys):  # scaling: tests/test_scaling.py
    from glalearn import bench

    assert guarded("python -m glalearn.bench", bench.main, ["forms", "--lengths", "64", "0"]) == 2
    assert "--lengths must be whole numbers of at least 1, got 0" in _one_error_line("python -m glalearn.bench",
                                                                                      capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["kernels", "--lengths", "0"], "--lengths must be whole numbers from 1 to 16,384"),
    (["kernels", "--profiles", "P1", "--lengths", "65537"], "--lengths must be whole numbers from 1 to 65,536"),
    (["kernels", "--rep-ms", "nan"], "--rep-ms must be a finite number of milliseconds > 0, got nan"),
    (["kernels", "--config", "{bad"], "argument --config: invalid JSON value: '{bad'"),
    (["kernels", "--config", "[1]"], "--config must be a JSON object of flash_gla CONFIG keys"),
    (["kernels", "--config", '{"warpz": 4}'], "--config names CONFIG keys that do not exist: ['warpz']"),
    (["kernels", "--sweep", "[{}, 3]"], "--sweep entry 1 must be a JSON object"),
    (["kernels", "--sweep", "[]"], "--sweep must be a non-empty JSON list"),
    (["kernels", "--bogus"], "unrecognized arguments: --bogus"),
    (["model", "--repeats", "0"], "--repeats must be a whole number of at least 1, got 0"),
    (["model", "--bogus"], "unrecognized arguments: --bogus"),
    (["forms", "--bogus"], "unrecognized arguments: --bogus"),  # it used to run the whole benchmark
    (["forms", "--repeats", "x"], "argument --repeats: invalid int value: 'x'"),
    ([], "the following arguments are required: {forms,kernels,model}"),
])
def test_bench_arguments_are_checked_before_anything_runs(argv, message, capsys):
    """Every subcommand of `bench`, argparse's own errors included: one line, exit 2, no usage block."""
    from glalearn import bench

    rc = guarded("python -m glalearn.bench", bench.main, argv)
    err = capsys.readouterr().err
    sub = f"python -m glalearn.bench {argv[0]}" if argv and argv[0] in ("kernels", "model") else "python -m glalearn.bench"
    assert rc == 2 and message in _one_error_line(sub, err), err


@pytest.mark.parametrize("what, chapter", [("kernels", "chapter 7"), ("model", "chapter 9")])
def test_gpu_benchmarks_without_a_gpu_say_so_in_one_line(what, chapter, monkeypatch, capsys):
    import torch

    from glalearn import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert guarded("python -m glalearn.bench", bench.main, [what]) == 2
    line = _one_error_line(f"python -m glalearn.bench {what}", capsys.readouterr().err)
    assert "needs a CUDA GPU" in line and chapter in line


def test_debug_reaches_the_nested_command(capsys):
    """`bench model --debug`: the flag given to the outer command shows the inner one's traceback."""
    from glalearn import bench

    with pytest.raises(ValueError, match="--repeats must be a whole number"):
        guarded("python -m glalearn.bench", bench.main, ["model", "--repeats", "0", "--debug"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("module, argv, message", [
    ("glalearn.train", ["--preset", "tiny-cpu", "--out", "x", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ("glalearn.train", ["--preset", "nope", "--out", "x"], "argument --preset: invalid choice: 'nope'"),
    ("glalearn.train", ["--out", "x"], "the following arguments are required: --preset"),
    ("glalearn.evaluate", ["shakespeare-gla", "--context", "x"], "argument --context: invalid int value: 'x'"),
    ("glalearn.scaling", [], "the following arguments are required: {run-all,worker}"),
    ("glalearn.scaling", ["run-all", "--gpus", "two", "--out", "x"], "argument --gpus: invalid int value: 'two'"),
    ("glalearn.experiments", ["recall", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    ("glalearn.experiments", ["cause", "--preset", "micro", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    ("glalearn.experiments", ["recall", "--preset", "micro", "--set", "steps=x"], "--set steps"),
])
def test_argparse_errors_are_one_line_without_the_usage_block(module, argv, message, capsys):
    import importlib

    prog = f"python -m {module}"
    assert guarded(prog, importlib.import_module(module).main, argv) == 2
    assert message in _one_error_line(prog, capsys.readouterr().err)


@pytest.mark.parametrize("argv, prog", [(["-m", "glalearn.bench", "kernels", "--rep-ms", "0"], "python -m glalearn.bench kernels"),
                                        (["-m", "glalearn.bench_kernels", "--rep-ms", "0"], "python -m glalearn.bench kernels")])
def test_the_kernel_benchmark_command_is_guarded(argv, prog):
    """The real command line (its ``__main__``), not only ``main``: one line on stderr, exit 2."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "must be a finite number of milliseconds > 0, got 0.0" in _one_error_line(prog, run.stderr)


def test_a_corrupt_token_cache_is_detected_and_rebuilt(tmp_path, capsys):
    rng = np.random.default_rng()
    text = "".join(rng.choice(list("abcdefgh äöü\n"), size=5000))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    first = load_corpus(tmp_path / "corpus.txt", "char", tmp_path / "cache")
    expected = np.array(first.ids)
    meta = json.loads(first.cache.with_suffix(".json").read_text())
    assert meta["bytes"] == first.cache.stat().st_size and len(meta["sha256"]) == 64
    del first
    # the same size, other bytes (ids past the vocabulary: what used to end in an IndexError)
    raw = bytearray(expected.tobytes())
    raw[100:110] = bytes([250] * 10)
    (tmp_path / "cache" / meta["tokens_file"]).write_bytes(bytes(raw))
    again = load_corpus(tmp_path / "corpus.txt", "char", tmp_path / "cache")
    assert "token cache" in capsys.readouterr().err
    assert np.array_equal(np.array(again.ids), expected)
    # truncated, then a sidecar that is not JSON: rebuilt each time
    (tmp_path / "cache" / meta["tokens_file"]).write_bytes(bytes(raw[:777]))
    assert np.array_equal(np.array(load_corpus(tmp_path / "corpus.txt", "char", tmp_path / "cache").ids), expected)
    again.cache.with_suffix(".json").write_text("{")
    assert np.array_equal(np.array(load_corpus(tmp_path / "corpus.txt", "char", tmp_path / "cache").ids), expected)
    assert capsys.readouterr().err.count("tokenizing the corpus again") == 2
    # an intact cache is read without a word
    load_corpus(tmp_path / "corpus.txt", "char", tmp_path / "cache")
    assert capsys.readouterr().err == ""
