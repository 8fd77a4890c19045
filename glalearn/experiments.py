"""The experiments of chapter 10: associative recall (MQAR) and the gate ablation.

    python -m glalearn.experiments recall   --preset cpu   --out glalearn/assets/results/recall_cpu.json
    python -m glalearn.experiments recall   --preset gpu   --jobs 15 --out recall_gpu.json   # ~7 min, one H200
    python -m glalearn.experiments recall   --preset paper --jobs 15 --out recall_paper.json # hours of a GPU
    python -m glalearn.experiments cause    --preset cpu   --jobs 2 --out glalearn/assets/results/cause_cpu.json
    python -m glalearn.experiments ablation --preset cpu   --out glalearn/assets/results/ablation_cpu.json

**recall** trains 2-layer models on multi-query associative recall (``glalearn.tasks.mqar``; the paper's
Fig. 4, after Zoology) with five token mixers — softmax attention (Transformer++), GLA (``gate="vector"``),
a scalar data-dependent gate per head, RetNet's fixed per-head decays, and no gate at all — at several
model widths and numbers of key-value pairs, and records the accuracy on the queried positions of a
fixed held-out set over training. The ``paper`` preset is the paper's grid (widths 64/128/256, sequence
length 256, 16 and 64 pairs, vocabulary 8192, a learning-rate sweep); ``gpu`` is that grid at the budget
of ten minutes of one GPU (chapter 10, §2b); ``cpu`` is a miniature that runs on a 2-core CPU in minutes;
``micro`` exists for the tests. Training scores the queried positions only (the head's product is paid
for those), evaluation sums on the device, and ``--jobs N`` runs the grid as N processes side by side.

**cause** is chapter 10's bisection of why every linear mixer once sat at chance on MQAR: the protocol
with a zero filler, a residual convolution on the block input and no output-gate bias, each of the three
changes alone, all three, and each left out, on one CPU-sized cell.

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
from torch import nn
from torch.nn import functional as F

from glalearn.clierror import OneLineParser
from glalearn.model import CausalLM, GLAConfig, TransformerConfig, build_model
from glalearn.tasks.mqar import FILLER, FILLERS, IGNORE, mqar_batch

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
    # Train on a mixture of easier recall (Zoology's protocol): each batch holds equal parts of
    # sequences with n, n/2, n/4, ... (down to 4) pairs for a cell of n pairs, a sequence of p pairs
    # being min(seq_len, 16 p) tokens long (Zoology's 64 tokens for 4 pairs, 128 for 8, 256 for 16 and
    # more) followed by filler that nothing is asked about; evaluated at n pairs and seq_len only.
    curriculum: bool = False
    # A short causal convolution beside every mixer (LMConfig.short_conv; Zoology's recall models have one).
    short_conv: int = 0
    # Where the short convolution sits for the linear mixers: "input" (a residual convolution over the
    # block's normalised input, every mixer) or "qkv" (SiLU convolutions on the layer's q, k and v, as in
    # flash-linear-attention and Zoology; softmax attention keeps the input convolution).
    conv_on: str = "input"
    # What stands between the queries (glalearn.tasks.mqar): "random" tokens as Zoology's generator does,
    # or the "zero" filler. With "zero", one repeated filler writes the same k^T v dozens of times into
    # a linear mixer's state (chapter 10, section 3): every linear mixer plateaus at chance.
    filler: str = "random"
    # Standard deviation of the normal initialisation of every linear and embedding weight (LMConfig.init_std).
    init_std: float = 0.02
    # The GLA output gate's bias b_r and its starting value (the paper's r_t = swish(x W_r + b_r));
    # None drops it, as flash-linear-attention's layer does: with small weights, swish(x W_r) then
    # multiplies everything the layer reads from its state by ~0 (chapter 10, section 3).
    output_gate_bias: float | None = 1.0

    def __post_init__(self):
        if self.conv_on not in ("input", "qkv"):
            raise ValueError(f"conv_on must be 'input' or 'qkv', got {self.conv_on!r}")
        if self.filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {self.filler!r}")
        unknown = [m for m in self.mixers if m not in MIXERS and m != "fla-gla"]
        if unknown:
            raise ValueError(f"mixers must be among {tuple(MIXERS) + ('fla-gla',)}, got {unknown}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_pairs(self, num_pairs: int) -> tuple[int, ...]:
        """The pair counts of the training batches of a cell with ``num_pairs`` pairs (ascending)."""
        if not self.curriculum:
            return (num_pairs,)
        counts = [num_pairs]
        while counts[-1] // 2 >= 4:
            counts.append(counts[-1] // 2)
        return tuple(sorted(counts))


def recall_training_batch(preset: RecallPreset, num_pairs: int, generator: torch.Generator):
    """One training batch (inputs, targets [batch_size, seq_len]) of a cell with ``num_pairs`` pairs.

    Without a curriculum: MQAR sequences with ``num_pairs`` pairs. With one: the batch is split into
    equal parts (the first parts one row larger when it does not divide), one per count p of
    :meth:`RecallPreset.training_pairs`, each an MQAR sequence of min(seq_len, 16 p) tokens padded
    with filler (and IGNORE targets) to ``seq_len``: a causal model reads it as the shorter sequence.
    """
    counts = preset.training_pairs(num_pairs)
    if len(counts) == 1:
        batch = mqar_batch(preset.batch_size, preset.seq_len, num_pairs, preset.vocab_size, generator=generator,
                           filler=preset.filler)
        return batch.inputs, batch.targets
    sizes = [preset.batch_size // len(counts) + (i < preset.batch_size % len(counts)) for i in range(len(counts))]
    inputs = torch.full((preset.batch_size, preset.seq_len), FILLER, dtype=torch.long)
    targets = torch.full((preset.batch_size, preset.seq_len), IGNORE, dtype=torch.long)
    row = 0
    for n, size in zip(counts, sizes):
        if size:
            length = max(4 * n, min(preset.seq_len, 16 * n))
            part = mqar_batch(size, length, n, preset.vocab_size, generator=generator, filler=preset.filler)
            inputs[row:row + size, :length], targets[row:row + size, :length] = part.inputs, part.targets
            row += size
    return inputs, targets


RECALL_PRESETS: dict[str, RecallPreset] = {
    # The paper's grid (Fig. 4, after Zoology: 100k training sequences for 64 epochs, best lr of a sweep).
    "paper": RecallPreset(widths=(64, 128, 256), seq_len=256, num_pairs=(16, 64), vocab_size=8192,
                          steps=25_000, batch_size=256, lrs=(1e-4, 3.2e-4, 1e-3, 3.2e-3), seeds=(0,),
                          warmup_steps=500, eval_every=500, eval_size=3000, num_heads=2),
    # The paper's grid (widths, T = 256, 16 and 64 pairs) at what one lent GPU gives in ten minutes: 1,200
    # steps x 128 sequences (1/40 of the paper's sequences), a 1,024-token vocabulary (the paper's 8,192
    # left every mixer at chance in 3,000 steps), Zoology's curriculum of easier recall and a short
    # convolution beside every mixer (without it softmax attention reached 0.02-0.18, with it ~1.0 within
    # 500 steps). Run as `--jobs 15` processes side by side on the GPU (one such model is far from filling it).
    # Two seeds; add the reference column with `--set mixers=softmax,gla,scalar,fixed,none,fla-gla` where
    # flash-linear-attention imports.
    "gpu": RecallPreset(widths=(64, 128, 256), seq_len=256, num_pairs=(16, 64), vocab_size=1024,
                        steps=1200, batch_size=128, lrs=(3e-3,), seeds=(0, 1), warmup_steps=100, eval_every=200,
                        eval_size=1000, num_heads=2, curriculum=True, short_conv=4, conv_on="qkv"),
    # Does a linear-attention mixer ever leave the plateau of the `gpu` grid? Its hardest cell at width 128
    # for 6.7x the steps, the four gated/ungated linear mixers only (softmax solved it within 400 steps).
    "gpu-long": RecallPreset(widths=(128,), seq_len=256, num_pairs=(64,), vocab_size=1024, steps=8000,
                             batch_size=128, lrs=(3e-3,), seeds=(0,), warmup_steps=100, eval_every=500,
                             eval_size=1000, num_heads=2, curriculum=True, short_conv=4, conv_on="qkv",
                             mixers=("gla", "scalar", "fixed", "none")),
    # A miniature for a 2-core CPU (chapter 10, section 2): one cell of the MQAR task at two widths, two
    # seeds, 1,000 steps of 64 sequences; about 15 minutes as `--jobs 2`. At 600 steps GLA and no gate
    # were both still leaving the plateau (0.45 / 0.47 at width 64, seed 0); at 1,200, 0.64 / 0.23.
    "cpu": RecallPreset(widths=(32, 64), seq_len=64, num_pairs=(8,), vocab_size=512, steps=1000,
                        batch_size=64, lrs=(3e-3,), seeds=(0, 1), eval_every=50, eval_size=256, num_heads=2,
                        short_conv=4, conv_on="qkv"),
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
def fla_available() -> bool:
    """True when flash-linear-attention's GLA layer imports (a GPU machine with ``fla`` installed).

    flash-linear-attention is never a dependency of glalearn: the ``fla-gla`` reference mixer of the
    recall experiment exists only where it is installed."""
    try:
        from fla.layers import GatedLinearAttention  # noqa: F401
    except (ImportError, RuntimeError, OSError, AttributeError):  # absent, or no CUDA/Triton for it
        return False
    return True


class FlaGLAMixer(nn.Module):
    """flash-linear-attention's ``GatedLinearAttention`` layer as a token mixer: [B, T, d] -> [B, T, d].

    The independent cross-check of chapter 10: the same width, heads, expand_k / expand_v, gate rank,
    gate normaliser and norm epsilon as glalearn's layer, with its own SiLU short convolution on q, k
    and v when ``conv`` > 0. Its weights are initialised by the model like every other mixer's.
    """

    def __init__(self, d_model: int, num_heads: int, conv: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5,
                 output_gate_bias: float | None = None):
        super().__init__()
        from fla.layers import GatedLinearAttention as FlaGLA

        self.layer = FlaGLA(mode="chunk", hidden_size=d_model, expand_k=expand_k, expand_v=expand_v,
                            num_heads=num_heads, use_short_conv=conv > 0, conv_size=max(conv, 1),
                            gate_low_rank_dim=gate_low_rank_dim, gate_logit_normalizer=gate_logit_normalizer,
                            norm_eps=norm_eps)
        self.output_gate_bias = output_gate_bias
        if output_gate_bias is not None:  # the same b_r as glalearn's layer gets (fla's g_proj has none)
            g = self.layer.g_proj
            self.layer.g_proj = nn.Linear(g.in_features, g.out_features, bias=True)
        self.init_output_gate_bias()

    def init_output_gate_bias(self) -> None:
        if self.output_gate_bias is not None:
            nn.init.constant_(self.layer.g_proj.bias, self.output_gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def available_mixers() -> tuple[str, ...]:
    """The mixers the recall experiment can run here: :data:`MIXERS`, plus ``fla-gla`` where fla imports."""
    return tuple(MIXERS) + (("fla-gla",) if fla_available() else ())


def recall_model(mixer: str, width: int, preset: RecallPreset) -> CausalLM:
    """The 2-layer model of one recall run (chapter 10): same blocks, only the token mixer differs.

    ``mixer`` is a key of :data:`MIXERS` or ``"fla-gla"`` (flash-linear-attention's GLA layer, where it
    is installed); the vocabulary is the MQAR vocabulary and the context the sequence length. GLA
    models use ``preset.backend``. ``preset.conv_on`` places the short convolution: on the block's
    input for every mixer, or (``"qkv"``) inside the linear mixers on q, k and v, softmax attention
    keeping the input convolution.
    """
    if mixer not in MIXERS and mixer != "fla-gla":
        raise ValueError(f"mixer must be one of {tuple(MIXERS) + ('fla-gla',)}, got {mixer!r}")
    inside = preset.conv_on == "qkv" and MIXERS.get(mixer, "fla") is not None
    common = {"vocab_size": preset.vocab_size, "d_model": width, "n_layers": preset.n_layers,
              "num_heads": preset.num_heads, "context_length": preset.seq_len, "init_std": preset.init_std,
              "short_conv": 0 if inside or mixer == "fla-gla" else preset.short_conv}
    if mixer == "fla-gla":
        if not fla_available():
            raise ValueError("mixer 'fla-gla' needs flash-linear-attention (pip install fla-core "
                             "flash-linear-attention on a CUDA machine); it is not installed here")
        # With conv_on="qkv" fla's layer carries its own convolution on q, k, v; with "input" the
        # preset's convolution stays on the block input (the same place as for the other mixers).
        conv = preset.short_conv if preset.conv_on == "qkv" else 0
        block_conv = 0 if conv else preset.short_conv
        config = GLAConfig(**{**common, "short_conv": block_conv}, gate="vector", backend=preset.backend)
        mixers = [FlaGLAMixer(width, preset.num_heads, conv, output_gate_bias=preset.output_gate_bias)
                  for _ in range(preset.n_layers)]
        return CausalLM(config, mixers)
    if MIXERS[mixer] is None:
        return build_model(TransformerConfig(**common))
    return build_model(GLAConfig(**common, gate=MIXERS[mixer], backend=preset.backend,
                                 qkv_conv=preset.short_conv if inside else 0,
                                 output_gate_bias=preset.output_gate_bias))


def recall_held_out(preset: RecallPreset, num_pairs: int):
    """The fixed held-out MQAR batch of every run with ``num_pairs`` pairs (never a training seed)."""
    return mqar_batch(preset.eval_size, preset.seq_len, num_pairs, preset.vocab_size, seed=EVAL_SEED + num_pairs,
                      filler=preset.filler)


def _lr_at(step: int, peak: float, warmup: int, steps: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _query_logits(model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, vocab] float32, labels [n]) at the n queried positions of a batch only.

    The head maps just the queried positions (a quarter or less of the tokens), so neither the head's
    product nor a [B, T, vocab] logits tensor is paid for the positions nothing is asked at; the
    loss is the same mean cross-entropy over the queried positions as on the full logits.
    """
    hidden = model.hidden_states(inputs)
    asked = targets != IGNORE
    return model.lm_head(hidden[asked]).float(), targets[asked]


@torch.no_grad()
def _evaluate(model: CausalLM, batch, device: torch.device, chunk: int = 256) -> tuple[float, float]:
    """(accuracy, loss) on the queried positions of a fixed batch, summed on the device."""
    was_training = model.training
    model.eval()
    correct = total_loss = count = 0
    for i in range(0, batch.inputs.shape[0], chunk):
        logits, labels = _query_logits(model, batch.inputs[i:i + chunk].to(device),
                                       batch.targets[i:i + chunk].to(device))
        correct += (logits.argmax(-1) == labels).sum()
        total_loss += F.cross_entropy(logits, labels, reduction="sum")
        count += labels.numel()
    model.train(was_training)
    return (correct / count).item(), (total_loss / count).item()


def _prefetched(make_batch, steps: int, ahead: int):
    """Yield ``make_batch()`` ``steps`` times; with ``ahead`` > 0 a background thread builds that many
    batches in advance (so a GPU never waits for the CPU's sampling). The batches and their order are
    the same either way: one thread draws them all, in order, from the one generator."""
    if ahead <= 0:
        for _ in range(steps):
            yield make_batch()
        return
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def work():
        for _ in range(steps):
            if stop.is_set():
                return
            q.put(make_batch())

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in range(steps):
            yield q.get()
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


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
    held_out = recall_held_out(preset, num_pairs)
    curve, recent = [], []
    model.train()
    batches = _prefetched(lambda: recall_training_batch(preset, num_pairs, data), preset.steps,
                          ahead=4 if device.type == "cuda" else 0)
    for step, (inputs, targets) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, lr, preset.warmup_steps, preset.steps)
        logits, labels = _query_logits(model, inputs.to(device, non_blocking=True),
                                       targets.to(device, non_blocking=True))
        loss = F.cross_entropy(logits, labels)
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


def recall_grid(preset: RecallPreset) -> list[tuple[int, int, int, float, str]]:
    """The runs of a preset in order, each (num_pairs, width, seed, lr, mixer); a run's index in this
    list is its ``grid_index``."""
    return [(p, w, s, lr, m) for p in preset.num_pairs for w in preset.widths for s in preset.seeds
            for lr in preset.lrs for m in preset.mixers]


def parse_overrides(items: list[str] | None) -> dict:
    """``["steps=2000", "lrs=1e-3,3e-3"]`` -> ``{"steps": 2000, "lrs": (0.001, 0.003)}``, typed by the
    fields of :class:`RecallPreset` (tuples from comma lists). ValueError names a bad item."""
    fields = {f.name: f for f in dataclasses.fields(RecallPreset)}
    defaults = RECALL_PRESETS["gpu"]
    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--set must be KEY=VALUE with KEY a preset field ({', '.join(sorted(fields))}), "
                             f"got {item!r}")
        current = getattr(defaults, key)
        if key == "output_gate_bias" and text.strip().lower() == "none":
            out[key] = None
            continue
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else str
                out[key] = tuple(kind(x) for x in text.split(",") if x.strip())
            elif isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = type(current)(text)
        except ValueError:
            raise ValueError(f"--set {key}: cannot read {text!r} as {type(current).__name__}") from None
    return out


def recall_preset(name: str, overrides: dict | None = None) -> RecallPreset:
    """The preset ``name`` of :data:`RECALL_PRESETS` with ``overrides`` (field -> value) applied."""
    if name not in RECALL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(RECALL_PRESETS)}, got {name!r}")
    return dataclasses.replace(RECALL_PRESETS[name], **(overrides or {}))


# What the harness did before these preset fields existed: a results file without them was made so.
# (The MQAR generator's only filler was token 0; the short convolution sat on the block input; the GLA
# layer's output gate had no bias.) ``--set filler=zero --set conv_on=input --set output_gate_bias=none``
# runs that protocol today.
EARLIER_PROTOCOL = {"conv_on": "input", "filler": "zero", "init_std": 0.02, "output_gate_bias": None}


def preset_from_settings(settings: dict) -> RecallPreset:
    """Rebuild the :class:`RecallPreset` a results file records under ``settings`` (fields the file
    predates take their :data:`EARLIER_PROTOCOL` values)."""
    fields = {f.name for f in dataclasses.fields(RecallPreset)}
    settings = {**EARLIER_PROTOCOL, **settings}
    return RecallPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in fields})


def run_recall(preset_name: str, device: str = "auto", progress: bool = True, command: str | None = None,
               checkpoint: str | Path | None = None, checkpoint_run: tuple[str, int, int] | None = None,
               on_run=None, shard: tuple[int, int] = (0, 1), overrides: dict | None = None,
               done: list[dict] | None = None, stop_after: float | None = None) -> dict:
    """The whole recall grid of a preset -> the results dict (see module docstring and chapter 10).

    ``checkpoint`` (a .safetensors path) saves the weights of the run ``checkpoint_run`` =
    (mixer, width, num_pairs) (first seed, first lr) with its model config in the file's metadata —
    the tiny model that chapter 10 looks inside. ``on_run(results)``, if given, is called after every
    run (to save partial results of a long grid). ``shard = (i, n)`` runs only the grid's entries
    i, i + n, i + 2n, ... (``python -m glalearn.experiments recall --jobs n`` runs the n shards as
    processes side by side and merges them with :func:`merge_recall`); each run records its
    ``grid_index``. A run's numbers do not depend on the shard it runs in.

    ``overrides`` changes preset fields (``--set``). ``done`` holds runs of an earlier, unfinished call
    of the same grid (``--resume``): they are kept and not run again. ``stop_after`` (seconds): no run
    but the first starts later than that; the results then carry ``"partial": True`` and the runs left undone.
    """
    preset = recall_preset(preset_name, overrides)
    dev = resolve_device(device)
    results = {"schema_version": SCHEMA_VERSION, "experiment": "recall", "preset": preset_name,
               "command": command, "machine": machine_info(dev), "settings": preset.to_dict(),
               "overrides": dict(overrides or {}), "runs": []}
    started, cpu_started = time.perf_counter(), time.process_time()
    grid = recall_grid(preset)
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    mine = [(g, entry) for g, entry in enumerate(grid) if g % count == index]
    earlier = {r["grid_index"]: r for r in (done or []) if r["grid_index"] % count == index}
    results["runs"] = [earlier[g] for g, _ in mine if g in earlier]
    left = [(g, entry) for g, entry in mine if g not in earlier]
    for i, (grid_index, (num_pairs, width, seed, lr, mixer)) in enumerate(left, 1):
        if stop_after is not None and i > 1 and time.perf_counter() - started > stop_after:
            break  # the first run always starts, so every call makes progress
        want_model = checkpoint is not None and checkpoint_run == (mixer, width, num_pairs) and \
            seed == preset.seeds[0] and lr == preset.lrs[0]
        out = train_recall(mixer, width, num_pairs, seed, lr, preset, dev, return_model=want_model)
        record, model = out if want_model else (out, None)
        record["grid_index"] = grid_index
        results["runs"].append(record)
        results["runs"].sort(key=lambda r: r["grid_index"])
        if model is not None:
            save_recall_checkpoint(model, checkpoint, record)
        if on_run is not None:
            on_run(results)
        if progress:
            print(f"[{i}/{len(left)}] {mixer:>7} width {width:>3} pairs {num_pairs:>2} seed {seed} lr {lr:g}: "
                  f"accuracy {record['final_accuracy']:.3f} ({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    if len(results["runs"]) < len(mine):
        results["partial"] = True
    results["summary"] = summarize_recall(results["runs"])
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["cpu_s"] = round(time.process_time() - cpu_started, 1)
    return results


def merge_recall(parts: list[dict], command: str | None = None, wall_s: float | None = None,
                 allow_partial: bool = False) -> dict:
    """One results dict from the shards of one recall grid (``run_recall(..., shard=(i, n))``).

    The runs are put back in grid order; the summary is recomputed; cpu_s is the shards' sum and
    wall_s the given wall time (the shards ran side by side). Raises ValueError when the shards are
    of different grids or a grid entry is repeated, or missing (unless ``allow_partial``: the result
    then says ``"partial": True``).
    """
    if not parts:
        raise ValueError("parts must hold at least one shard's results, got none")
    settings = [json.dumps(p["settings"], sort_keys=True) for p in parts]
    if len(set(settings)) != 1 or len({p["preset"] for p in parts}) != 1:
        raise ValueError(f"parts must come from one grid (preset and settings), got presets "
                         f"{sorted({p['preset'] for p in parts})} with {len(set(settings))} different settings")
    size = len(recall_grid(preset_from_settings(parts[0]["settings"])))
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["grid_index"])
    indices = [r["grid_index"] for r in runs]
    complete = indices == list(range(size))
    if len(indices) != len(set(indices)) or not (complete or allow_partial):
        missing = sorted(set(range(size)) - set(indices))
        raise ValueError(f"parts must cover the grid's {size} runs once each; missing {missing[:10]}, "
                         f"{len(indices) - len(set(indices))} repeated")
    merged = {k: v for k, v in parts[0].items() if k not in ("runs", "summary", "partial")}
    merged["command"] = command if command is not None else parts[0]["command"]
    merged["runs"] = runs
    merged["summary"] = summarize_recall(runs)
    merged["jobs"] = len(parts)
    # a shard's file written after each of its runs has no totals yet: its runs' CPU time stands in
    merged["cpu_s"] = round(sum(p["cpu_s"] if "cpu_s" in p else sum(r["cpu_s"] for r in p["runs"])
                                for p in parts), 1)
    merged["wall_s"] = round(wall_s if wall_s is not None else
                             max(p["wall_s"] if "wall_s" in p else sum(r["wall_s"] for r in p["runs"]) for p in parts), 1)
    if not complete:
        merged["partial"] = True
    return merged


def _recall_in_processes(args, command: str, out: str) -> dict:
    """Run the recall grid as ``args.jobs`` shard processes side by side (one GPU is far from busy with
    one of these tiny models) and merge their files.

    Each shard writes its runs to ``OUT.parts/shard_I.json`` after every run, and every 10 s this
    process merges what is there into OUT (marked ``"partial": true``), so a call that is cut off
    keeps every finished run: ``--resume OUT`` carries on from it.
    """
    import subprocess

    started = time.perf_counter()
    parts_dir = Path(str(out) + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    paths = [parts_dir / f"shard_{i}.json" for i in range(args.jobs)]
    for path in paths:
        path.unlink(missing_ok=True)
    procs = []
    for i, path in enumerate(paths):
        cmd = [sys.executable, "-m", "glalearn.experiments", "recall", "--preset", args.preset,
               "--device", args.device, "--threads", str(args.threads), "--shard", f"{i}/{args.jobs}",
               "--out", str(path), "--checkpoint-run", args.checkpoint_run]
        for item in args.set or []:
            cmd += ["--set", item]
        for flag, value in (("--checkpoint", args.checkpoint), ("--resume", args.resume),
                            ("--stop-after", args.stop_after)):
            if value is not None:
                cmd += [flag, str(value)]
        if args.quiet:
            cmd.append("--quiet")
        procs.append(subprocess.Popen(cmd))

    def merged_so_far(allow_partial: bool) -> dict | None:
        parts = []
        for path in paths:
            try:
                parts.append(json.loads(path.read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        parts = [p for p in parts if p.get("runs")]
        if not parts:
            return None
        return merge_recall(parts, command, time.perf_counter() - started, allow_partial=allow_partial)

    while any(p.poll() is None for p in procs):
        time.sleep(10)
        partial = merged_so_far(allow_partial=True)
        if partial is not None:
            _write_json({**partial, "partial": True}, out)
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"recall shard processes exited with codes {codes}; the runs that finished are "
                           f"in {out} (marked partial): add --resume {out} to carry on")
    results = merged_so_far(allow_partial=True)
    if results is None:
        raise RuntimeError(f"no recall run finished (the shards' files in {parts_dir} are empty)")
    for path in paths:
        path.unlink(missing_ok=True)
    parts_dir.rmdir()
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
# ----------------------------------------------------------------------------- the plateau's causes
# Chapter 10, section 3: why every linear mixer sat at chance under the earlier protocol (zero filler,
# a residual convolution on the block input, an output gate without bias), one change at a time, on one
# cell small enough for a CPU: width 64, T = 64, 8 pairs, a 512-token vocabulary, 600 steps.
CAUSE_PRESETS: dict[str, RecallPreset] = {
    "cpu": RecallPreset(widths=(64,), seq_len=64, num_pairs=(8,), vocab_size=512, steps=600, batch_size=64,
                        lrs=(3e-3,), seeds=(0,), eval_every=50, eval_size=256, num_heads=2, short_conv=4,
                        conv_on="qkv", filler="random", output_gate_bias=1.0),
    "micro": RecallPreset(widths=(16,), seq_len=16, num_pairs=(2,), vocab_size=16, steps=3, batch_size=4,
                          lrs=(1e-2,), seeds=(0,), warmup_steps=1, eval_every=2, eval_size=8, short_conv=2,
                          conv_on="qkv"),
}
_BEFORE = {"filler": "zero", "conv_on": "input", "output_gate_bias": None}
_AFTER = {"filler": "random", "conv_on": "qkv", "output_gate_bias": 1.0}
# (name, the three settings, mixers): the protocol before, each fix alone, all three, each fix left out.
CAUSE_VARIANTS: tuple[tuple[str, dict, tuple[str, ...]], ...] = (
    ("before", _BEFORE, ("gla", "none", "softmax")),
    ("random filler only", {**_BEFORE, "filler": "random"}, ("gla",)),
    ("q/k/v convolutions only", {**_BEFORE, "conv_on": "qkv"}, ("gla",)),
    ("b_r = 1 only", {**_BEFORE, "output_gate_bias": 1.0}, ("gla",)),
    ("all three", _AFTER, ("gla", "none", "softmax")),
    ("all but the random filler", {**_AFTER, "filler": "zero"}, ("gla",)),
    ("all but the q/k/v convolutions", {**_AFTER, "conv_on": "input"}, ("gla",)),
    ("all but b_r", {**_AFTER, "output_gate_bias": None}, ("gla",)),
)


def _cause_task(task: tuple) -> dict:
    name, overrides, mixer, preset_name, device, threads = task
    torch.set_num_threads(threads)
    preset = dataclasses.replace(CAUSE_PRESETS[preset_name], **overrides)
    record = train_recall(mixer, preset.widths[0], preset.num_pairs[0], preset.seeds[0], preset.lrs[0], preset,
                          resolve_device(device))
    return {"variant": name, "overrides": overrides, **record}


def run_cause(preset_name: str, device: str = "cpu", progress: bool = True, command: str | None = None,
              jobs: int = 1, threads: int = 1) -> dict:
    """Train every (variant, mixer) of :data:`CAUSE_VARIANTS` on the one cell of ``CAUSE_PRESETS[preset_name]``
    (``jobs`` processes side by side) and return the results dict (experiment "cause")."""
    if preset_name not in CAUSE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(CAUSE_PRESETS)}, got {preset_name!r}")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    preset = CAUSE_PRESETS[preset_name]
    dev = resolve_device(device)
    tasks = [(name, overrides, mixer, preset_name, str(dev), threads)
             for name, overrides, mixers in CAUSE_VARIANTS for mixer in mixers]
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = []
    if jobs == 1:
        results_iter = map(_cause_task, tasks)
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(jobs)
        results_iter = pool.imap(_cause_task, tasks)
    try:
        for i, record in enumerate(results_iter, 1):
            runs.append(record)
            if progress:
                print(f"[{i}/{len(tasks)}] {record['variant']:<32} {record['mixer']:>7}: accuracy "
                      f"{record['final_accuracy']:.3f} ({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if jobs > 1:
            pool.close()
            pool.join()
    cpu_s = time.process_time() - cpu_started  # this process; the pool's workers count their runs' own
    if jobs > 1:
        cpu_s += sum(r["cpu_s"] for r in runs)
    return {"schema_version": SCHEMA_VERSION, "experiment": "cause", "preset": preset_name, "command": command,
            "machine": machine_info(dev), "settings": preset.to_dict(),
            "variants": [{"name": n, "overrides": o, "mixers": list(m)} for n, o, m in CAUSE_VARIANTS],
            "runs": runs, "jobs": jobs, "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_s, 1)}


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


def _check_recall_run(run: dict, where: str) -> None:
    """One MQAR run's record (of the recall or the cause experiment): fields, mixer, curve, final figures."""
    _require(run, _RECALL_RUN, where)
    if run["mixer"] not in MIXERS and run["mixer"] != "fla-gla":
        raise ValueError(f"{where}['mixer'] must be one of {tuple(MIXERS) + ('fla-gla',)}, got {run['mixer']!r}")
    steps = [p["step"] for p in run["curve"]]
    if not steps or steps != sorted(set(steps)):
        raise ValueError(f"{where}['curve'] must be non-empty with increasing steps, got {steps}")
    for p in run["curve"]:
        _require(p, {"step": int, "train_loss": (int, float), "accuracy": (int, float), "loss": (int, float)},
                 f"{where}['curve']")
        if not 0.0 <= p["accuracy"] <= 1.0:
            raise ValueError(f"{where}: accuracy {p['accuracy']} outside [0, 1]")
    if run["final_accuracy"] != run["curve"][-1]["accuracy"]:
        raise ValueError(f"{where}['final_accuracy'] is not the curve's last accuracy")


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
            _check_recall_run(run, f"results['runs'][{i}]")
        if data.get("summary") != summarize_recall(data["runs"]):
            raise ValueError("results['summary'] does not match summarize_recall(results['runs'])")
    elif data["experiment"] == "cause":
        names = [v["name"] for v in data.get("variants", [])]
        if not names:
            raise ValueError("results['variants'] must list the variants of the cause experiment")
        for i, run in enumerate(data["runs"]):
            where = f"results['runs'][{i}]"
            _require(run, {"variant": str, "overrides": dict}, where)
            if run["variant"] not in names:
                raise ValueError(f"{where}['variant'] must be one of {names}, got {run['variant']!r}")
            _check_recall_run(run, where)
    elif data["experiment"] == "ablation":
        for i, run in enumerate(data["runs"]):
            where = f"results['runs'][{i}]"
            _require(run, _ABLATION_RUN, where)
            if not run["evals"] or run["final_val_loss"] != run["evals"][-1]["val_loss"]:
                raise ValueError(f"{where}['final_val_loss'] is not the last evaluation's val_loss")
            if abs(run["final_val_ppl"] - math.exp(run["final_val_loss"])) > 1e-3 * run["final_val_ppl"]:
                raise ValueError(f"{where}['final_val_ppl'] is not exp(final_val_loss)")
    else:
        raise ValueError(f"results['experiment'] must be 'recall', 'cause' or 'ablation', got {data['experiment']!r}")


def _resumable_runs(path: str, preset: RecallPreset) -> list[dict]:
    """The runs of an earlier results file of the same grid (``--resume``); ValueError if it is another grid."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no such results file: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--resume: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("experiment") != "recall" or not isinstance(data.get("runs"), list):
        raise ValueError(f"--resume: {path} is not a recall results file")
    if data.get("settings") != json.loads(json.dumps(preset.to_dict())):
        theirs = data.get("settings") or {}
        differ = sorted(k for k, v in preset.to_dict().items() if json.loads(json.dumps(v)) != theirs.get(k))
        raise ValueError(f"--resume: {path} holds another grid (settings differ in {differ}); "
                         f"use the same --preset and --set")
    return data["runs"]


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
    parser = OneLineParser(prog="python -m glalearn.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    recall = sub.add_parser("recall", help="MQAR accuracy of five token mixers over widths and pairs")
    recall.add_argument("--preset", default="cpu", choices=sorted(RECALL_PRESETS))
    recall.add_argument("--out", help="results JSON (default: recall_PRESET.json in the current folder)")
    recall.add_argument("--checkpoint", help="save one run's weights here (.safetensors)")
    recall.add_argument("--checkpoint-run", default="gla,64,4",
                        help="which run --checkpoint saves: MIXER,WIDTH,PAIRS (default gla,64,4)")
    recall.add_argument("--jobs", type=int, default=1,
                        help="run the grid as this many processes side by side on the device (default 1)")
    recall.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # I/N: one process of --jobs
    recall.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="change a preset field, e.g. --set steps=2000 --set lrs=1e-3,3e-3 (repeatable)")
    recall.add_argument("--resume", metavar="FILE",
                        help="keep the runs of this earlier (partial) results file of the same grid; run the rest")
    recall.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="start no further run after this many seconds (the first always starts); the file is then "
                             "marked partial (--resume it)")
    cause = sub.add_parser("cause", help="why linear mixers plateau at chance: the three causes, one at a time")
    cause.add_argument("--preset", default="cpu", choices=sorted(CAUSE_PRESETS))
    cause.add_argument("--out", help="results JSON (default: cause_PRESET.json in the current folder)")
    cause.add_argument("--jobs", type=int, default=1, help="processes side by side (default 1)")
    ablation = sub.add_parser("ablation", help="Table 4 in miniature: gates and heads on Tiny Shakespeare")
    ablation.add_argument("--preset", default="cpu", choices=sorted(ABLATION_PRESETS))
    ablation.add_argument("--out", help="results JSON (default: ablation_PRESET.json in the current folder)")
    for p in (recall, cause, ablation):
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
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
                raise ValueError
        except ValueError:
            parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        overrides = parse_overrides(args.set)
        preset = recall_preset(args.preset, overrides)
        for mixer in preset.mixers if shard[1] == 1 else ():  # (the parent checks for its shards)
            if mixer == "fla-gla" and not fla_available():
                parser.error("mixer fla-gla needs flash-linear-attention, which does not import here")
        done = _resumable_runs(args.resume, preset) if args.resume else None
        if args.jobs > 1:
            results = _recall_in_processes(args, command, out)
        else:
            results = run_recall(args.preset, args.device, not args.quiet, command, args.checkpoint, run,
                                 on_run=lambda partial: _write_json({**partial, "partial": True}, out),
                                 shard=shard, overrides=overrides, done=done, stop_after=args.stop_after)
            if shard[1] > 1:  # one shard of --jobs: the parent validates the merged file
                _write_json(results, out)
                return 0
        if results.get("partial"):
            _write_json(results, out)
            total = len(recall_grid(preset))
            print(f"recall ({args.preset}): {len(results['runs'])} of {total} runs in {results['wall_s']:.0f} s "
                  f"-> {out} (partial: add --resume {out} to run the rest)")
            return 0
    elif args.experiment == "cause":
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        results = run_cause(args.preset, args.device, not args.quiet, command, args.jobs, args.threads)
    else:
        results = run_ablation(args.preset, args.device, not args.quiet, command)
    validate_results(results)
    _write_json(results, out)
    print(f"{args.experiment} ({args.preset}): {len(results['runs'])} runs in {results['wall_s']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    from glalearn.clierror import guarded

    sys.exit(guarded("python -m glalearn.experiments", main))
