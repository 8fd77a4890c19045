"""One line for every user error (issue 20): evaluate, bench, scaling; the token cache heals itself."""

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
