"""Issue 9 / chapter 11: the scaling driver runs end to end on a CPU with gloo at a tiny size."""

import json
import os
import subprocess
import sys

import pytest

from glalearn import scaling


def test_scaling_driver_runs_on_cpu_and_merges_one_json(tmp_path):
    """run-all launches torchrun itself (1 rank, 2 ranks, 1 rank accumulating 2) and writes one JSON."""
    cmd = [sys.executable, "-m", "glalearn.scaling", "run-all", "--gpus", "2", "--out", str(tmp_path), "--device",
           "cpu", "--d-model", "32", "--n-layers", "2", "--num-heads", "2", "--context", "32", "--batch-per-rank", "4",
           "--steps", "4", "--warmup", "1", "--log-interval", "1", "--deadline", "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "scaling_cpu.json").read_text())
    assert results["experiment"] == "scaling" and results["complete"]
    assert results["command"].startswith("python -m glalearn.scaling run-all --gpus 2")
    assert [(r["name"], r["ranks"], r["accum_steps"], r["global_batch"]) for r in results["runs"]] == [
        ("ranks1", 1, 1, 4), ("ranks2", 2, 1, 8), ("ranks1_accum2", 1, 2, 8)]
    assert set(results["throughput"]) == {"1", "2"} and all(v > 0 for v in results["throughput"].values())
    assert results["speedup"]["1"] == 1.0
    assert results["speedup"]["2"] == pytest.approx(results["throughput"]["2"] / results["throughput"]["1"], rel=1e-3)
    # same effective batch, same windows: 2 ranks and 1 rank accumulating 2 micro-batches give the same losses
    curves = results["loss_curves"]
    assert len(curves["n_ranks"]) == len(curves["one_rank_accumulating"]) == 4
    assert curves["n_ranks"] == pytest.approx(curves["one_rank_accumulating"], abs=1e-5)
    assert curves["max_abs_diff"] < 1e-5
    # the 1-rank run (batch 4) saw different windows than the 8-window runs: its losses differ
    assert [r["loss"] for r in results["runs"][0]["steps"]] != pytest.approx(curves["n_ranks"], abs=1e-5)
    assert {"torch", "python", "cpu_count", "date"} <= set(results["machine"])
    assert not list(tmp_path.glob("*/*.safetensors"))  # only logs are kept


def test_median_and_slug_and_bad_arguments(tmp_path, capsys):
    log = {"steps": [{"step": s, "tokens_per_s": t} for s, t in enumerate([1.0, 50.0, 10.0, 30.0, 20.0])]}
    assert scaling.median_tokens_per_s(log, 2) == 20.0
    with pytest.raises(ValueError, match="warmup must leave steps"):
        scaling.median_tokens_per_s(log, 5)
    assert scaling.device_slug({"gpus": ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]}) == "h100"
    assert scaling.device_slug({"gpus": ["NVIDIA H200"]}) == "h200"
    assert scaling.device_slug({}) == "cpu"
    assert scaling._rank_counts(2) == [1, 2] and scaling._rank_counts(8) == [1, 2, 4, 8]
    for bad, match in [(["--gpus", "1"], "--gpus must be at least 2"), (["--steps", "5", "--warmup", "5"],
                                                                         "--warmup must be below --steps")]:
        with pytest.raises(SystemExit):
            scaling.main(["run-all", "--out", str(tmp_path), "--device", "cpu", *bad])
        assert match in capsys.readouterr().err
