"""Training throughput of GLA vs Transformer++ (and fla's GLA) on a GPU (chapter 9; the paper's Fig. 6 in miniature).

    python -m glalearn.bench model [--lengths 2048 4096 8192] [--json FILE] [--profile-out FILE]
                                   [--unfused] [--no-fla]

Every model at d_model 1024, 8 layers, 4 heads, vocabulary 32,000, float32 weights under bf16 autocast,
fused AdamW. One timed step is forward + loss + backward + optimizer step on random tokens; tokens
per second = batch · T / median step time; the peak is torch.cuda.max_memory_allocated over the
model's steps (weights, gradients, AdamW's moments and activations). The batch holds ``--tokens``
tokens (default 32,768) split into sequences of length T.

* ``gla``: ours, flash backend (chapter 7's kernel) with the fused pieces of glalearn.fused (gate,
  norm + output gate, norms, SwiGLU, chunked loss); ``gla_unfused`` (with ``--unfused``): the same
  model with every PyTorch module instead, i.e. what the fusions buy.
* ``transformer``: our Transformer++ with ``scaled_dot_product_attention`` and the same blocks (so the
  same fused norms, SwiGLU and loss); ``transformer_unfused`` with ``--unfused``.
* ``fla_gla``: flash-linear-attention's ``GLAForCausalLM`` at the same shape (expand_k 0.5,
  expand_v 1, the same FFN width, its default fused norms, SwiGLU and cross-entropy), timed when
  ``fla`` imports (it is never a dependency). Its loss skips the last position of each sequence
  (fla shifts the labels itself), T - 1 of T targets.

``--json`` and ``--profile-out`` may contain ``{gpu}``, replaced by the card (``h100``, ``h200``, ...).
``--profile-out`` adds a torch.profiler breakdown of one step at ``--profile-length`` (4096) for every
model: GPU kernel time by op family (the GLA kernels, attention, matrix products, gate, norm + output
gate, norms, SwiGLU, loss, optimizer, embedding, elementwise and casts) against the step's time.
The files are rewritten after every length, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

from glalearn.clierror import OneLineParser, guarded
from glalearn.model import GLAConfig, TransformerConfig, build_model

SHAPE = {"d_model": 1024, "n_layers": 8, "num_heads": 4, "vocab_size": 32000}
OUR_MODELS = ("gla", "gla_unfused", "transformer", "transformer_unfused")
# Our fused kernels (glalearn.fused); every other kernel module of glalearn.kernels is the GLA core.
FUSED_KERNEL_MODULES = ("fused_gate", "fused_norm_gate", "fused_swiglu", "fused_cross_entropy")


# ----------------------------------------------------------------------------- the models
def build_ours(name: str, T: int) -> torch.nn.Module:
    """One of OUR_MODELS on the GPU, float32 weights, checks that would sync the host turned off."""
    torch.manual_seed(0)
    cfg = (GLAConfig(**SHAPE, context_length=T, backend="flash") if name.startswith("gla")
           else TransformerConfig(**SHAPE, context_length=T))
    model = build_model(cfg).cuda()
    model.set_fused(False if name.endswith("_unfused") else None)
    model.check_targets = False
    for block in model.blocks:
        if hasattr(block.mixer, "check_inputs"):
            block.mixer.check_inputs = False
    return model


def fla_config_kwargs(T: int) -> dict:
    """fla's GLAConfig for our shape (fla/models/gla/configuration_gla.py, 0.6.0)."""
    ffn = GLAConfig(**SHAPE).ffn_hidden
    return {"hidden_size": SHAPE["d_model"], "num_hidden_layers": SHAPE["n_layers"], "num_heads": SHAPE["num_heads"],
            "expand_k": 0.5, "expand_v": 1.0, "vocab_size": SHAPE["vocab_size"], "intermediate_size": ffn,
            "norm_eps": 1e-5, "max_position_embeddings": T, "use_cache": False, "attn_mode": "chunk"}


def build_fla(T: int) -> torch.nn.Module:
    from fla.models import GLAConfig as FlaGLAConfig
    from fla.models import GLAForCausalLM as FlaGLAForCausalLM

    torch.manual_seed(0)
    return FlaGLAForCausalLM(FlaGLAConfig(**fla_config_kwargs(T))).cuda()


def fla_version() -> tuple[str | None, str | None]:
    """(fla's version, None) when fla imports with its models, else (None, why not)."""
    try:
        import fla
        from fla.models import GLAForCausalLM  # noqa: F401
    except Exception as err:  # noqa: BLE001 -- not installed, or its models fail to import (transformers, triton)
        return None, f"{type(err).__name__}: {err}"
    return getattr(fla, "__version__", "unknown"), None


def loss_function(name: str, model):
    """ids [batch, T + 1] -> mean loss, for our models (CausalLM.loss) and fla's (labels shifted by fla)."""
    if name == "fla_gla":
        return lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
    return lambda ids: model.loss(ids[:, :-1], ids[:, 1:])


def training_step(model, loss_fn, batch: int, T: int, vocab: int):
    """A closure running one forward + backward + fused AdamW step under bf16 autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, T + 1), device="cuda")

    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def step_seconds(one, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one() (CUDA events around each call)."""
    for _ in range(warmup):
        one()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- the profile
def gla_core_kernel_names() -> set[str]:
    """Names of the GLA kernels of glalearn.kernels (every module but the fused pieces')."""
    import importlib
    import pkgutil

    import glalearn.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in FUSED_KERNEL_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"glalearn.kernels.{info.name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "fn"):  # a triton.jit function
                names.add(attr)
    return names


# (family, pattern) in the order tried; the first pattern found in a kernel's name decides. Our and
# fla's Triton kernels carry their function names; PyTorch's carry the functor's.
FAMILY_PATTERNS = [
    ("GLA kernels", r"^(chunk_|segment_|fused_forward_kernel|fused_recurrent|fused_chunk)"),
    ("attention", r"flash|fmha|sdpa|attention"),
    ("loss", r"cross_entropy|softmax|nll_loss"),
    ("gate", r"^gate_(forward|backward)_kernel|log_sigmoid|logsigmoid"),
    ("norm + output gate", r"norm_gate_|layer_norm_gated"),
    ("norms", r"rms_norm|rmsnorm|layer_norm|rowwisemoments"),
    ("SwiGLU / swish", r"swiglu|silu"),
    ("optimizer", r"adam|multi_tensor"),
    ("embedding", r"embedding|index_?select|radix|partial_segment|compute_grad_weight|sum_and_scatter"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitk|gemv|sm90_|sm80_"),
    ("elementwise / casts", r"elementwise|copy|cast|fill|reduce|cat|memcpy|memset|arange|where|index|scatter"),
]
FAMILIES = [name for name, _ in FAMILY_PATTERNS] + ["other"]


def kernel_family(name: str, core_names: frozenset[str] | set[str] = frozenset()) -> str:
    """The op family a GPU kernel's name belongs to (FAMILY_PATTERNS; "other" if none matches)."""
    if name in core_names:
        return "GLA kernels"
    low = name.lower()
    for family, pattern in FAMILY_PATTERNS:
        if re.search(pattern, low):
            return family
    return "other"


def summarize_trace(events: list[dict], steps: int, core_names=frozenset(), top: int = 25) -> dict:
    """Per-step GPU time by family from a Chrome trace's events (torch.profiler's export): kernel time
    (sum of kernel durations), busy time (their union: kernels of streams may overlap), the span from
    the first kernel's start to the last one's end, and the idle part of that span."""
    kernels = [e for e in events if str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")
               and "dur" in e and "ts" in e]
    if not kernels:
        raise ValueError("the trace holds no GPU kernels (was the CUDA activity profiled?)")
    intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
    busy, (cur_start, cur_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = intervals[-1][1] - intervals[0][0]
    families = {f: {"ms": 0.0, "kernels": 0} for f in FAMILIES}
    by_name: dict[str, list] = {}
    for e in kernels:
        fam = kernel_family(e["name"], core_names)
        families[fam]["ms"] += float(e["dur"]) / 1e3 / steps
        families[fam]["kernels"] += 1
        entry = by_name.setdefault(e["name"], [0.0, 0, fam])
        entry[0] += float(e["dur"]) / 1e3 / steps
        entry[1] += 1
    kernel_ms = sum(f["ms"] for f in families.values())
    for f in families.values():
        f["kernels"] = f["kernels"] / steps
        f["share"] = f["ms"] / kernel_ms if kernel_ms else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "kernel_ms": kernel_ms, "busy_ms": busy / 1e3 / steps, "span_ms": span / 1e3 / steps,
            "idle_ms": (span - busy) / 1e3 / steps, "kernels_per_step": len(kernels) / steps,
            "families": families,
            "top_kernels": [{"name": n[:160], "family": v[2], "ms": v[0], "calls": v[1] / steps} for n, v in ranked]}


def profile_step(one, steps: int = 2, core_names=frozenset()) -> dict:
    """torch.profiler over ``steps`` calls of one() (after the timing's warm-up), summarized per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            one()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return summarize_trace(events, steps, core_names)


# ----------------------------------------------------------------------------- the run
def gpu_tag(device_name: str) -> str:
    """A short name for the card: 'h100' for 'NVIDIA H100 80GB HBM3', else the name's letters and digits."""
    low = device_name.lower()
    found = re.search(r"\b([abhlv]\d{2,3}[a-z]?)\b", low)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", low).strip("_") or "gpu"


def bench_model(lengths=(2048, 4096, 8192), tokens: int = 32768, repeats: int = 10, models=("gla", "transformer"),
                profile_length: int | None = None, on_row=None, log=print) -> tuple[list[dict], dict]:
    """Rows {T, batch, <model>_step_s, <model>_tokens_per_s, <model>_peak_gib, ratios} and the profiles
    {model: summary} at ``profile_length`` (chapter 9). ``on_row(rows, profiles)`` after every length."""
    if not torch.cuda.is_available():
        raise ValueError("python -m glalearn.bench model needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = True
    core = gla_core_kernel_names() if profile_length else set()
    rows, profiles = [], {}
    vocab = SHAPE["vocab_size"]
    for T in lengths:
        batch = max(1, tokens // T)
        row = {"T": T, "batch": batch}
        for name in models:
            model = build_fla(T) if name == "fla_gla" else build_ours(name, T)
            row[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
            torch.cuda.reset_peak_memory_stats()
            one = training_step(model, loss_function(name, model), batch, T, vocab)
            seconds = step_seconds(one, repeats=repeats)
            row[f"{name}_step_s"] = seconds
            row[f"{name}_tokens_per_s"] = batch * T / seconds
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if T == profile_length:
                profiles[name] = {**profile_step(one, core_names=core), "timed_step_ms": 1e3 * seconds}
            log(f"T={T:>5} batch={batch:>3}  {name:<20} {row[f'{name}_tokens_per_s']:>10,.0f} tok/s  "
                f"peak {row[f'{name}_peak_gib']:5.1f} GiB")
            del model, one  # the optimizer lives in the closure
            gc.collect()
            torch.cuda.empty_cache()
        for other in ("transformer", "fla_gla", "gla_unfused"):
            if "gla" in models and other in models:
                row[f"gla_over_{other}"] = row["gla_tokens_per_s"] / row[f"{other}_tokens_per_s"]
        if "gla" in models and "fla_gla" in models:
            row["gla_peak_over_fla_gla"] = row["gla_peak_gib"] / row["fla_gla_peak_gib"]
        rows.append(row)
        if on_row is not None:
            on_row(rows, profiles)
    return rows, profiles


def _check_lengths(lengths, tokens) -> None:
    for T in lengths:
        if T < 64 or T % 64:
            raise ValueError(f"--lengths must be multiples of 64 (the kernels' chunk), at least 64; got {T}")
    if tokens < max(lengths):
        raise ValueError(f"--tokens ({tokens}) must be at least the longest of --lengths ({max(lengths)})")


def _run(argv) -> int:
    parser = OneLineParser(prog="python -m glalearn.bench model", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--unfused", action="store_true", help="also time our models without glalearn.fused")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's GLAForCausalLM even when it imports")
    parser.add_argument("--json", help="write rows, command and machine to this file ({gpu}: the card)")
    parser.add_argument("--profile-out", help="write the per-family profile of one step to this file ({gpu}: the card)")
    parser.add_argument("--profile-length", type=int, default=4096, help="T of the profiled step (default 4096)")
    args = parser.parse_args(argv)
    _check_lengths(args.lengths, args.tokens)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be a whole number of at least 1, got {args.repeats}")
    if args.profile_out and args.profile_length not in args.lengths:
        raise ValueError(f"--profile-length ({args.profile_length}) must be one of --lengths {args.lengths}")
    if not torch.cuda.is_available():
        raise ValueError("needs a CUDA GPU (torch.cuda.is_available() is False); chapter 9 reads the committed "
                         "results instead")
    from glalearn.flash import CONFIG
    from glalearn.train import machine_info

    fla, fla_error = (None, "--no-fla") if args.no_fla else fla_version()
    models = ["gla", "transformer"] + (["fla_gla"] if fla else [])
    if args.unfused:
        models[1:1] = ["gla_unfused"]
        models.insert(models.index("transformer") + 1, "transformer_unfused")
    machine = machine_info(torch.device("cuda"))
    import triton

    machine["triton"] = triton.__version__
    tag = gpu_tag(machine.get("gpu", "gpu"))
    header = {"command": "python -m glalearn.bench model " + " ".join(argv), "machine": machine,
              "date": time.strftime("%Y-%m-%d"), "fla": fla, "fla_not_timed_because": fla_error, "models": models,
              "flash_config": dict(CONFIG),
              "shape": {**SHAPE, "ffn_hidden": GLAConfig(**SHAPE).ffn_hidden, "tokens_per_step": args.tokens,
                        "dtype": "float32 weights, bfloat16 autocast, fused AdamW"}}
    print(f"{machine.get('gpu')}: models {models}" + ("" if fla else f" (fla not timed: {fla_error})"), flush=True)

    def write(rows, profiles):
        if args.json:
            with open(args.json.replace("{gpu}", tag), "w") as f:
                json.dump({**header, "rows": rows}, f, indent=1)
        if args.profile_out and profiles:
            with open(args.profile_out.replace("{gpu}", tag), "w") as f:
                json.dump({**header, "T": args.profile_length, "batch": max(1, args.tokens // args.profile_length),
                           "families": FAMILIES, "profiles": profiles}, f, indent=1)

    rows, profiles = bench_model(args.lengths, args.tokens, args.repeats, models,
                                 args.profile_length if args.profile_out else None, on_row=write,
                                 log=lambda line: print(line, flush=True))
    for r in rows:
        ratios = "  ".join(f"{k} {v:.2f}" for k, v in r.items() if k.startswith("gla_over") or k.endswith("over_fla_gla"))
        print(f"T={r['T']:>5}  {ratios}", flush=True)
    for name, p in profiles.items():
        fams = ", ".join(f"{f} {v['ms']:.1f}" for f, v in p["families"].items() if v["ms"] >= 0.05)
        print(f"profile {name}: step {p['timed_step_ms']:.1f} ms, kernels {p['kernel_ms']:.1f} ms, idle "
              f"{p['idle_ms']:.1f} ms | {fams}", flush=True)
    return 0


def main(argv=None) -> int:
    return guarded("python -m glalearn.bench model", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
