"""The experiments of chapter 10: associative recall (MQAR) and the gate ablation.

    python -m glalearn.experiments recall   --preset cpu   --out glalearn/assets/results/recall_cpu.json
    python -m glalearn.experiments recall   --preset paper --out recall_paper.json        # a GPU's work
    python -m glalearn.experiments ablation --preset cpu   --out glalearn/assets/results/ablation_cpu.json

**recall** trains 2-layer models on multi-query associative recall (``glalearn.tasks.mqar``; the paper's
Fig. 4, after Zoology) with five token mixers — softmax attention (Transformer++), GLA (``gate="vector"``),
a scalar data-dependent gate per head, RetNet's fixed per-head decays, and no gate at all — at several
model widths and numbers of key-value pairs, and records the accuracy on the queried positions of a
fixed held-out set over training. The ``paper`` preset is the paper's grid (widths 64/128/256, sequence
length 256, 16 and 64 pairs, vocabulary 8192, a learning-rate sweep); ``cpu`` is a miniature that runs on
a 2-core CPU in minutes; ``micro`` exists for the tests.

**ablation** is the paper's Table 4 in miniature on Tiny Shakespeare: the four gates and 1 / 4 / 8 heads,
each trained with ``glalearn.train`` for the same steps, batch and context (so the same tokens in the same
order), compared by validation loss.

Each command writes one JSON file with the command line, machine, versions, date, every run's
configuration, seed, training curve and final figures, so that chapter 10 reads every number it shows
from a file that this module regenerates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from glalearn.model import CausalLM, GLAConfig, TransformerConfig, build_model
from glalearn.tasks.mqar import IGNORE, mqar_accuracy, mqar_batch

# The token mixers of the recall experiment: name -> the GLA layer's gate (None: softmax attention).
MIXERS: dict[str, str | None] = {"softmax": None, "gla": "vector", "scalar": "scalar", "fixed": "fixed",
                                 "none": "none"}
MIXER_LABELS = {"softmax": "softmax attention (Transformer++)", "gla": "GLA (vector gate)",
                "scalar": "scalar gate", "fixed": "fixed decay (RetNet-like)", "none": "no gate"}
SCHEMA_VERSION = 1
EVAL_SEED = 1_000_003  # the held-out MQAR set: never a training seed (those are below 2**20)


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class RecallPreset:
    """A grid of MQAR runs (chapter 10): every mixer × width × num_pairs × seed × lr.

    When ``lrs`` has several entries, each cell reports its best learning rate (Zoology's protocol).
    """

    widths: tuple[int, ...]
    seq_len: int
    num_pairs: tuple[int, ...]
    vocab_size: int
    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    num_heads: int = 2
    n_layers: int = 2
    warmup_steps: int = 20
    weight_decay: float = 0.1
    eval_every: int = 25
    eval_size: int = 256
    backend: str = "auto"
    mixers: tuple[str, ...] = tuple(MIXERS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECALL_PRESETS: dict[str, RecallPreset] = {
    # The paper's grid (Fig. 4, after Zoology: 100k training sequences for 64 epochs, best lr of a sweep).
    "paper": RecallPreset(widths=(64, 128, 256), seq_len=256, num_pairs=(16, 64), vocab_size=8192,
                          steps=25_000, batch_size=256, lrs=(1e-4, 3.2e-4, 1e-3, 3.2e-3), seeds=(0,),
                          warmup_steps=500, eval_every=500, eval_size=3000, num_heads=2),
    # The paper's grid at about 1/64 of its training budget (800 steps x 128 sequences, one lr). Measured on
    # the lent H200: about 140 s per run (30 runs: over an hour), and the first three runs (width 64,
    # 16 pairs) reached accuracy <= 0.001 at this budget: not yet a useful setting.
    "gpu": RecallPreset(widths=(64, 128, 256), seq_len=256, num_pairs=(16, 64), vocab_size=8192,
                        steps=800, batch_size=128, lrs=(1e-3,), seeds=(0,), warmup_steps=50, eval_every=200,
                        eval_size=1000, num_heads=2),
    # A miniature for a 2-core CPU, sized to finish in under 10 minutes on a shared one (chapter 10). At this
    # budget the models are early in training: probes at width 32, 4 pairs reached ~0.45 (GLA) and ~0.34
    # (softmax) after 200 steps and softmax ~0.56 after 1000 — more than this machine can give 30 runs.
    "cpu": RecallPreset(widths=(16, 32, 64), seq_len=32, num_pairs=(4, 8), vocab_size=32, steps=120,
                        batch_size=64, lrs=(3e-3,), seeds=(0,), eval_every=20, eval_size=128),
    # For the tests: seconds.
    "micro": RecallPreset(widths=(16,), seq_len=16, num_pairs=(2,), vocab_size=16, steps=3, batch_size=4,
                          lrs=(1e-2,), seeds=(0,), warmup_steps=1, eval_every=2, eval_size=8),
}


@dataclass(frozen=True)
class AblationPreset:
    """The Table-4 ablation (chapter 10): GLA model shape and the training budget every variant gets."""

    d_model: int
    n_layers: int
    context: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    seed: int = 1337
    backend: str = "auto"
    dropout: float = 0.0
    # (name, gate, heads): GLA with 4 heads is the reference row of the paper's table.
    variants: tuple[tuple[str, str, int], ...] = (
        ("gla", "vector", 4), ("no gate", "none", 4), ("fixed decay", "fixed", 4), ("scalar gate", "scalar", 4),
        ("gla, 1 head", "vector", 1), ("gla, 8 heads", "vector", 8))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ABLATION_PRESETS: dict[str, AblationPreset] = {
    "paper": AblationPreset(d_model=256, n_layers=6, context=256, steps=5000, batch_size=64, lr=2e-3,
                            warmup_steps=200, eval_interval=250, eval_batches=8, dropout=0.1),
    "cpu": AblationPreset(d_model=64, n_layers=2, context=128, steps=300, batch_size=16, lr=3e-3,
                          warmup_steps=30, eval_interval=50, eval_batches=4),
    "micro": AblationPreset(d_model=32, n_layers=1, context=16, steps=2, batch_size=2, lr=1e-3,
                            warmup_steps=1, eval_interval=1, eval_batches=1,
                            variants=(("gla", "vector", 4), ("no gate", "none", 4))),
}

# Paper, Table 4 (340M parameters, 10B tokens of SlimPajama; word-level perplexity on its validation set).
PAPER_TABLE4 = {"gla": 14.77, "no gate": 23.21, "fixed decay": 16.55, "scalar gate": 15.56,
                "gla, 8 heads": 15.29, "gla, 1 head": 14.61}


# ----------------------------------------------------------------------------- provenance
def machine_info(device: torch.device) -> dict:
    """Where and with what a result was produced: host, CPU/GPU, threads, versions and the date (UTC)."""
    import numpy

    import glalearn

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "glalearn": glalearn.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ----------------------------------------------------------------------------- recall (MQAR)
def recall_model(mixer: str, width: int, preset: RecallPreset) -> CausalLM:
    """The 2-layer model of one recall run (chapter 10): same blocks, only the token mixer differs.

    ``mixer`` is a key of :data:`MIXERS`; the vocabulary is the MQAR vocabulary and the context the
    sequence length. GLA models use ``preset.backend``.
    """
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {tuple(MIXERS)}, got {mixer!r}")
    common = {"vocab_size": preset.vocab_size, "d_model": width, "n_layers": preset.n_layers,
              "num_heads": preset.num_heads, "context_length": preset.seq_len}
    if MIXERS[mixer] is None:
        return build_model(TransformerConfig(**common))
    return build_model(GLAConfig(**common, gate=MIXERS[mixer], backend=preset.backend))


def _lr_at(step: int, peak: float, warmup: int, steps: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def _evaluate(model: CausalLM, batch, device: torch.device, chunk: int = 64) -> tuple[float, float]:
    """(accuracy, loss) on the queried positions of a fixed batch."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(batch.inputs[i:i + chunk].to(device)).cpu()
                        for i in range(0, batch.inputs.shape[0], chunk)])
    model.train(was_training)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=IGNORE)
    return mqar_accuracy(logits, batch.targets), loss.item()


def train_recall(mixer: str, width: int, num_pairs: int, seed: int, lr: float, preset: RecallPreset,
                 device: str | torch.device = "cpu", return_model: bool = False):
    """Train one model on MQAR and return its record (chapter 10).

    The training batches are a function of (seed, num_pairs) only, so every mixer of a cell sees the
    same sequences in the same order; the held-out set (``preset.eval_size`` sequences) is the same for
    every run with this number of pairs. The weights are initialised from ``seed``.

    Returns a dict: mixer, width, num_pairs, seed, lr, model config, parameters, curve (step, training
    loss, held-out accuracy and loss), final_accuracy, final_loss, wall_s; with ``return_model`` the
    pair (record, model).
    """
    device = torch.device(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = recall_model(mixer, width, preset).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    data = torch.Generator().manual_seed(seed * 1009 + num_pairs)
    held_out = mqar_batch(preset.eval_size, preset.seq_len, num_pairs, preset.vocab_size, seed=EVAL_SEED + num_pairs)
    curve, recent = [], []
    model.train()
    for step in range(preset.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, lr, preset.warmup_steps, preset.steps)
        batch = mqar_batch(preset.batch_size, preset.seq_len, num_pairs, preset.vocab_size, generator=data)
        logits = model(batch.inputs.to(device))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.to(device).reshape(-1),
                               ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.detach())
        done = step + 1
        if done % preset.eval_every == 0 or done == preset.steps:
            accuracy, held_loss = _evaluate(model, held_out, device)
            curve.append({"step": done, "train_loss": round(torch.stack(recent).mean().item(), 5),
                          "accuracy": round(accuracy, 5), "loss": round(held_loss, 5)})
            recent = []
    record = {"mixer": mixer, "width": width, "num_pairs": num_pairs, "seed": seed, "lr": lr,
              "model_config": model.config.to_dict(), "parameters": model.num_parameters(),
              "curve": curve, "final_accuracy": curve[-1]["accuracy"], "final_loss": curve[-1]["loss"],
              "wall_s": round(time.perf_counter() - started, 2),
              "cpu_s": round(time.process_time() - cpu_started, 2)}
    return (record, model) if return_model else record


def summarize_recall(runs: list[dict]) -> list[dict]:
    """One row per (mixer, width, num_pairs): the best lr's accuracy, averaged over seeds (and each seed's).

    Zoology (and the paper's Fig. 4) reports, per cell, the best accuracy over a learning-rate sweep.
    """
    cells: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        key = (r["mixer"], r["width"], r["num_pairs"])
        best = cells.setdefault(key, {})
        if r["seed"] not in best or r["final_accuracy"] > best[r["seed"]]["final_accuracy"]:
            best[r["seed"]] = r
    rows = []
    for (mixer, width, num_pairs), by_seed in cells.items():
        accs = [by_seed[s]["final_accuracy"] for s in sorted(by_seed)]
        rows.append({"mixer": mixer, "width": width, "num_pairs": num_pairs,
                     "accuracy": round(sum(accs) / len(accs), 5), "per_seed": accs,
                     "seeds": sorted(by_seed), "best_lr": [by_seed[s]["lr"] for s in sorted(by_seed)]})
    return rows


def run_recall(preset_name: str, device: str = "auto", progress: bool = True, command: str | None = None,
               checkpoint: str | Path | None = None, checkpoint_run: tuple[str, int, int] | None = None,
               on_run=None) -> dict:
    """The whole recall grid of a preset -> the results dict (see module docstring and chapter 10).

    ``checkpoint`` (a .safetensors path) saves the weights of the run ``checkpoint_run`` =
    (mixer, width, num_pairs) (first seed, first lr) with its model config in the file's metadata —
    the tiny model that chapter 10 looks inside. ``on_run(results)``, if given, is called after every
    run (to save partial results of a long grid).
    """
    if preset_name not in RECALL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(RECALL_PRESETS)}, got {preset_name!r}")
    preset = RECALL_PRESETS[preset_name]
    dev = resolve_device(device)
    results = {"schema_version": SCHEMA_VERSION, "experiment": "recall", "preset": preset_name,
               "command": command, "machine": machine_info(dev), "settings": preset.to_dict(), "runs": []}
    started, cpu_started = time.perf_counter(), time.process_time()
    grid = [(p, w, s, lr, m) for p in preset.num_pairs for w in preset.widths for s in preset.seeds
            for lr in preset.lrs for m in preset.mixers]
    for i, (num_pairs, width, seed, lr, mixer) in enumerate(grid, 1):
        want_model = checkpoint is not None and checkpoint_run == (mixer, width, num_pairs) and \
            seed == preset.seeds[0] and lr == preset.lrs[0]
        out = train_recall(mixer, width, num_pairs, seed, lr, preset, dev, return_model=want_model)
        record, model = out if want_model else (out, None)
        results["runs"].append(record)
        if model is not None:
            save_recall_checkpoint(model, checkpoint, record)
        if on_run is not None:
            on_run(results)
        if progress:
            print(f"[{i}/{len(grid)}] {mixer:>7} width {width:>3} pairs {num_pairs:>2} seed {seed} lr {lr:g}: "
                  f"accuracy {record['final_accuracy']:.3f} ({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    results["summary"] = summarize_recall(results["runs"])
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["cpu_s"] = round(time.process_time() - cpu_started, 1)
    return results


def save_recall_checkpoint(model: CausalLM, path: str | Path, record: dict) -> None:
    """Weights (float32 safetensors) + metadata {"model_config": json, "run": json without the curve}."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    run = {k: v for k, v in record.items() if k not in ("curve", "model_config")}
    save_file(tensors, str(path), metadata={"model_config": json.dumps(model.config.to_dict()),
                                            "run": json.dumps(run)})


def load_recall_checkpoint(path: str | Path) -> tuple[CausalLM, dict]:
    """(model in eval mode on the CPU, run record) from :func:`save_recall_checkpoint`'s file (chapter 10)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = build_model(json.loads(meta["model_config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), json.loads(meta["run"])


RECALL_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "recall_gla.safetensors"


@torch.no_grad()
def inspect_gla(model: CausalLM, input_ids: torch.Tensor) -> dict:
    """What each GLA layer computes on one sequence (chapter 10's look inside).

    Args: model: a GLAForCausalLM;  input_ids: [1, T].
    Returns: {"layers": [{"q", "k", "g": [T, H, d_k], "v": [T, H, d_v]} per layer], "logits": [T, vocab]},
    with q, k, v, g exactly as the layer hands them to the GLA form (g = log forget gate).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    mixers = [block.mixer for block in model.blocks]
    if not all(hasattr(m, "project") for m in mixers):
        raise TypeError("inspect_gla needs a GLA model (every block's mixer a GatedLinearAttention)")
    captured: list[dict] = []

    def hook(module, args):
        q, k, v, g = module.project(args[0])
        captured.append({"q": q[0], "k": k[0], "v": v[0], "g": g[0]})

    handles = [m.register_forward_pre_hook(hook) for m in mixers]
    try:
        logits = model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return {"layers": captured, "logits": logits[0]}


# ----------------------------------------------------------------------------- the gate ablation
def run_ablation(preset_name: str, device: str = "auto", progress: bool = True, command: str | None = None) -> dict:
    """The paper's Table 4 in miniature: every variant of ``preset.variants`` trained with the same budget.

    Each variant is a GLA language model on Tiny Shakespeare trained by :func:`glalearn.train.train` with
    the same seed, steps, batch and context, so every variant sees the same batches in the same order.
    Returns the results dict: per variant its model config, parameters, validation curve, final
    validation loss (nats per character) and its perplexity exp(loss) per character.
    """
    from glalearn.train import TrainConfig, train

    if preset_name not in ABLATION_PRESETS:
        raise ValueError(f"preset must be one of {sorted(ABLATION_PRESETS)}, got {preset_name!r}")
    preset = ABLATION_PRESETS[preset_name]
    dev = resolve_device(device)
    results = {"schema_version": SCHEMA_VERSION, "experiment": "ablation", "preset": preset_name,
               "command": command, "machine": machine_info(dev), "settings": preset.to_dict(),
               "paper_table4_ppl": PAPER_TABLE4, "runs": []}
    started, cpu_started = time.perf_counter(), time.process_time()
    for name, gate, heads in preset.variants:
        t0, c0 = time.perf_counter(), time.process_time()
        model = GLAConfig(vocab_size=65, d_model=preset.d_model, n_layers=preset.n_layers, num_heads=heads,
                          context_length=preset.context, dropout=preset.dropout, gate=gate, backend=preset.backend)
        cfg = TrainConfig(model=model.to_dict(), steps=preset.steps, batch_size=preset.batch_size,
                          context=preset.context, lr=preset.lr, warmup_steps=preset.warmup_steps,
                          eval_interval=preset.eval_interval, eval_batches=preset.eval_batches,
                          checkpoint_interval=preset.steps, seed=preset.seed, device=str(dev),
                          amp_dtype="bfloat16" if dev.type == "cuda" else None)
        with tempfile.TemporaryDirectory() as tmp:
            log = train(cfg, tmp, progress=False, command=command)
        record = {"name": name, "gate": gate, "num_heads": heads, "model_config": model.to_dict(),
                  "train_config": cfg.to_dict(), "seed": preset.seed, "parameters": log["parameters"],
                  "evals": log["evals"], "train_curve": [{"step": r["step"], "loss": r["loss"]} for r in log["steps"]],
                  "final_val_loss": log["final_val_loss"], "final_val_ppl": round(math.exp(log["final_val_loss"]), 4),
                  "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}
        results["runs"].append(record)
        if progress:
            print(f"{name:>13}: val loss {record['final_val_loss']:.4f} (ppl {record['final_val_ppl']:.3f}/char, "
                  f"{record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["cpu_s"] = round(time.process_time() - cpu_started, 1)
    return results


# ----------------------------------------------------------------------------- the results files
_TOP = {"schema_version": int, "experiment": str, "preset": str, "command": str, "machine": dict,
        "settings": dict, "runs": list, "wall_s": (int, float), "cpu_s": (int, float)}
_MACHINE = ("date", "python", "torch", "device", "platform", "cpu_count")
_RECALL_RUN = {"mixer": str, "width": int, "num_pairs": int, "seed": int, "lr": float, "model_config": dict,
               "parameters": int, "curve": list, "final_accuracy": (int, float), "final_loss": (int, float),
               "wall_s": (int, float), "cpu_s": (int, float)}
_ABLATION_RUN = {"name": str, "gate": str, "num_heads": int, "model_config": dict, "train_config": dict,
                 "seed": int, "parameters": int, "evals": list, "train_curve": list, "final_val_loss": (int, float),
                 "final_val_ppl": (int, float), "wall_s": (int, float), "cpu_s": (int, float)}


def _require(obj: dict, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(obj).__name__}")
    for key, kind in spec.items():
        if key not in obj:
            raise ValueError(f"{where} lacks the field {key!r}")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise TypeError(f"{where}[{key!r}] must be {kind}, got {obj[key]!r}")


def validate_results(data: dict) -> None:
    """Check a results dict of :func:`run_recall` / :func:`run_ablation` (schema 1); ValueError naming the flaw.

    Beyond the fields and their types: the command is this module's, curves are in step order and end
    with the final figures, accuracies lie in [0, 1], perplexities are exp(loss), and the recall summary
    is what :func:`summarize_recall` makes of the runs.
    """
    _require(data, _TOP, "results")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results schema_version must be {SCHEMA_VERSION}, got {data['schema_version']}")
    expected_start = f"python -m glalearn.experiments {data['experiment']} "
    if not data["command"].startswith(expected_start) or f"--preset {data['preset']}" not in data["command"]:
        raise ValueError(f"results command must start with {expected_start!r} and name --preset "
                         f"{data['preset']}, got {data['command']!r}")
    for key in _MACHINE:
        if key not in data["machine"]:
            raise ValueError(f"results['machine'] lacks {key!r}")
    if not data["runs"]:
        raise ValueError("results['runs'] is empty")
    if data["experiment"] == "recall":
        for i, run in enumerate(data["runs"]):
            where = f"results['runs'][{i}]"
            _require(run, _RECALL_RUN, where)
            if run["mixer"] not in MIXERS:
                raise ValueError(f"{where}['mixer'] must be one of {tuple(MIXERS)}, got {run['mixer']!r}")
            steps = [p["step"] for p in run["curve"]]
            if not steps or steps != sorted(set(steps)):
                raise ValueError(f"{where}['curve'] must be non-empty with increasing steps, got {steps}")
            for p in run["curve"]:
                _require(p, {"step": int, "train_loss": (int, float), "accuracy": (int, float),
                             "loss": (int, float)}, f"{where}['curve']")
                if not 0.0 <= p["accuracy"] <= 1.0:
                    raise ValueError(f"{where}: accuracy {p['accuracy']} outside [0, 1]")
            if run["final_accuracy"] != run["curve"][-1]["accuracy"]:
                raise ValueError(f"{where}['final_accuracy'] is not the curve's last accuracy")
        if data.get("summary") != summarize_recall(data["runs"]):
            raise ValueError("results['summary'] does not match summarize_recall(results['runs'])")
    elif data["experiment"] == "ablation":
        for i, run in enumerate(data["runs"]):
            where = f"results['runs'][{i}]"
            _require(run, _ABLATION_RUN, where)
            if not run["evals"] or run["final_val_loss"] != run["evals"][-1]["val_loss"]:
                raise ValueError(f"{where}['final_val_loss'] is not the last evaluation's val_loss")
            if abs(run["final_val_ppl"] - math.exp(run["final_val_loss"])) > 1e-3 * run["final_val_ppl"]:
                raise ValueError(f"{where}['final_val_ppl'] is not exp(final_val_loss)")
    else:
        raise ValueError(f"results['experiment'] must be 'recall' or 'ablation', got {data['experiment']!r}")


def load_results(name: str) -> dict:
    """A committed results file of ``glalearn/assets/results/`` (e.g. "recall_cpu.json"), validated."""
    from importlib.resources import files

    data = json.loads((files("glalearn") / "assets" / "results" / name).read_text())
    validate_results(data)
    return data


# ----------------------------------------------------------------------------- command line
def _write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glalearn.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    recall = sub.add_parser("recall", help="MQAR accuracy of five token mixers over widths and pairs")
    recall.add_argument("--preset", default="cpu", choices=sorted(RECALL_PRESETS))
    recall.add_argument("--out", help="results JSON (default: recall_PRESET.json in the current folder)")
    recall.add_argument("--checkpoint", help="save one run's weights here (.safetensors)")
    recall.add_argument("--checkpoint-run", default="gla,64,4",
                        help="which run --checkpoint saves: MIXER,WIDTH,PAIRS (default gla,64,4)")
    ablation = sub.add_parser("ablation", help="Table 4 in miniature: gates and heads on Tiny Shakespeare")
    ablation.add_argument("--preset", default="cpu", choices=sorted(ABLATION_PRESETS))
    ablation.add_argument("--out", help="results JSON (default: ablation_PRESET.json in the current folder)")
    for p in (recall, ablation):
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
        p.add_argument("--threads", type=int, default=1,
                       help="torch.set_num_threads (default 1: these models are tiny, and on a shared 2-core "
                            "machine 2 threads measured 10-20x slower than 1)")
        p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m glalearn.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or f"{args.experiment}_{args.preset}.json"
    if args.experiment == "recall":
        try:
            mixer, width, pairs = args.checkpoint_run.split(",")
            run = (mixer, int(width), int(pairs))
        except ValueError:
            parser.error(f"--checkpoint-run must be MIXER,WIDTH,PAIRS, got {args.checkpoint_run!r}")
        results = run_recall(args.preset, args.device, not args.quiet, command, args.checkpoint, run,
                             on_run=lambda partial: _write_json({**partial, "partial": True}, out))
    else:
        results = run_ablation(args.preset, args.device, not args.quiet, command)
    validate_results(results)
    _write_json(results, out)
    print(f"{args.experiment} ({args.preset}): {len(results['runs'])} runs in {results['wall_s']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
