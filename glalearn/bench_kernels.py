"""GPU benchmark of the GLA kernels (chapter 7): `python -m glalearn.bench kernels --out FILE.json`.

Times, with `triton.testing.do_bench` medians on bf16 inputs, forward and forward+backward of
  - flash_gla, materialized and non-materialized (this book's kernels),
  - scaled_dot_product_attention(is_causal=True) with the FlashAttention backend (FlashAttention-2),
  - fla's chunk_gla, when `fla` (flash-linear-attention) is importable (never a dependency);
for two configurations, as in the paper's Fig. 2:
  P1: H = 16, K = V = 64, 65,536 tokens per batch (B = 65536 / T);
  P2: H = 16, K = V = 128, 16,384 tokens per batch (B = 16384 / T);
T in {512, 1024, 2048, 4096, 8192, 16384}. Also: the backward alone, peak memory of each call, the
device-to-device copy bandwidth, the bytes and FLOPs of every launch of flash_gla (``kernel_costs``) with
the memory-traffic floors of forward and backward at that bandwidth, the per-kernel profile of one
forward+backward at the longest T, and each kernel's registers/spills/shared memory.
Writes a JSON file (with the command, GPU, versions and date) and a PNG plot beside it.

``--layout-check`` instead allocates the inputs of several shapes before the first launch (the layout of
a script that once faulted) and runs forward and backward of each, checking that every result is finite
and repeatable: run it under ``compute-sanitizer --tool memcheck`` (kernels/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from glalearn.clierror import OneLineParser, UserError, guarded

PROFILES = {
    "P1": {"H": 16, "K": 64, "V": 64, "tokens": 65536},
    "P2": {"H": 16, "K": 128, "V": 128, "tokens": 16384},
}
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]


TIMING = {"rep_ms": 50}  # do_bench's repetition time per measurement (--rep-ms)


def _median_ms(fn, warmup=10, rep=None) -> float:
    import triton.testing

    rep = TIMING["rep_ms"] if rep is None else rep
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gla_inputs(B, T, H, K, V, seed=0, dtype=torch.bfloat16, device="cuda"):
    """Random bf16 inputs (paper's gate: g = logsigmoid(randn) / 16) on the GPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, generator=gen)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device, generator=gen)) / 16).to(dtype)
    return q, k, v, g


def methods(include_fla: bool = True) -> dict:
    """name -> function(q, k, v, g) -> o, for every method available here."""
    from glalearn.flash import flash_gla

    out = {
        "flash_gla (materialized)": lambda q, k, v, g: flash_gla(q, k, v, g, materialize=True)[0],
        "flash_gla (non-materialized)": lambda q, k, v, g: flash_gla(q, k, v, g, materialize=False)[0],
    }

    def sdpa(q, k, v, g):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    out["FlashAttention-2 (SDPA)"] = sdpa
    if include_fla:
        try:
            from fla.ops.gla import chunk_gla as fla_chunk_gla

            out["fla chunk_gla"] = lambda q, k, v, g: fla_chunk_gla(q, k, v, g)[0]
        except (ImportError, RuntimeError, AttributeError) as exc:  # fla is optional: report, go on
            print(f"fla not importable ({type(exc).__name__}: {exc}); timing without it", file=sys.stderr)
    return out


def _args_for(name, B, T, H, K, V, seed):
    q, k, v, g = gla_inputs(B, T, H, K, V, seed)
    if name.startswith("FlashAttention"):  # SDPA wants [B, H, T, D]; no gate
        return [x.transpose(1, 2).contiguous() for x in (q, k, v)] + [None]
    return [q, k, v, g]


def time_method(name, fn, B, T, H, K, V, seed=0, time_backward=True) -> dict:
    args = _args_for(name, B, T, H, K, V, seed)
    def fwd():
        return fn(*args)

    grads = [x.detach().requires_grad_() if x is not None else None for x in args]
    o = fn(*grads)
    do = torch.randn_like(o)

    def fwd_bwd():
        for x in grads:
            if x is not None:
                x.grad = None
        fn(*grads).backward(do)

    with torch.no_grad():
        ms_f = _median_ms(fwd)
        mem_f = _peak_mb(fwd)
    ms_fb = _median_ms(fwd_bwd)
    mem_fb = _peak_mb(fwd_bwd)
    out = {"forward_ms": ms_f, "forward_backward_ms": ms_fb, "forward_peak_mb": mem_f, "forward_backward_peak_mb": mem_fb}
    if time_backward:
        leaves = [x for x in grads if x is not None]
        o = fn(*grads)  # the backward alone: one graph, its gradients taken again and again
        try:
            out["backward_ms"] = _median_ms(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True))
        except RuntimeError as exc:  # a method whose graph cannot be run twice: fwd+bwd - fwd instead
            print(f"{name}: backward alone not timed ({exc}); using forward+backward - forward", file=sys.stderr)
            out["backward_ms"], out["backward_derived"] = ms_fb - ms_f, True
    return out


def kernel_breakdown(name, fn, B, T, H, K, V, passes=3) -> dict:
    """GPU kernels one forward+backward launches (torch.profiler): name -> [launches, ms] per call."""
    from torch.profiler import ProfilerActivity, profile

    args = _args_for(name, B, T, H, K, V, 0)
    grads = [x.detach().requires_grad_() if x is not None else None for x in args]
    do = torch.randn_like(fn(*grads))

    def fwd_bwd():
        for x in grads:  # as in time_method: no gradient accumulation (no extra add kernels)
            if x is not None:
                x.grad = None
        fn(*grads).backward(do)

    for _ in range(2):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            fwd_bwd()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        self_us = getattr(ev, "self_device_time_total", None)
        if self_us is None:
            self_us = getattr(ev, "self_cuda_time_total", 0)
        if self_us > 0 and ev.count:
            out[ev.key[:80]] = [ev.count / passes, self_us / passes / 1e3]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def forward_floor_ms(B, T, H, K, V, bandwidth_gbs, elem_bytes=2) -> float:
    """Bytes the forward must move (read q, k, v, g; write o) over the copy bandwidth, in ms."""
    nbytes = elem_bytes * B * T * H * (3 * K + 2 * V)
    return nbytes / (bandwidth_gbs * 1e9) * 1e3


def kernel_costs(B, T, H, K, V, C=64, e=2, g_bytes=None, config=None, initial_state=False,
                 final_state_grad=False) -> dict:
    """Bytes each launch of flash_gla must move and the FLOPs it computes, under ``config`` (default
    ``flash.CONFIG``), for inputs of e bytes per number (g_bytes for g; default e), one call.

    Bytes are DRAM traffic with each tensor a launch touches counted once: programs that need the same
    tile (the V blocks of one chunk, the chunks of one segment reading its carried state) run side by
    side and share it through L2.
    FLOPs count every product at the tiles' full size (2 per multiply-add), the gate scans as products
    with a triangle of ones (1 piece for bf16 gates, 3 otherwise), and leave out elementwise work.

    Returns {"forward": {launch: {"bytes", "flops"}}, "backward": {...}, "forward_bytes",
    "backward_bytes", "forward_flops", "backward_flops", "forward_floor_bytes", "backward_floor_bytes",
    "design": {"forward": "segmented" | "sequential", "backward": ...}}. The floors: what any
    implementation must move — forward: read q, k, v, g, write o; backward: read q, k, v, g, dO,
    write dq, dk, dv, dg (and S_0, its gradient and the final state's gradient where they exist).
    """
    from glalearn import flash

    cfg = dict(flash.CONFIG if config is None else config)
    eg = e if g_bytes is None else g_bytes
    b = flash.launch_blocks(K, V, cfg, segmented_backward=bool(cfg["bwd_segmented"]))
    N = -(-T // C)
    tok = B * T * H  # (token, head) pairs
    states = B * H * N * K * V  # numbers in N chunk states
    small = B * H * N * K  # one K-vector per chunk (λ_[n], λ′_[n])
    pieces = 1 if eg == 2 else 3  # bf16 pieces of the gate scan products
    eh = 2 if (e == 2 and cfg["bf16_states"]) else 4  # bytes per number of the segment-local states
    kv_state = 4 * B * H * K * V  # one float32 state per head (S_0, S_T, their gradients)
    sbk, sbv = b["segment_bk"], b["segment_bv"]
    nvb_s = -(-V // sbv)
    SEG = flash.segment_length(B, H, K, V, N, sbk, sbv, cfg)
    NSEG = -(-N // SEG)
    seg_states = 4 * B * H * NSEG * K * V  # float32 states, one per segment
    nvb = -(-V // b["BV"])
    chunks = B * H * N

    def cost(nbytes, flops):
        return {"bytes": int(nbytes), "flops": int(flops)}

    def segment_pass():
        return {
            "segment_state_kernel": cost(
                tok * ((e + eg) * K + e * V) + eh * states + 4 * small + seg_states + 4 * B * H * NSEG * K,
                chunks * (2 * C * K * V + nvb_s * 2 * C * C * K * pieces)),
            "segment_combine_kernel": cost(2 * seg_states + 4 * B * H * NSEG * K + (kv_state if initial_state else 0),
                                           0),
        }

    fwd, bwd = {}, {}
    segmented_forward = bool(cfg["segment_programs"])
    if segmented_forward:
        fwd.update(segment_pass())
        fwd["chunk_output_kernel"] = cost(  # both launches (the flagged one reads the flags: 4 B a chunk)
            tok * ((2 * e + eg) * K + 2 * e * V) + eh * states + 4 * small + seg_states + 8 * chunks,
            chunks * (nvb * (2 * C * C * K * (1 + pieces)) + 2 * C * K * V + 2 * C * C * V))
    else:
        fwd["chunk_cumsum_kernel"] = cost(tok * K * (eg + 4), 0)
        fwd["chunk_state_kernel"] = cost(tok * ((e + 4) * K + e * V) + 4 * B * H * (N + 1) * K * V
                                         + (kv_state if initial_state else 0), chunks * 2 * C * K * V)
        fwd["chunk_output_kernel"] = cost(tok * ((2 * e + 4) * K + 2 * e * V) + 4 * states,
                                          chunks * (nvb * 2 * C * C * K + 2 * C * K * V + 2 * C * C * V))
    if cfg["bwd_segmented"]:
        bwd.update(segment_pass())
        bwd["segment_dstate_kernel"] = cost(
            tok * ((e + eg) * K + e * V) + eh * states + 4 * small + seg_states,
            chunks * (2 * C * K * V + nvb_s * 2 * C * C * K * pieces))
        bwd["segment_combine_kernel (reverse)"] = cost(
            2 * seg_states + 4 * B * H * NSEG * K + (kv_state if final_state_grad else 0)
            + (kv_state if initial_state else 0), 0)
        NK = -(-K // b["DBK"])
        fuse = b["fuse_dv"]
        dg_scan = 2 * 2 * C * C * K * 3 if cfg["bwd_dg_scan"] != "cumsum" else 0
        flops = chunks * (NK * 2 * C * C * V + 4 * C * V * K + 4 * C * C * K + 2 * C * C * K * pieces + dg_scan)
        nbytes = (tok * ((2 * e + eg) * K + 2 * e * V) + 2 * eh * states + 8 * small + 2 * seg_states
                  + tok * (2 * e + eg) * K + 8 * chunks * NK)
        if fuse:
            flops += chunks * (2 * C * C * K + 2 * C * K * V + 2 * C * C * V)
            nbytes += tok * e * V
        bwd["chunk_bwd_kernel"] = cost(nbytes, flops)  # both launches (fast and flagged)
        if not fuse:
            bwd["chunk_bwd_dv_kernel"] = cost(
                tok * ((2 * e + eg) * K + 2 * e * V) + eh * states + 4 * small + seg_states + 8 * chunks,
                chunks * (-(-V // b["DVBV"]) * 2 * C * C * K * (1 + pieces) + 2 * C * K * V + 2 * C * C * V))
    else:
        kb = -(-K // b["DBK"])
        bwd["chunk_cumsum_kernel"] = cost(tok * K * (eg + 4), 0)
        bwd["chunk_state_kernel"] = cost(tok * ((e + 4) * K + e * V) + 4 * B * H * (N + 1) * K * V
                                         + (kv_state if initial_state else 0), chunks * 2 * C * K * V)
        bwd["chunk_state_backward_kernel"] = cost(tok * ((e + 4) * K + e * V) + 4 * states
                                                  + (kv_state if final_state_grad else 0)
                                                  + (kv_state if initial_state else 0), chunks * 2 * C * K * V)
        bwd["chunk_dv_kernel"] = cost(tok * ((2 * e + 4) * K + 2 * e * V) + 4 * states,
                                      chunks * (nvb * 2 * C * C * K + 2 * C * K * V + 2 * C * C * V))
        bwd["chunk_dqkg_kernel"] = cost(tok * ((2 * e + 4) * K + 2 * e * V + (2 * e + eg) * K) + 8 * states,
                                        chunks * (kb * 2 * C * C * V + 4 * C * V * K + 4 * C * C * K))
    fwd_floor = tok * ((2 * e + eg) * K + 2 * e * V) + (kv_state if initial_state else 0)
    bwd_floor = (tok * ((2 * e + eg) * K + 2 * e * V) + tok * ((2 * e + eg) * K + e * V)
                 + (2 * kv_state if initial_state else 0) + (kv_state if final_state_grad else 0))
    return {"forward": fwd, "backward": bwd,
            "forward_bytes": sum(c["bytes"] for c in fwd.values()),
            "backward_bytes": sum(c["bytes"] for c in bwd.values()),
            "forward_flops": sum(c["flops"] for c in fwd.values()),
            "backward_flops": sum(c["flops"] for c in bwd.values()),
            "forward_floor_bytes": fwd_floor, "backward_floor_bytes": bwd_floor,
            "design": {"forward": "segmented" if segmented_forward else "sequential",
                       "backward": "segmented" if cfg["bwd_segmented"] else "sequential"},
            "segment_chunks": SEG, "segments_per_head": NSEG}


LAYOUT_SHAPES = {
    # (name, B, T, H, K, V, initial state, g = -30 on the first half): the three shapes of the script
    # that faulted, allocated together (kernels/NOTES.md), and the long strong-gate shapes of the GPU tests.
    "benchmark": [("P1 T=16384", 4, 16384, 16, 64, 64, False, False), ("P1 T=4096", 16, 4096, 16, 64, 64, False, False),
                  ("P2 T=16384", 1, 16384, 16, 128, 128, False, False)],
    "long": [("T=65536 K=V=60", 1, 65536, 2, 60, 60, True, True), ("T=65536 K=V=100", 1, 65536, 2, 100, 100, False, True)],
}


LAYOUT_VARIANTS = ({}, {"bwd_segmented": True}, {"segment_programs": 0, "bwd_segmented": False})
# the default paths, the segmented backward, and the v3 ones (sequential state passes in 32 x 32 blocks at
# 4 warps, forward and backward: the launches of the run that faulted)


def layout_check(shapes="benchmark", repeats=2, materialize=(True, False), device="cuda", variants=({},),
                 log=print) -> list[dict]:
    """Allocate the bf16 inputs (and output gradients) of every shape first, then run forward and backward
    of each (the final state in the loss too), ``repeats`` times per strategy and CONFIG variant,
    synchronizing after each. shapes: a key of LAYOUT_SHAPES, "all", or a list of such tuples. Returns
    one dict per (shape, variant, strategy): finite (every output and gradient) and repeatable (bitwise
    equal across the repeats). Under compute-sanitizer, run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that
    every tensor is its own allocation and a read past its end is reported."""
    from glalearn import flash, flash_gla

    if isinstance(shapes, str):
        shapes = [s for key in (LAYOUT_SHAPES if shapes == "all" else [shapes]) for s in LAYOUT_SHAPES[key]]

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    cases = []
    for i, (name, B, T, H, K, V, h0, strong) in enumerate(shapes):  # every allocation before any launch
        q, k, v, g = gla_inputs(B, T, H, K, V, seed=i, device=device)
        if strong:
            g[:, : T // 2] = -30.0
        leaves = [x.requires_grad_() for x in (q, k, v, g)]
        if h0:
            leaves.append(torch.randn(B, H, K, V, device=device).requires_grad_())
        do = torch.randn_like(v)
        ds = torch.randn(B, H, K, V, device=device)
        cases.append((name, leaves, do, ds))
    sync()
    results = []
    saved = dict(flash.CONFIG)
    try:
        for variant in variants:
            flash.CONFIG.update(variant)
            for name, leaves, do, ds in cases:
                for mat in materialize:
                    runs = []
                    for _ in range(repeats):
                        for x in leaves:
                            x.grad = None
                        o, s = flash_gla(*leaves[:4], initial_state=leaves[4] if len(leaves) > 4 else None,
                                         output_final_state=True, materialize=mat)
                        torch.autograd.backward([o, s], [do, ds])
                        sync()
                        runs.append([o.detach(), s.detach()] + [x.grad for x in leaves])
                    finite = all(bool(torch.isfinite(t).all()) for t in runs[0])
                    repeatable = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
                    results.append({"shape": name, "variant": variant, "materialize": mat, "finite": finite,
                                    "repeatable": repeatable})
                    log(f"layout check {name} {variant} materialize={mat}: finite {finite}, repeatable {repeatable}")
                    del runs
            flash.CONFIG.clear()
            flash.CONFIG.update(saved)
    finally:
        flash.CONFIG.clear()
        flash.CONFIG.update(saved)
    return results


SWEEP_CASES = (("P1", 16384), ("P1", 1024), ("P2", 16384), ("P2", 1024))


def sweep(variants, cases=SWEEP_CASES, log=print, device="cuda", timer=None, check_T=1000,
          bandwidth_gbs=None) -> list[dict]:
    """Launch choices tried in one process: for each variant (a dict merged into flash.CONFIG), the
    materialized forward and the backward alone (do_bench medians) at every (profile, T) of ``cases``,
    the kernels' registers and spills, and the gradients' relative RMSE against float64 on a small
    mixed-gate input (so a fast but wrong variant shows). A variant that fails is recorded with its
    error and the sweep goes on. CONFIG is restored afterwards. cases: (profile, T) pairs or (name, B, T,
    H, K, V) tuples; timer: fn -> ms (default do_bench medians); check_T: length of the gradient check;
    bandwidth_gbs: the copy bandwidth measured in the same process, to give each backward its floor in ms."""
    from glalearn import chunk_gla, flash, flash_gla
    from glalearn.numerics import random_gla_inputs, relative_rmse

    timer = timer or _median_ms
    saved = dict(flash.CONFIG)
    checks = []
    for K in (64, 128):  # the references, once: float64 chunk form on the bf16-rounded inputs
        x = random_gla_inputs(B=2, T=check_T, H=2, K=K, V=K, seed=K, initial_state=True, device=device)
        for n in "qkvg":
            x[n] = x[n].to(torch.bfloat16)
        x["g"][:, int(0.3 * check_T):int(0.42 * check_T)] = -30.0
        x["g"][:, int(0.6 * check_T):int(0.7 * check_T), :, :3] = -2.0
        x64 = {n: t.double().requires_grad_() for n, t in x.items()}
        o_ref, s_ref = chunk_gla(**x64, output_final_state=True)
        do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
        ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
        checks.append((x, do, ds, {n: t.grad for n, t in x64.items()}))
    out = []
    try:
        for variant in variants:
            flash.CONFIG.clear()
            flash.CONFIG.update(saved, **variant)
            flash.LAST_COMPILED.clear()
            rec = {"variant": variant}
            try:
                errs = {}
                for x, do, ds, ref in checks:
                    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
                    o, s = flash_gla(**leaves, output_final_state=True)
                    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
                    K = x["q"].shape[-1]
                    errs.update({f"K={K} d{n}": relative_rmse(t.grad, ref[n]) for n, t in leaves.items()})
                rec["grad_errors"] = errs
                for case in cases:
                    if len(case) == 2:
                        pname, T = case
                        p = PROFILES[pname]
                        label, B, H, K, V = f"{pname} T={T}", p["tokens"] // T, p["H"], p["K"], p["V"]
                    else:
                        label, B, T, H, K, V = case
                    args = [t.requires_grad_() for t in gla_inputs(B, T, H, K, V, device=device)]
                    with torch.no_grad():
                        fwd = timer(lambda args=args: flash_gla(*args)[0])
                    o = flash_gla(*args)[0]
                    do = torch.randn_like(o)
                    bwd = timer(lambda o=o, args=args, do=do: torch.autograd.grad(o, args, do, retain_graph=True))
                    c = kernel_costs(B, T, H, K, V)
                    rec[label] = {"forward_ms": fwd, "backward_ms": bwd, "backward_bytes": c["backward_bytes"],
                                  "backward_floor_bytes": c["backward_floor_bytes"]}
                    if bandwidth_gbs:
                        rec[label]["backward_floor_ms"] = c["backward_floor_bytes"] / (bandwidth_gbs * 1e9) * 1e3
                    del o, args
                rec["kernels"] = kernel_resources()
                log(f"{variant}: " + "  ".join(
                    f"{k} fwd {v['forward_ms']:.3f} bwd {v['backward_ms']:.3f}"
                    + (f" ({v['backward_ms'] / v['backward_floor_ms']:.2f}x floor)" if "backward_floor_ms" in v else "")
                    for k, v in rec.items() if isinstance(v, dict) and "backward_ms" in v)
                    + f"  worst grad error {max(errs.values()):.1e}")
            except Exception as exc:  # noqa: BLE001 - a broken variant is a result, not the end of the sweep
                rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"{variant}: FAILED {rec['error'][:300]}")
            out.append(rec)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    finally:
        flash.CONFIG.clear()
        flash.CONFIG.update(saved)
    return out


def offline_resources(shapes=(("P1", 4096), ("P2", 4096)), dtype=torch.bfloat16, gate_dtype=None, arch=90,
                      log=print) -> dict:
    """Registers and spills of every kernel flash_gla launches (materialized forward and both backwards),
    compiled for an sm_{arch} GPU on this machine, with no GPU: each launch is caught, compiled by
    Triton for that target and assembled by its ptxas with -v; nothing runs. Needs compiled (not
    interpreted) Triton. A reading, not the GPU's: the GPU machine's Triton (and ptxas) may allocate
    registers differently (kernels/NOTES.md compares the two).

    shapes: (profile, T) pairs; B = 1 (registers do not depend on B, nor on T beyond its divisibility by
    16 and the segment length, which these T keep above 1). Returns {"P1 T=4096": {launch: {...}}}."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glalearn import flash

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
    target = GPUTarget("cuda", arch, 32)

    def ptxas_report(ptx, maxnreg):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            for exe in ("ptxas", "ptxas-blackwell"):  # the one that reads this PTX version
                cmd = [os.path.join(bindir, exe), "-v", f"-arch=sm_{arch}a", path, "-o", os.path.join(tmp, "k.cubin")]
                if maxnreg:
                    cmd.insert(2, f"--maxrregcount={maxnreg}")
                res = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if res.returncode == 0:
                    regs = re.search(r"Used (\d+) registers", res.stderr)
                    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
                    return {"n_regs": int(regs.group(1)), "spill_store_bytes": int(spill.group(1)),
                            "spill_load_bytes": int(spill.group(2)), "ptxas": exe}
        return {"error": res.stderr[-500:]}

    class Catch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.compile(args, dict(kwargs))

        def compile(self, args, kwargs):
            options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
            if kwargs.get("maxnreg"):
                options["maxnreg"] = kwargs.pop("maxnreg")
            kwargs.pop("maxnreg", None)
            bound = dict(zip(self.fn.arg_names, args), **kwargs)
            sig, constexprs, attrs = {}, {}, {}
            for i, param in enumerate(self.fn.params):
                value = bound.get(param.name, param.default)
                if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
                    sig[param.name], constexprs[param.name] = "constexpr", value  # Triton specializes 1 too
                elif isinstance(value, torch.Tensor):
                    sig[param.name] = "*" + names[value.dtype]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(value, float):
                    sig[param.name] = "fp32"
                else:
                    sig[param.name] = "i32"
                    if value % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(self.fn, sig, constexprs, attrs), target=target, options=options)
            report = ptxas_report(compiled.asm["ptx"], options.get("maxnreg"))
            report.update(shared_bytes=int(compiled.metadata.shared), num_warps=options["num_warps"])
            return report

    real = flash._kernels

    def caught():
        return tuple(type("M", (), {n: Catch(getattr(m, n)) for n in dir(m) if isinstance(getattr(m, n), triton.JITFunction)})
                     for m in real())

    out = {}
    flash._kernels = caught
    try:
        for pname, T in shapes:
            p = PROFILES[pname]
            H, K, V = p["H"], p["K"], p["V"]
            q, k = (torch.empty(1, T, H, K, dtype=dtype) for _ in range(2))
            v, do = (torch.empty(1, T, H, V, dtype=dtype) for _ in range(2))
            g = torch.empty(1, T, H, K, dtype=gate_dtype or dtype)
            flash.LAST_COMPILED.clear()
            flash.flash_forward(q, k, v, g, K**-0.5, None, 64, True, False)
            default = flash.CONFIG["bwd_segmented"]
            try:
                for segmented in (False, True):  # both backward designs, whichever is the default
                    flash.CONFIG["bwd_segmented"] = segmented
                    flash.flash_backward(q, k, v, g, do, None, K**-0.5, None, 64)
            finally:
                flash.CONFIG["bwd_segmented"] = default
            out[f"{pname} T={T}"] = dict(flash.LAST_COMPILED)
            for name, r in flash.LAST_COMPILED.items():
                log(f"{pname} T={T} {name:<34} " + ("  ".join(f"{a} {b}" for a, b in r.items())))
    finally:
        flash._kernels = real
        flash.LAST_COMPILED.clear()
    return out


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled flash_gla kernel (after a run)."""
    from glalearn import flash

    out = {}
    for name, ck in flash.LAST_COMPILED.items():
        try:
            out[name] = {"n_regs": int(ck.n_regs), "n_spills": int(ck.n_spills),
                         "shared_bytes": int(ck.metadata.shared), "num_warps": int(ck.metadata.num_warps)}
        except (AttributeError, TypeError, ValueError) as exc:  # names move between Triton versions
            out[name] = {"error": repr(exc)}
    return out


def machine() -> dict:
    import triton

    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        info["fla"] = None
    return info


def run(profiles, lengths, include_fla=True, only=None, log=print, profile_kernels=True, on_row=None) -> dict:
    """Time every method at every (profile, T); on_row(rows) is called after each row (to save
    partial results: a long run that is cut off keeps what it measured)."""
    from glalearn import flash

    started = time.perf_counter()
    bandwidth = copy_bandwidth_gbs()
    log(f"copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    rows, costs = [], {}
    meths = methods(include_fla)
    if only:
        meths = {n: f for n, f in meths.items() if any(n.startswith(o) for o in only)}
    for pname in profiles:
        p = PROFILES[pname]
        H, K, V = p["H"], p["K"], p["V"]
        for T in lengths:
            B = p["tokens"] // T
            floor = forward_floor_ms(B, T, H, K, V, bandwidth)
            c = kernel_costs(B, T, H, K, V)
            costs[f"{pname} T={T}"] = c
            bwd_floor = c["backward_floor_bytes"] / (bandwidth * 1e9) * 1e3
            for name, fn in meths.items():
                try:  # the non-materialized strategy has the same backward: timed once, with the other
                    r = time_method(name, fn, B, T, H, K, V, time_backward=name != "flash_gla (non-materialized)")
                except Exception as exc:  # noqa: BLE001 - record it, time the other methods
                    log(f"{pname} T={T:>5} {name}: FAILED {type(exc).__name__}: {str(exc)[:500]}")
                    rows.append({"profile": pname, "T": T, "B": B, "H": H, "K": K, "V": V, "method": name,
                                 "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    if on_row is not None:
                        on_row(rows)
                    continue
                row = {"profile": pname, "T": T, "B": B, "H": H, "K": K, "V": V, "method": name,
                       "forward_floor_ms": floor, "backward_floor_ms": bwd_floor, **r}
                if name == "flash_gla (materialized)":
                    row.update(forward_bytes=c["forward_bytes"], backward_bytes=c["backward_bytes"])
                row["elapsed_s"] = time.perf_counter() - started
                rows.append(row)
                bwd_ms = f"{r['backward_ms']:7.3f}" if "backward_ms" in r else "      -"
                log(f"{pname} T={T:>5} B={B:>3} {name:<30} fwd {r['forward_ms']:7.3f} ms  fwd+bwd "
                    f"{r['forward_backward_ms']:7.3f} ms  bwd {bwd_ms} ms  peak "
                    f"{r['forward_backward_peak_mb']:8.0f} MB  (floors {floor:.3f} / {bwd_floor:.3f} ms; "
                    f"{row['elapsed_s']:.0f} s)")
                if on_row is not None:
                    on_row(rows)
            torch.cuda.empty_cache()
    breakdown = {}
    if profile_kernels:
        for pname in profiles:
            p = PROFILES[pname]
            T = max(lengths)
            for name, fn in meths.items():
                try:
                    bd = kernel_breakdown(name, fn, p["tokens"] // T, T, p["H"], p["K"], p["V"])
                except Exception as exc:  # noqa: BLE001 - as in the timed rows
                    log(f"kernels of {pname} T={T} {name}: FAILED {type(exc).__name__}: {str(exc)[:500]}")
                    continue
                breakdown[f"{pname} T={T} {name}"] = bd
                log(f"kernels of {pname} T={T} {name} (forward+backward): "
                    + "; ".join(f"{k} x{c:g} {ms:.3f} ms" for k, (c, ms) in bd.items()))
    return {"copy_bandwidth_gbs": bandwidth, "rows": rows, "config": dict(flash.CONFIG),
            "kernels": kernel_resources(), "kernel_breakdown_fwd_bwd": breakdown, "costs": costs,
            "elapsed_s": time.perf_counter() - started}


def summary(rows) -> list[str]:
    """Ratios to fla and FlashAttention-2, per profile and T."""
    lines = []
    key = {(r["profile"], r["T"], r["method"]): r for r in rows if "error" not in r}
    for (pname, T, method), r in key.items():
        if method != "flash_gla (materialized)":
            continue
        parts = [f"{pname} T={T:>5}: fwd {r['forward_ms']:.3f} fwd+bwd {r['forward_backward_ms']:.3f} ms"]
        fla = key.get((pname, T, "fla chunk_gla"))
        if fla:
            parts.append(f"vs fla fwd x{r['forward_ms'] / fla['forward_ms']:.2f} "
                         f"fwd+bwd x{r['forward_backward_ms'] / fla['forward_backward_ms']:.2f}")
        fa = key.get((pname, T, "FlashAttention-2 (SDPA)"))
        if fa:
            parts.append(f"vs FA2 fwd+bwd x{r['forward_backward_ms'] / fa['forward_backward_ms']:.2f}")
        parts.append(f"fwd / floor x{r['forward_ms'] / r['forward_floor_ms']:.2f}")
        if "backward_ms" in r and "backward_floor_ms" in r:
            parts.append(f"bwd {r['backward_ms']:.3f} ms = x{r['backward_ms'] / r['backward_floor_ms']:.2f} its floor")
        lines.append("  ".join(parts))
    return lines


def plot(result: dict, path: str) -> None:
    """Forward and forward+backward time against T, one panel per profile and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    profiles = sorted({r["profile"] for r in rows})
    panels = [("forward_ms", "forward", "forward_floor_ms"), ("backward_ms", "backward", "backward_floor_ms"),
              ("forward_backward_ms", "forward + backward", None)]
    fig, axes = plt.subplots(len(profiles), 3, figsize=(14, 3.6 * len(profiles)), squeeze=False)
    for i, pname in enumerate(profiles):
        for j, (key, label, floor) in enumerate(panels):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["T"], r[key]) for r in rows
                             if r["profile"] == pname and r["method"] == method and key in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            if floor:
                pts = sorted((r["T"], r[floor]) for r in rows
                             if r["profile"] == pname and r["method"] == "flash_gla (materialized)" and floor in r)
                if pts:
                    ax.plot(*zip(*pts), "k--", label="memory floor")
            p = PROFILES[pname]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T (B = tokens / T)")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{pname}: H={p['H']}, K=V={p['K']}, {p['tokens']} tokens — {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 2:
                ax.legend(fontsize=7)
    fig.suptitle(f"GLA kernels on {result['machine']['gpu']}, bf16", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _json(text: str):
    return json.loads(text)


_json.__name__ = "JSON"  # argparse's message: "argument --config: invalid JSON value: '{bad'"


def _check_config(name: str, value, known) -> None:
    """A CONFIG variant (``--config``, each entry of ``--sweep``): a JSON object of known keys."""
    if not isinstance(value, dict):
        raise UserError(f"{name} must be a JSON object of flash_gla CONFIG keys, e.g. '{{\"warps\": 4}}'; "
                        f"got {value!r}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise UserError(f"{name} names CONFIG keys that do not exist: {unknown} (known: {sorted(known)})")


def _check_args(args) -> None:
    """Every number and JSON argument, before anything is compiled or the GPU is asked for."""
    from glalearn import flash

    tokens = min(PROFILES[p]["tokens"] for p in args.profiles)
    bad = [T for T in args.lengths if not 1 <= T <= tokens]
    if bad:
        raise UserError(f"--lengths must be whole numbers from 1 to {tokens:,} (the tokens per batch of "
                        f"{', '.join(args.profiles)}; B = tokens / T), got {bad[0]}")
    if not (math.isfinite(args.rep_ms) and args.rep_ms > 0):
        raise UserError(f"--rep-ms must be a finite number of milliseconds > 0, got {args.rep_ms}")
    if args.config is not None:
        _check_config("--config", args.config, flash.CONFIG)
    if args.sweep is not None:
        if not isinstance(args.sweep, list) or not args.sweep:
            raise UserError(f"--sweep must be a non-empty JSON list of objects (CONFIG variants), got {args.sweep!r}")
        for i, variant in enumerate(args.sweep):
            _check_config(f"--sweep entry {i}", variant, flash.CONFIG)


def main(argv=None) -> int:
    """``python -m glalearn.bench kernels``: a user error is one line on stderr and exit status 2."""
    return guarded("python -m glalearn.bench kernels", _run, argv)


def _run(argv=None) -> int:
    parser = OneLineParser(prog="python -m glalearn.bench kernels", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file to write (a PNG plot is written beside it)")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--no-fla", action="store_true", help="skip fla even if it is importable")
    parser.add_argument("--only", nargs="+", help="time only methods whose name starts with one of these (flash_gla, fla, Flash)")
    parser.add_argument("--config", type=_json, default=None,
                        help='override flash_gla launch settings, e.g. \'{"warps": 4}\'')
    parser.add_argument("--sweep", type=_json, default=None, metavar="JSON",
                        help='instead of the benchmark: time these CONFIG variants, e.g. \'[{}, {"bwd_bv": 64}]\' '
                             "(forward and backward alone at P1/P2 T=16384 and 1024, registers, gradient errors)")
    parser.add_argument("--rep-ms", type=float, default=TIMING["rep_ms"],
                        help=f"do_bench repetition time per measurement in ms (default {TIMING['rep_ms']})")
    parser.add_argument("--offline-registers", action="store_true",
                        help="no GPU needed: compile every launch for sm_90 here and print registers and spills")
    parser.add_argument("--layout-check", nargs="?", const="benchmark", choices=[*LAYOUT_SHAPES, "all"],
                        help="instead of timing: allocate these shapes' inputs first, then forward and backward "
                             "of each (finite and repeatable?); exit 1 otherwise. Run it under compute-sanitizer")
    args = parser.parse_args(argv)
    _check_args(args)
    TIMING["rep_ms"] = args.rep_ms
    if args.offline_registers:
        from glalearn import flash

        if args.config:
            flash.CONFIG.update(args.config)
        result = offline_resources()
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"offline_registers": result, "config": dict(flash.CONFIG)}, f, indent=1)
        return 0
    if not torch.cuda.is_available():
        raise UserError("needs a CUDA GPU (torch.cuda.is_available() is False); chapter 7 reads the committed "
                        "results instead, and --offline-registers compiles every launch without one")
    from glalearn import flash

    if args.config:
        flash.CONFIG.update(args.config)
    if args.sweep is not None:
        bandwidth = copy_bandwidth_gbs()
        print(f"copy bandwidth {bandwidth:.0f} GB/s (read + write)")
        results = sweep(args.sweep, bandwidth_gbs=bandwidth)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"sweep": results, "copy_bandwidth_gbs": bandwidth, "config": dict(flash.CONFIG), "machine": machine(),
                           "command": "python -m glalearn.bench kernels " + " ".join(argv if argv is not None else sys.argv[1:])},
                          f, indent=1)
        return 0
    if args.layout_check:
        results = layout_check(args.layout_check, variants=LAYOUT_VARIANTS)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"layout_check": results, "config": dict(flash.CONFIG)}, f, indent=1)
        return 0 if all(r["finite"] and r["repeatable"] for r in results) else 1
    command = "python -m glalearn.bench kernels " + " ".join(argv if argv is not None else sys.argv[1:])

    def save_partial(rows):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"rows": rows, "partial": True, "command": command, "config": dict(flash.CONFIG)}, f, indent=1)

    result = run(args.profiles, args.lengths, include_fla=not args.no_fla, only=args.only, on_row=save_partial)
    result["machine"] = machine()
    result["command"] = command
    print("\n".join(summary(result["rows"])))
    for name, res in result["kernels"].items():
        print(f"{name}: {res}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, args.out.rsplit(".", 1)[0] + ".png")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
