"""Measure data-parallel scaling of GLA training on one machine (appendix chapter 11).

    PYTHONPATH=. python -m glalearn.scaling run-all --gpus 2 --out /tmp/scaling \\
        --json glalearn/assets/results/scaling_h100.json

``run-all`` launches ``torchrun --standalone --nproc_per_node N -m glalearn.scaling worker ...`` itself
(as ``python -m torch.distributed.run``, the same Python) for every run below, one after another, and
merges their ``train_log.json`` files into ONE results JSON:

- **throughput**: N = 1, 2, 4, ... up to ``--gpus`` ranks, each with the same micro-batch per rank
  (``--batch-per-rank`` windows of ``--context`` tokens, no accumulation), so the global batch grows
  with N. Tokens/s (all ranks together) is the median over the steps after ``--warmup`` steps.
  One rank runs without DDP (what one GPU does alone); N > 1 ranks use DDP over NCCL (gloo on a CPU).
- **loss curves**: the run on ``--gpus`` ranks against one rank with gradient accumulation over
  ``--gpus`` micro-batches: the same effective batch, the same windows (``glalearn.train`` draws one
  global batch per step and gives each rank its rows), so the curves agree to rounding (dropout is off
  by default so nothing else differs).

The model is the ``shakespeare-gla`` preset (6 layers, 4 heads, context 256, chunk backend, bf16
autocast on a GPU) at ``--d-model 512``. The defaults finish in a few minutes on 2×H100; ``--deadline``
caps the whole thing (a run that would pass it is stopped and recorded as timed out). On a CPU, tiny
sizes run the same code with gloo (``tests/test_scaling.py``)::

    python -m glalearn.scaling run-all --gpus 2 --out /tmp/s --device cpu --d-model 32 --n-layers 2 \\
        --num-heads 2 --context 32 --batch-per-rank 4 --steps 4 --warmup 1 --log-interval 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from glalearn.checkpoint import list_checkpoints
from glalearn.clierror import OneLineParser, guarded

SCHEMA_VERSION = 1
RESULTS_GLOB = "scaling_*.json"


# ----------------------------------------------------------------------------- the worker (one rank)
def worker_config(args: argparse.Namespace, world_size: int):
    """The TrainConfig of one run: shakespeare-gla at the requested width, batch = per-rank × ranks × accum."""
    from glalearn.train import preset

    amp = {"none": None, "bfloat16": "bfloat16", "float16": "float16"}.get(args.amp, "auto")
    if amp == "auto":
        amp = "bfloat16" if args.device != "cpu" and _cuda_available() else None
    model = {"d_model": args.d_model, "n_layers": args.n_layers, "num_heads": args.num_heads,
             "context_length": args.context, "ffn_hidden": None, "dropout": args.dropout,
             "backend": args.backend, "chunk_size": args.chunk_size}
    return preset("shakespeare-gla", model=model, steps=args.steps,
                  batch_size=args.batch_per_rank * world_size * args.accum, accum_steps=args.accum,
                  context=args.context, warmup_steps=min(100, max(1, args.steps // 3)), eval_interval=args.steps,
                  eval_batches=2, log_interval=args.log_interval, checkpoint_interval=args.steps,
                  device=args.device, amp_dtype=amp, seed=args.seed, save_dtype="float32",
                  extra={"preset": "shakespeare-gla", "scaling": True})


def run_worker(args: argparse.Namespace) -> int:
    from glalearn.train import process_group, train

    with process_group(args.device) as dist:
        cfg = worker_config(args, dist.world_size)
        command = "python -m glalearn.scaling worker " + " ".join(args.argv)
        train(cfg, args.out, progress=False, dist=dist, command=command)
    if dist.is_main and not args.keep_checkpoints:  # only the log is measured; weights would be large files
        for _, path in list_checkpoints(Path(args.out)):
            shutil.rmtree(path)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the driver
def _rank_counts(gpus: int) -> list[int]:
    counts, n = [], 1
    while n < gpus:
        counts.append(n)
        n *= 2
    return counts + [gpus]


def _worker_args(args: argparse.Namespace, accum: int, out: Path) -> list[str]:
    return ["--out", str(out), "--steps", str(args.steps), "--batch-per-rank", str(args.batch_per_rank),
            "--accum", str(accum), "--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
            "--num-heads", str(args.num_heads), "--context", str(args.context), "--dropout", str(args.dropout),
            "--backend", args.backend, "--chunk-size", str(args.chunk_size), "--device", args.device,
            "--amp", args.amp, "--seed", str(args.seed), "--log-interval", str(args.log_interval)]


def _child_env() -> dict:
    """The environment of the torchrun children: this one, with the folder above ``glalearn`` importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def median_tokens_per_s(log: dict, warmup: int) -> float:
    """Median tokens/s (all ranks together) over the steps at or after ``warmup``."""
    rates = [r["tokens_per_s"] for r in log["steps"] if r["step"] >= warmup]
    if not rates:
        raise ValueError(f"warmup must leave steps to measure: {warmup} warm-up steps, "
                         f"{len(log['steps'])} steps logged")
    return statistics.median(rates)


def launch(name: str, nproc: int, accum: int, args: argparse.Namespace, timeout: float) -> dict:
    """One torchrun of the worker; returns its record (log summary, or the error and the output's tail)."""
    out = Path(args.out) / name
    if out.is_dir() and (out / "train_log.json").exists():  # this driver's own run of an earlier run-all
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "glalearn.scaling", "worker", *_worker_args(args, accum, out)]
    record = {"name": name, "ranks": nproc, "accum_steps": accum, "global_batch": args.batch_per_rank * nproc * accum,
              "micro_batch_per_rank": args.batch_per_rank,
              "command": "torchrun --standalone --nproc_per_node " + " ".join(cmd[5:])}
    start = time.perf_counter()
    with open(out / "output.txt", "w") as sink:
        try:
            proc = subprocess.run(cmd, check=False, stdout=sink, stderr=subprocess.STDOUT, env=_child_env(), timeout=timeout)
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = None
            record["error"] = f"stopped after {timeout:.0f} s (--deadline)"
    record["wall_s"] = round(time.perf_counter() - start, 1)
    if record["returncode"] != 0:
        record.setdefault("error", f"torchrun exited with {record['returncode']}")
        record["output_tail"] = (out / "output.txt").read_text(errors="replace")[-3000:]
        return record
    log = json.loads((out / "train_log.json").read_text())
    record["tokens_per_s"] = round(median_tokens_per_s(log, args.warmup), 1)
    record["tokens_per_s_per_rank"] = round(record["tokens_per_s"] / nproc, 1)
    record["parameters"] = log["parameters"]
    record["final_val_loss"] = log["final_val_loss"]
    record["steps"] = [{k: r[k] for k in ("step", "loss", "tokens_per_s")} for r in log["steps"]]
    return record


def machine_info(device: str) -> dict:
    import numpy
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "cpu_count": os.cpu_count(), "device": device,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device != "cpu" and torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # noqa: BLE001 - informational only
            info["nccl"] = f"unknown ({err})"
        for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"]), ("topology", ["nvidia-smi", "topo", "-m"])):
            try:
                info[key] = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError) as err:
                info[key] = f"unavailable ({err})"
    return info


def device_slug(machine: dict) -> str:
    """'h100' for 'NVIDIA H100 80GB HBM3', 'cpu' without GPUs: the <gpu> of scaling_<gpu>.json."""
    if not machine.get("gpus"):
        return "cpu"
    name = machine["gpus"][0]
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def run_all(args: argparse.Namespace, command: str) -> dict:
    """Every run one after another, merged into one results dict (written by :func:`main`)."""
    if args.gpus < 2:
        raise ValueError(f"--gpus must be at least 2 (1 vs N ranks), got {args.gpus}")
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup must be below --steps ({args.steps}), got {args.warmup}")
    start = time.perf_counter()
    results = {"schema_version": SCHEMA_VERSION, "experiment": "scaling", "command": command,
               "machine": machine_info(args.device),
               "settings": {k: getattr(args, k) for k in ("gpus", "steps", "warmup", "batch_per_rank", "context",
                                                          "d_model", "n_layers", "num_heads", "dropout", "backend",
                                                          "chunk_size", "device", "amp", "seed", "log_interval")},
               "runs": []}
    have = results["machine"].get("gpu_count")
    if have is not None and have < args.gpus:
        raise ValueError(f"--gpus must be at most the {have} GPU(s) of this machine, got {args.gpus}")
    plan = [(f"ranks{n}", n, 1) for n in _rank_counts(args.gpus)] + [(f"ranks1_accum{args.gpus}", 1, args.gpus)]
    for name, nproc, accum in plan:
        left = args.deadline - (time.perf_counter() - start)
        if left <= 5:
            results["runs"].append({"name": name, "ranks": nproc, "accum_steps": accum, "returncode": None,
                                    "error": "not started: --deadline reached"})
            continue
        print(f"[scaling] {name}: torchrun --nproc_per_node {nproc}, accumulation {accum} "
              f"({left:.0f} s left)", flush=True)
        record = launch(name, nproc, accum, args, timeout=left)
        results["runs"].append(record)
        print(f"[scaling] {name}: " + (f"{record['tokens_per_s']:,.0f} tokens/s, {record['wall_s']} s"
                                       if "tokens_per_s" in record else record["error"]), flush=True)
    by_name = {r["name"]: r for r in results["runs"]}
    base = by_name.get("ranks1", {}).get("tokens_per_s")
    results["throughput"] = {str(r["ranks"]): r["tokens_per_s"] for r in results["runs"]
                             if r["accum_steps"] == 1 and "tokens_per_s" in r}
    results["speedup"] = ({n: round(tps / base, 3) for n, tps in results["throughput"].items()} if base else {})
    many, acc = by_name.get(f"ranks{args.gpus}", {}), by_name.get(f"ranks1_accum{args.gpus}", {})
    if "steps" in many and "steps" in acc:
        a, b = [r["loss"] for r in many["steps"]], [r["loss"] for r in acc["steps"]]
        results["loss_curves"] = {"ranks": args.gpus, "effective_batch": many["global_batch"],
                                  "n_ranks": a, "one_rank_accumulating": b,
                                  "max_abs_diff": round(max(abs(x - y) for x, y in zip(a, b)), 6)}
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["complete"] = all(r.get("returncode") == 0 for r in results["runs"])
    return results


def summary(results: dict) -> str:
    lines = [f"scaling on {', '.join(results['machine'].get('gpus', ['cpu']))}"]
    for n, tps in results["throughput"].items():
        lines.append(f"  {n} rank(s): {tps:>12,.0f} tokens/s   speed-up {results['speedup'].get(n, float('nan')):.2f}x")
    if "loss_curves" in results:
        c = results["loss_curves"]
        lines.append(f"  loss {c['ranks']} ranks vs 1 rank accumulating {c['ranks']}: max |diff| {c['max_abs_diff']}")
    lines.append(f"  wall {results['wall_s']} s, complete: {results['complete']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading the results (chapter 11)
def find_results(folder: str | Path | None = None) -> list[tuple[Path, dict]]:
    """Every committed ``scaling_*.json`` (default: the package's ``assets/results``), sorted by name."""
    if folder is None:
        from importlib.resources import files

        folder = Path(str(files("glalearn") / "assets" / "results"))
    return [(p, json.loads(p.read_text())) for p in sorted(Path(folder).glob(RESULTS_GLOB))]


def results_table(results: dict) -> str:
    """tokens/s, speed-up and per-rank efficiency per number of ranks, as a fixed-width table."""
    lines = [f"{'ranks':>5}  {'global batch':>12}  {'tokens/s':>12}  {'speed-up':>8}  {'efficiency':>10}"]
    for r in results["runs"]:
        if r.get("accum_steps") != 1 or "tokens_per_s" not in r:
            continue
        speed = results["speedup"][str(r["ranks"])]
        lines.append(f"{r['ranks']:>5}  {r['global_batch']:>12}  {r['tokens_per_s']:>12,.0f}  {speed:>7.2f}x  "
                     f"{speed / r['ranks']:>10.0%}")
    return "\n".join(lines)


def plot_scaling(results: dict, label: str = ""):
    """Two panels: tokens/s against ranks (with perfect scaling), and the loss curves of N ranks against one
    rank accumulating N micro-batches (the same effective batch). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = sorted(int(n) for n in results["throughput"])
    tps = [results["throughput"][str(n)] for n in ranks]
    ax1.plot(ranks, [tps[0] * n for n in ranks], "--", color="gray", label="perfect scaling")
    ax1.plot(ranks, tps, "o-", label="measured (median after warm-up)")
    ax1.set(xlabel="ranks (GPUs)", ylabel="tokens / s (all ranks)", xticks=ranks,
            title=f"throughput, same micro-batch per rank {label}".strip())
    ax1.set_ylim(bottom=0)
    ax1.legend()
    curves = results.get("loss_curves")
    if curves:
        steps = range(len(curves["n_ranks"]))
        ax2.plot(steps, curves["one_rank_accumulating"], label=f"1 rank, accumulating {curves['ranks']}")
        ax2.plot(steps, curves["n_ranks"], "--", label=f"{curves['ranks']} ranks")
        ax2.set(xlabel="step", ylabel="training loss (nats/char)",
                title=f"same effective batch ({curves['effective_batch']} windows)")
        ax2.legend()
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- command line
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--batch-per-rank", type=int, default=64, help="micro-batch per rank, in windows (default 64)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backend", default="chunk", help="GLA backend (default chunk, as shakespeare-gla)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bfloat16", "float16", "none"],
                   help="autocast dtype: auto (bfloat16 on a GPU, none on a CPU), bfloat16, float16 or none")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-interval", type=int, default=10, help="steps per throughput measurement (default 10)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="python -m glalearn.scaling", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{run-all,worker}")
    ra = sub.add_parser("run-all", help="launch every run with torchrun and merge them into one JSON")
    ra.add_argument("--gpus", type=int, default=2, help="the most ranks to run (default 2)")
    ra.add_argument("--out", required=True, help="folder for the runs' logs and the merged JSON")
    ra.add_argument("--json", help="where to write the merged JSON (default OUT/scaling_<gpu>.json)")
    ra.add_argument("--warmup", type=int, default=50, help="steps left out of the throughput median (default 50)")
    ra.add_argument("--deadline", type=float, default=450, help="seconds for everything (default 450)")
    _add_model_args(ra)
    wk = sub.add_parser("worker", help="one rank of one run (launched by run-all through torchrun)")
    wk.add_argument("--out", required=True)
    wk.add_argument("--accum", type=int, default=1)
    wk.add_argument("--keep-checkpoints", action="store_true", help="keep the run's .safetensors files")
    _add_model_args(wk)
    args = parser.parse_args(argv)
    if args.cmd == "worker":
        args.argv = argv[1:]
        return run_worker(args)
    command = "python -m glalearn.scaling " + " ".join(argv)
    results = run_all(args, command)  # its ValueErrors are the user's: one line from guarded()
    path = Path(args.json) if args.json else Path(args.out) / f"scaling_{device_slug(results['machine'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(summary(results))
    print(f"[scaling] results in {path}")
    return 0 if results["complete"] else 1


if __name__ == "__main__":
    sys.exit(guarded("python -m glalearn.scaling", main))
