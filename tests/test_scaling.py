"""Issue 9 / chapter 11: the scaling driver runs end to end on a CPU with gloo at a tiny size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from glalearn import scaling
from glalearn.clierror import guarded


@pytest.mark.slow
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
    # what chapter 11 does with a results file: find it, tabulate it, plot it
    (path, found), = scaling.find_results(tmp_path)
    assert path.name == "scaling_cpu.json" and found == results
    table = scaling.results_table(results).splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["1", "4"] and table[2].split()[:2] == ["2", "8"]
    fig = scaling.plot_scaling(results)
    assert [ax.get_xlabel() for ax in fig.axes] == ["ranks (GPUs)", "step"]
    assert len(fig.axes[1].lines) == 2 and len(fig.axes[1].lines[0].get_ydata()) == 4


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
        assert guarded("python -m glalearn.scaling", scaling.main,
                       ["run-all", "--out", str(tmp_path), "--device", "cpu", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"python -m glalearn.scaling: error: {match}")


def test_any_split_of_the_batch_gives_the_full_batch_gradient(one_thread):
    """Chapter 11 §1: averaging N ranks' gradients (or accumulating A micro-batches, each loss / A) is the
    gradient of the whole batch; summing the ranks' gradients instead doubles it."""
    from glalearn.data import sample_batch, shakespeare_splits
    from glalearn.model import GLAConfig, build_model

    torch.manual_seed(3)
    model = build_model(GLAConfig(d_model=32, n_layers=2, num_heads=2, context_length=24, backend="chunk",
                                  chunk_size=8))
    x, y = sample_batch(shakespeare_splits()[0], 8, 24, torch.Generator().manual_seed(4))

    def gradient(pieces, scale):
        model.zero_grad()
        for rows in pieces:
            (model.loss(x[rows], y[rows]) * scale).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = gradient([slice(0, 8)], 1.0)
    for n in (2, 4, 8):
        split = gradient([slice(i * 8 // n, (i + 1) * 8 // n) for i in range(n)], 1 / n)
        assert ((split - full).norm() / full.norm()) < 1e-6, n
    summed = gradient([slice(0, 4), slice(4, 8)], 1.0)
    assert ((summed - full).norm() / full.norm()).item() == pytest.approx(1.0, abs=1e-5)


def test_scaling_model_is_shakespeare_gla_at_width_512(monkeypatch):
    """The shapes chapter 11 quotes: 19,121,920 parameters, 6 layers, 4 heads, context 256, batch 64 per rank."""
    from glalearn.model import build_model, config_from_dict

    captured = []
    monkeypatch.setattr(scaling, "run_worker", lambda args: captured.append(args) or 0)
    assert scaling.main(["worker", "--out", "unused"]) == 0  # the worker's defaults, as run-all passes them
    cfg = scaling.worker_config(captured[0], world_size=2)
    assert (cfg.batch_size, cfg.context, cfg.accum_steps) == (128, 256, 1)
    mcfg = config_from_dict(cfg.model)
    assert (mcfg.d_model, mcfg.n_layers, mcfg.num_heads, mcfg.context_length, mcfg.ffn_hidden) == (512, 6, 4, 256,
                                                                                                   1376)
    with torch.device("meta"):
        assert build_model(mcfg).num_parameters() == 19_121_920
