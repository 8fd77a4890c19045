"""``flash_gla``: GLA through the Triton kernels of ``kernels/`` (chapters 6-7), with autograd.

Forward, materialized (the default, as in the paper): the chunk states go through memory.
``segment_state_kernel`` walks every segment of chunks at once from a zero state and writes the
segment-local states (bf16 for bf16 inputs); ``segment_combine_kernel`` walks the segments in order
for the state entering each (and the final state); ``chunk_output_kernel`` computes every chunk's
output, adding the carried state on the chip, with the intra-chunk scores as one product; a second,
mostly idle launch redoes exactly the chunks whose decay was too strong for that product. Gates are
scanned inside the kernels as a product with a triangle of ones. ``CONFIG["segment_programs"] = 0``
selects the earlier path: ``chunk_cumsum_kernel``, one sequential ``chunk_state_kernel`` walk with
float32 states, and the output kernel with both score paths inline. Non-materialized:
``fused_forward_kernel`` keeps the state on-chip and walks the chunks in order, one program per
(head, V block).

Backward (sequential, the default: the path the committed GPU benchmark timed): G by
``chunk_cumsum_kernel``, one sequential state walk each way in float32 (``chunk_state_kernel``,
``chunk_state_backward_kernel``), then ``chunk_dv_kernel`` and ``chunk_dqkg_kernel``, chunk-parallel,
with both score paths inline.

Backward (segmented, ``CONFIG["bwd_segmented"] = True``; exact in the interpreter tests, not yet timed
on a GPU, so not the default): the chunk states recomputed the forward's way (never stored by the
forward: ``segment_state_kernel``, ``segment_combine_kernel``), the state gradients by the same scheme
run backwards (``segment_dstate_kernel``, then the combine walk in reverse), then one chunk-parallel
``chunk_bwd_kernel`` for dq, dk, dg (and dv where the key width fits one block; else
``chunk_bwd_dv_kernel``), single-product intra-chunk scores, dg by the gate-gradient trick; a second,
mostly idle launch redoes exactly the chunks whose decay was too strong for the product. Only this path
reads the launch choices in ``SEGMENTED_BACKWARD_KEYS``.

On a CPU the kernels run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` in the environment
before Triton is first imported.
"""

from __future__ import annotations

import json
import os

import torch

from glalearn.forms._contract import check_power_of_two, empty_result, validate

# Launch configuration (measured on the lent H200, kernels/NOTES.md).
#   bk, bv: channels per block of the chunk-parallel kernels (wide_head_block for heads wider than
#   128); dqk_bk: of the dq/dk/dg kernel.
#   state_bk, state_bv: blocks of the sequential state passes (smaller blocks, more programs).
#   warps / bwd_warps / state_warps / fused_warps (wide_warps at least, for 128-wide blocks): per program of the forward's chunk-parallel
#   kernels / the backward's / the sequential passes / the non-materialized forward;
#   stages / state_stages / fused_stages: their software-pipelining depth.
#   fused_bv: V block of the non-materialized forward (None: the same as bv); each program holds a
#   [K, fused_bv] state, so smaller blocks mean more programs (B·H·V / fused_bv) and more recomputed scores.
#   sub: the sub-chunk length L of the secondary-level (exact) path.
#   span_max: the largest decay span (nats) inside a chunk for which the intra-chunk scores are one
#   guarded product (kernels/common.py says why 40 is safe).
#   precision / bwd_precision / bwd_state_precision: of the products for 16-bit inputs ("bf16" rounds
#   operands to bfloat16, "tf32" keeps 10 mantissa bits, "tf32x3" is float32-exact);
#   bwd_intra_precision: of the intra-chunk score gradients, which cancel in the gate gradient.
#   segment_programs: programs the materialized forward's segmented state pass should have (segments are
#   as long as that allows; 0: one sequential walk, the earlier path); segment_bk, segment_bv: its blocks.
#   forward_cumsum: write G by chunk_cumsum_kernel first (else each kernel scans g itself, by gate_scan:
#   "product" on the tensor cores or "cumsum", tl.cumsum). bf16_states: segment-local states in bf16
#   where the products round to bf16 anyway. output_fallback: "defer" (product-only output kernel, then
#   a launch for the flagged chunks; flag_block flags per program of it) or "inline" (both paths in one
#   kernel); output_maxnreg: register cap of the product-only kernel for blocks up to 64 wide.
#   bwd_segmented: the segmented backward (True) or the sequential one (False, the default until the
#   segmented one is timed on a GPU). The segmented backward alone reads (SEGMENTED_BACKWARD_KEYS below):
#   bwd_fuse_dv: dv inside
#   chunk_bwd_kernel when one dqk_bk block holds the whole key width (else chunk_bwd_dv_kernel with
#   bwd_dv_bk x bwd_dv_bv blocks); bwd_bv: the V block chunk_bwd_kernel walks; bwd_stages: its pipelining
#   depth; bwd_fallback: "defer" (product-only kernels, then launches for the flagged chunks) or "inline";
#   bwd_maxnreg: register cap of the product-only kernels (None: none); bwd_dg_scan: the gate gradient's
#   cumulative sums by tl.cumsum ("cumsum") or as products with triangles of ones ("product": exact with
#   bf16x3 pieces, but those products cost registers: 188 B of spills at P1 with sm_90 ptxas, vs 0).
# Float32 inputs always get float32 products. Chapter 7 measures the choices; the benchmark tries
# variants through this dict (or GLALEARN_FLASH_CONFIG='{"warps": 8}' in the environment).
CONFIG = {"sub": 16, "bk": 128, "bv": 128, "dqk_bk": 64, "state_bk": 32, "state_bv": 32, "warps": 4, "wide_warps": 8,
          "bwd_warps": 8, "state_warps": 4, "stages": 2, "span_max": 40.0, "precision": "bf16",
          "bwd_state_precision": "bf16", "bwd_precision": "bf16", "bwd_intra_precision": "bf16",
          "state_stages": 3, "fused_warps": 8, "fused_stages": 3, "wide_head_block": 64, "fused_bv": None,
          "segment_programs": 256, "segment_bk": 64, "segment_bv": 64, "forward_cumsum": False, "bf16_states": True, "gate_scan": "product",
          "output_fallback": "defer", "output_maxnreg": 128, "flag_block": 16,
          "bwd_segmented": False, "bwd_fuse_dv": True, "bwd_bv": 32, "bwd_dv_bk": 64, "bwd_dv_bv": 128,
          "bwd_stages": 2, "bwd_fallback": "defer", "bwd_maxnreg": None, "bwd_dg_scan": "cumsum"}
CONFIG.update(json.loads(os.environ.get("GLALEARN_FLASH_CONFIG", "{}")))
# The launch choices that only the segmented backward (CONFIG["bwd_segmented"] = True) reads: the
# forward and the sequential backward never look at them (tests/test_kernels.py records every CONFIG key
# each path reads), so a run of the sequential backward does not depend on them, and a benchmark file
# recorded before they existed still describes the library's default path.
SEGMENTED_BACKWARD_KEYS = ("bwd_fuse_dv", "bwd_bv", "bwd_dv_bk", "bwd_dv_bv", "bwd_stages", "bwd_fallback",
                           "bwd_maxnreg", "bwd_dg_scan")
# The last compiled kernel of each name (for its register / spill / shared-memory report on a GPU).
LAST_COMPILED: dict = {}


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels():
    """The kernel modules, imported on first use (Triton decides at import whether to interpret)."""
    from glalearn.kernels import backward, chunk_output, chunk_state, fused_forward

    return chunk_state, chunk_output, fused_forward, backward


def interpreter_active() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    chunk_state, *_ = _kernels()
    return type(chunk_state.chunk_state_kernel).__name__ == "InterpretedFunction"


def _check_grid(B: int, T: int, H: int, C: int) -> None:
    """The chunk-parallel launches put the chunks on the grid's second axis and the (batch, head) pairs
    on its third; CUDA allows at most 65,535 programs along each of those."""
    if B * H > 65535:
        raise ValueError(f"flash_gla launches one program row per (batch, head) pair, at most 65,535 of them; "
                         f"got B * H = {B} * {H} = {B * H}. Split the batch into calls of at most {65535 // H} sequences.")
    if -(-T // C) > 65535:
        raise ValueError(f"flash_gla launches one program per chunk of chunk_size = {C} tokens, at most 65,535 "
                         f"chunks per sequence; got T = {T} ({-(-T // C)} chunks). Use a larger chunk_size or "
                         "split the sequence (pass the final state on as initial_state).")


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda" or interpreter_active():
        return
    raise RuntimeError(
        f"flash_gla runs compiled Triton kernels on a CUDA GPU, but the inputs are on {q.device}. "
        "Either move q, k, v, g (and initial_state) to a CUDA device, or run the kernels in Triton's "
        "interpreter on the CPU: set the environment variable TRITON_INTERPRET=1 before Triton is first "
        "imported (e.g. `TRITON_INTERPRET=1 python ...`, or os.environ['TRITON_INTERPRET'] = '1' at the "
        "top of the notebook, then restart the kernel)."
    )


def launch_blocks(K: int, V: int, config: dict | None = None, segmented_backward: bool = True) -> dict:
    """The block sizes the launches use for heads of K x V channels under ``config`` (default CONFIG),
    without touching a kernel (the cost model of ``glalearn.bench_kernels`` reads them too):
    BK, BV (chunk-parallel kernels), SBK, SBV (the sequential passes), segment_bk, segment_bv (the
    segmented passes), DBK (chunk_dqkg_kernel / chunk_bwd_kernel); with ``segmented_backward`` also
    those of the segmented backward alone (read from its SEGMENTED_BACKWARD_KEYS): BBV (chunk_bwd_kernel's
    V block), fuse_dv (dv computed inside chunk_bwd_kernel), DVBK, DVBV (chunk_bwd_dv_kernel's blocks)."""
    c = CONFIG if config is None else config
    kp, vp = max(16, _next_power_of_two(K)), max(16, _next_power_of_two(V))
    bk, bv = (c["bk"], c["bv"]) if max(K, V) <= 128 else (c["wide_head_block"],) * 2
    DBK = min(c["dqk_bk"], kp)
    blocks = {"BK": min(bk, kp), "BV": min(bv, vp), "SBK": min(c["state_bk"], kp), "SBV": min(c["state_bv"], vp),
              "segment_bk": min(c["segment_bk"], kp), "segment_bv": min(c["segment_bv"], vp), "DBK": DBK}
    if segmented_backward:
        blocks.update(BBV=min(c["bwd_bv"], vp), fuse_dv=bool(c["bwd_fuse_dv"]) and -(-K // DBK) == 1,
                      DVBK=min(c["bwd_dv_bk"], kp), DVBV=min(c["bwd_dv_bv"], vp))
    return blocks


def _config(K: int, V: int, dtype: torch.dtype):
    """Blocks (BK, BV of the chunk-parallel kernels, SBK, SBV of the state passes) and precision.

    Heads up to 128 channels take blocks of CONFIG["bk"] x CONFIG["bv"] (128: one block holds the
    whole head, P is built once per chunk); wider heads take CONFIG["wide_head_block"] (64). That
    choice was measured when the GLA layer still handed the kernels float32 q, k, v (exact float32
    products): 167k tokens/s with 64-blocks against 85k with 128-blocks for the model benchmark's
    K = 128, V = 256 heads. With bf16 inputs (the layer's behaviour since) 128-blocks measured 3%
    faster on the H200 (310.9k vs 301.1k tokens/s at T = 4096); kernels/NOTES.md has both."""
    b = launch_blocks(K, V, segmented_backward=False)
    return b["BK"], b["BV"], b["SBK"], b["SBV"], _precision(dtype, CONFIG["precision"])


def _warps(key: str, *blocks: int) -> int:
    """CONFIG[key] warps; CONFIG["wide_warps"] where a block is 128 channels wide or more (the
    tiles need the registers of more threads); and 8 where a 32-wide block would run with 4 warps:
    on Hopper with Triton 3.6 those chunk-parallel kernels hit a compiler bug (illegal memory accesses;
    we saw them with BV = 32 and with dqk_bk = 32 at 4 warps; fla's autotuner excludes the same case,
    Triton issue 11366)."""
    n = CONFIG[key]
    if max(blocks) >= 128:
        n = max(n, CONFIG["wide_warps"])
    return 8 if n == 4 and 32 in blocks else n


def _precision(dtype: torch.dtype, wanted: str) -> str:
    """float32 inputs: exact float32 products ("ieee"). float16 inputs: never round operands to
    bfloat16 (fewer mantissa bits than the input), tf32 instead."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.float16 and wanted == "bf16":
        return "tf32"
    if wanted == "bf16" and interpreter_active():
        return "bf16_round"  # the interpreter's own bfloat16 products are wrong (kernels/common.py)
    return wanted


def chunk_cumulative_gates(g, C):
    """G [B, T, H, K] float32: the chunk-local inclusive cumulative sum of g (one parallel launch)."""
    chunk_state, *_ = _kernels()
    B, T, H, K = g.shape
    G = torch.empty(B, T, H, K, dtype=torch.float32, device=g.device)
    BK = min(64, max(16, _next_power_of_two(K)))
    LAST_COMPILED["chunk_cumsum_kernel"] = chunk_state.chunk_cumsum_kernel[(-(-K // BK), -(-T // C), B * H)](
        g, G, T, H=H, K=K, C=C, BK=BK, num_warps=4,
    )
    return G


def _chunk_states(k, v, G, initial_state, C, SBK, SBV, precision):
    """h [B, H, N + 1, K, V] float32: h[:, :, n] = the state entering chunk n, h[:, :, N] the final one.
    G: the chunk-local cumulative gates (``chunk_cumulative_gates``)."""
    chunk_state, *_ = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = -(-T // C)
    h = torch.empty(B, H, N + 1, K, V, dtype=torch.float32, device=k.device)
    grid = (-(-K // SBK), -(-V // SBV), B * H)
    h0 = initial_state if initial_state is not None else h
    LAST_COMPILED["chunk_state_kernel"] = chunk_state.chunk_state_kernel[grid](
        k, v, G, h0, h, T, H=H, K=K, V=V, C=C, BK=SBK, BV=SBV,
        USE_H0=initial_state is not None, PRECISION=precision, CUMULATIVE=True,
        num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"],
    )
    return h


def _gate_scan(g_dtype: torch.dtype) -> str:
    """How kernels that read raw gates take their chunk-local cumulative sum (kernels/common.py,
    ``load_gate``): CONFIG["gate_scan"] = "cumsum" (``tl.cumsum``) or "product" (a product with the
    lower triangle of ones: exact in float32 under the interpreter; one bfloat16 product for bfloat16
    gates, three bfloat16 pieces for wider ones on a GPU)."""
    if CONFIG["gate_scan"] == "cumsum":
        return "cumsum"
    if interpreter_active():
        return "ieee"
    return "bf16" if g_dtype == torch.bfloat16 else "bf16x3"


def segment_length(B, H, K, V, N, SBK, SBV, config: dict | None = None) -> int:
    """Chunks per segment of the segmented state pass: the longest that still gives every state block
    CONFIG["segment_programs"] programs in all (at least one chunk, at most N)."""
    c = CONFIG if config is None else config
    blocks = B * H * (-(-K // SBK)) * (-(-V // SBV))
    segments = min(N, max(1, -(-c["segment_programs"] // blocks)))
    return -(-N // segments)


def _segment_blocks(K, V):
    """State blocks of the segmented passes (forward and backward share them, and so their segments)."""
    b = launch_blocks(K, V, segmented_backward=False)
    return b["segment_bk"], b["segment_bv"]


def _segment_pass(k, v, gates, initial_state, C, SBK, SBV, SEG, precision, h_dtype, cumulative, scan, output_final):
    """The segmented state pass (kernels/chunk_state.py): (L [B, H, N, K, V] in h_dtype, Λ [B, H, N, K],
    the states entering the segments [B, H, NSEG, K, V], the segments' decays [B, H, NSEG, K], S_T or None)."""
    chunk_state, *_ = _kernels()
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = -(-T // C)
    NSEG = -(-N // SEG)
    dev = k.device
    h = torch.empty(B, H, N, K, V, dtype=h_dtype, device=dev)
    lam = torch.empty(B, H, N, K, dtype=torch.float32, device=dev)
    ends = torch.empty(B, H, NSEG, K, V, dtype=torch.float32, device=dev)
    seg_decay = torch.empty(B, H, NSEG, K, dtype=torch.float32, device=dev)
    state_grid = (-(-K // SBK), -(-V // SBV))
    LAST_COMPILED["segment_state_kernel"] = chunk_state.segment_state_kernel[(*state_grid, B * H * NSEG)](
        k, v, gates, h, lam, ends, seg_decay, T, SEG, NSEG, H=H, K=K, V=V, C=C, BK=SBK, BV=SBV,
        PRECISION=precision, CUMULATIVE=cumulative, SCAN=scan,
        num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"],
    )
    hs = torch.empty(B, H, NSEG, K, V, dtype=torch.float32, device=dev)
    final = torch.empty(B, H, K, V, dtype=torch.float32, device=dev) if output_final else None
    LAST_COMPILED["segment_combine_kernel"] = chunk_state.segment_combine_kernel[(*state_grid, B * H)](
        ends, seg_decay, initial_state if initial_state is not None else hs, hs, final if final is not None else hs,
        NSEG, K=K, V=V, BK=SBK, BV=SBV, USE_H0=initial_state is not None, STORE_FINAL=final is not None,
        num_warps=4, num_stages=3,
    )
    return h, lam, hs, seg_decay, final


def _state_dtype(precision: str) -> torch.dtype:
    """Segment-local states in bfloat16 when the products round their operands to bfloat16 anyway."""
    return torch.bfloat16 if precision in ("bf16", "bf16_round") and CONFIG["bf16_states"] else torch.float32


def _segmented_forward(q, k, v, g, scale, initial_state, C, L, output_final_state):
    """The materialized forward with the segmented state pass (kernels/chunk_state.py): segment-local
    states in parallel, a walk over segments, then every chunk's output. Returns (o, final, G)."""
    _, chunk_output, *_ = _kernels()
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    BK, BV, _, _, precision = _config(K, V, q.dtype)
    SBK, SBV = _segment_blocks(K, V)
    SEG = segment_length(B, H, K, V, N, SBK, SBV)
    dev = q.device
    h_dtype = _state_dtype(precision)
    G = chunk_cumulative_gates(g, C) if CONFIG["forward_cumsum"] else None
    gates = g if G is None else G
    scan = _gate_scan(g.dtype)
    h, lam, hs, _, final = _segment_pass(k, v, gates, initial_state, C, SBK, SBV, SEG, precision, h_dtype,
                                         G is not None, scan, output_final_state)
    o = torch.empty_like(v)
    fallback = CONFIG["output_fallback"]
    flags = torch.empty(B, H, N, dtype=torch.int32, device=dev) if fallback == "defer" else o
    common = {"H": H, "K": K, "V": V, "C": C, "L": L, "BK": BK, "BV": BV, "CUMULATIVE": G is not None, "SCAN": scan,
              "SEGMENTED": True, "SPAN_MAX": float(CONFIG["span_max"]), "PRECISION": precision,
              "num_warps": _warps("warps", BK, BV), "num_stages": CONFIG["stages"]}
    # The product-only kernel needs few registers; capping them lets more programs share an SM where
    # the tiles are small (64-wide blocks; 128-wide ones spill under the cap).
    cap = {"maxnreg": CONFIG["output_maxnreg"]} if CONFIG["output_maxnreg"] and max(BK, BV) <= 64 else {}
    LAST_COMPILED[f"chunk_output_kernel ({fallback})"] = chunk_output.chunk_output_kernel[(-(-V // BV), N, B * H)](
        q, k, v, gates, h, o, hs, lam, flags, scale, T, SEG, FALLBACK=fallback,
        **common, **(cap if fallback == "defer" else {}),
    )
    if fallback == "defer":  # the chunks whose decay span ruled out the product, done exactly
        total, block = B * H * N, CONFIG["flag_block"]
        LAST_COMPILED["chunk_output_kernel (flagged)"] = chunk_output.chunk_output_kernel[(-(-total // block), -(-V // BV))](
            q, k, v, gates, h, o, hs, lam, flags, scale, T, SEG, FALLBACK="flagged", TOTAL=total,
            FLAG_BLOCK=block, **common,
        )
    return o, final, G


def flash_forward(q, k, v, g, scale, initial_state, chunk_size, materialize, output_final_state):
    """Run the forward kernels on contiguous inputs.

    Returns (o [B, T, H, V], final_state or None, G): G the chunk-local cumulative gates if the forward
    wrote them (CONFIG["forward_cumsum"] or the sequential path), else None (the backward computes them)."""
    _, chunk_output, fused_forward, _ = _kernels()
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, L = chunk_size, min(CONFIG["sub"], chunk_size)
    N = -(-T // C)
    BK, BV, SBK, SBV, precision = _config(K, V, q.dtype)
    o = torch.empty_like(v)
    if materialize:
        if CONFIG["segment_programs"]:
            return _segmented_forward(q, k, v, g, scale, initial_state, C, L, output_final_state)
        G = chunk_cumulative_gates(g, C)
        h = _chunk_states(k, v, G, initial_state, C, SBK, SBV, precision)
        LAST_COMPILED["chunk_output_kernel"] = chunk_output.chunk_output_kernel[(-(-V // BV), N, B * H)](
            q, k, v, G, h, o, h, h, h, scale, T, 1, H=H, K=K, V=V, C=C, L=L, BK=BK, BV=BV, CUMULATIVE=True,
            SCAN="cumsum", SEGMENTED=False, FALLBACK="inline",
            SPAN_MAX=float(CONFIG["span_max"]), PRECISION=precision, num_warps=_warps("warps", BK, BV),
            num_stages=CONFIG["stages"],
        )
        final = h[:, :, N].contiguous() if output_final_state else None
        return o, final, G
    final = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    if CONFIG["fused_bv"] is not None:
        BV = min(CONFIG["fused_bv"], max(16, _next_power_of_two(V)))
    LAST_COMPILED["fused_forward_kernel"] = fused_forward.fused_forward_kernel[(-(-V // BV), B * H)](
        q, k, v, g, initial_state if initial_state is not None else o, o, final if final is not None else o,
        scale, T, H=H, K=K, V=V, C=C, L=L, BK=max(16, _next_power_of_two(K)), BV=BV,
        USE_H0=initial_state is not None, STORE_FINAL=final is not None,
        SPAN_MAX=float(CONFIG["span_max"]), PRECISION=precision,
        num_warps=_warps("fused_warps", max(16, _next_power_of_two(K)), BV), num_stages=CONFIG["fused_stages"],
    )
    return o, final, None


def _dg_scan(dtype: torch.dtype) -> str:
    """How chunk_bwd_kernel takes the gate gradient's cumulative sums: "cumsum" (tl.cumsum) or a product
    with a triangle of ones, float32-exact: "ieee" under the interpreter, three bf16 pieces on a GPU."""
    if CONFIG["bwd_dg_scan"] == "cumsum":
        return "cumsum"
    return "ieee" if interpreter_active() else "bf16x3"


def _segmented_backward(q, k, v, g, do, dht, scale, initial_state, C, L):
    """The segmented backward (kernels/backward.py): states and state gradients by segments, then every
    chunk's gradients at once. Returns (dq, dk, dv, dg, dh0 or None)."""
    chunk_state, _, _, backward = _kernels()
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    dev = q.device
    state_precision = _precision(q.dtype, CONFIG["bwd_state_precision"])
    precision = _precision(q.dtype, CONFIG["bwd_precision"])
    intra = _precision(q.dtype, CONFIG["bwd_intra_precision"])
    SBK, SBV = _segment_blocks(K, V)
    SEG = segment_length(B, H, K, V, N, SBK, SBV)
    NSEG = -(-N // SEG)
    h_dtype = _state_dtype(state_precision)
    scan = _gate_scan(g.dtype)
    h, lam, hs, seg_decay, _ = _segment_pass(k, v, g, initial_state, C, SBK, SBV, SEG, state_precision, h_dtype,
                                             False, scan, False)
    # The state gradients: segments walked backwards from zero at once, then the walk over segments.
    state_grid = (-(-K // SBK), -(-V // SBV))
    dh = torch.empty(B, H, N, K, V, dtype=h_dtype, device=dev)
    lamb = torch.empty(B, H, N, K, dtype=torch.float32, device=dev)
    ends = torch.empty(B, H, NSEG, K, V, dtype=torch.float32, device=dev)
    LAST_COMPILED["segment_dstate_kernel"] = backward.segment_dstate_kernel[(*state_grid, B * H * NSEG)](
        q, g, do, dh, lamb, ends, scale, T, SEG, NSEG, H=H, K=K, V=V, C=C, BK=SBK, BV=SBV,
        PRECISION=state_precision, SCAN=scan, num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"],
    )
    dhs = torch.empty(B, H, NSEG, K, V, dtype=torch.float32, device=dev)
    dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=dev) if initial_state is not None else None
    LAST_COMPILED["segment_combine_kernel (reverse)"] = chunk_state.segment_combine_kernel[(*state_grid, B * H)](
        ends, seg_decay, dht if dht is not None else dhs, dhs, dh0 if dh0 is not None else dhs, NSEG, K=K, V=V,
        BK=SBK, BV=SBV, USE_H0=dht is not None, STORE_FINAL=dh0 is not None, REVERSE=True, num_warps=4, num_stages=3,
    )
    # Every chunk's gradients.
    blocks = launch_blocks(K, V)
    DBK, BBV, fuse = blocks["DBK"], blocks["BBV"], blocks["fuse_dv"]
    NK = -(-K // DBK)
    fallback = CONFIG["bwd_fallback"]
    dq, dk, dv, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)
    total, block = B * H * N * NK, CONFIG["flag_block"]
    flags = torch.empty(total, dtype=torch.int32, device=dev) if fallback == "defer" else dq
    cap = {"maxnreg": CONFIG["bwd_maxnreg"]} if CONFIG["bwd_maxnreg"] and fallback == "defer" else {}
    common = {"H": H, "K": K, "V": V, "C": C, "L": L, "BK": DBK, "BV": BBV, "SPAN_MAX": float(CONFIG["span_max"]),
              "PRECISION": precision, "INTRA_PRECISION": intra, "SCAN": scan, "DG_SCAN": _dg_scan(q.dtype),
              "FUSE_DV": fuse, "num_warps": _warps("bwd_warps", DBK, BBV), "num_stages": CONFIG["bwd_stages"]}
    args = (q, k, v, g, do, h, lam, hs, dh, lamb, dhs, dq, dk, dv, dg, flags, scale, T, SEG)
    LAST_COMPILED[f"chunk_bwd_kernel ({fallback})"] = backward.chunk_bwd_kernel[(NK, N, B * H)](
        *args, FALLBACK=fallback, **common, **cap)
    if fallback == "defer":
        LAST_COMPILED["chunk_bwd_kernel (flagged)"] = backward.chunk_bwd_kernel[(-(-total // block),)](
            *args, FALLBACK="flagged", TOTAL=total, FLAG_BLOCK=block, **common)
    if not fuse:
        total_dv = B * H * N
        flags_dv = torch.empty(total_dv, dtype=torch.int32, device=dev) if fallback == "defer" else dv
        DVBK, DVBV = blocks["DVBK"], blocks["DVBV"]
        dv_common = {"H": H, "K": K, "V": V, "C": C, "L": L, "BK": DVBK, "BV": DVBV,
                     "SPAN_MAX": float(CONFIG["span_max"]), "PRECISION": precision, "SCAN": scan,
                     "num_warps": _warps("bwd_warps", DVBK, DVBV), "num_stages": CONFIG["bwd_stages"]}
        dv_args = (q, k, g, do, dh, lamb, dhs, dv, flags_dv, scale, T, SEG)
        LAST_COMPILED[f"chunk_bwd_dv_kernel ({fallback})"] = backward.chunk_bwd_dv_kernel[(-(-V // DVBV), N, B * H)](
            *dv_args, FALLBACK=fallback, **dv_common, **cap)
        if fallback == "defer":
            LAST_COMPILED["chunk_bwd_dv_kernel (flagged)"] = backward.chunk_bwd_dv_kernel[
                (-(-total_dv // block), -(-V // DVBV))](*dv_args, FALLBACK="flagged", TOTAL=total_dv, FLAG_BLOCK=block,
                                                      **dv_common)
    return dq, dk, dv, dg, dh0


def flash_backward(q, k, v, g, do, dht, scale, initial_state, chunk_size, G=None):
    """Gradients (dq, dk, dv, dg, d initial_state or None) for contiguous inputs and output gradient.
    G: the chunk-local cumulative gates if the forward kept them (the sequential path computes them
    otherwise; the segmented path scans the gates inside its kernels)."""
    *_, backward = _kernels()
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, L = chunk_size, min(CONFIG["sub"], chunk_size)
    if CONFIG["bwd_segmented"]:
        return _segmented_backward(q, k, v, g, do, dht, scale, initial_state, C, L)
    N = -(-T // C)
    BK, BV, SBK, SBV, _ = _config(K, V, q.dtype)
    # The gate gradient sums terms that cancel: CONFIG may ask for float32-exact products ("tf32x3").
    state_precision = _precision(q.dtype, CONFIG["bwd_state_precision"])
    precision = _precision(q.dtype, CONFIG["bwd_precision"])
    DBK = min(CONFIG["dqk_bk"], max(16, _next_power_of_two(K)))
    if G is None:
        G = chunk_cumulative_gates(g, C)
    h = _chunk_states(k, v, G, initial_state, C, SBK, SBV, state_precision)  # recomputed, not stored
    dh = torch.empty(B, H, N, K, V, dtype=torch.float32, device=q.device)
    dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    LAST_COMPILED["chunk_state_backward_kernel"] = backward.chunk_state_backward_kernel[(-(-K // SBK), -(-V // SBV), B * H)](
        q, G, do, dht if dht is not None else dh, dh, dh0 if dh0 is not None else dh,
        scale, T, H=H, K=K, V=V, C=C, BK=SBK, BV=SBV,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, PRECISION=state_precision, CUMULATIVE=True,
        num_warps=CONFIG["state_warps"], num_stages=CONFIG["state_stages"],
    )
    dv = torch.empty_like(v)
    LAST_COMPILED["chunk_dv_kernel"] = backward.chunk_dv_kernel[(-(-V // BV), N, B * H)](
        q, k, G, do, dh, dv, scale, T, H=H, K=K, V=V, C=C, L=L, BK=BK, BV=BV, CUMULATIVE=True,
        SPAN_MAX=float(CONFIG["span_max"]), PRECISION=precision, num_warps=_warps("bwd_warps", BK, BV),
        num_stages=CONFIG["stages"],
    )
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    LAST_COMPILED["chunk_dqkg_kernel"] = backward.chunk_dqkg_kernel[(-(-K // DBK), N, B * H)](
        q, k, v, G, do, h, dh, dq, dk, dg, scale, T, H=H, K=K, V=V, C=C, L=L, BK=DBK, BV=BV, CUMULATIVE=True,
        SPAN_MAX=float(CONFIG["span_max"]), PRECISION=precision,
        INTRA_PRECISION=_precision(q.dtype, CONFIG["bwd_intra_precision"]),
        num_warps=_warps("bwd_warps", DBK, BV), num_stages=CONFIG["stages"],
    )
    return dq, dk, dv, dg, dh0


class FlashGLAFunction(torch.autograd.Function):
    """Autograd around the kernels: saves q, k, v, g, S_0 (and G if the forward wrote it: not by
    default), never chunk states (chapter 7)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, materialize, output_final_state):
        o, final, G = flash_forward(q, k, v, g, scale, initial_state, chunk_size, materialize, output_final_state)
        ctx.save_for_backward(q, k, v, g, initial_state, G)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, initial_state, G = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = flash_backward(
            q, k, v, g, do.contiguous(), None if dfinal is None else dfinal.float().contiguous(),
            ctx.scale, initial_state, ctx.chunk_size, G,
        )
        return dq, dk, dv, dg, dh0, None, None, None, None


def flash_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    materialize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA by the FlashLinearAttention kernels (chapters 6-7), same contract as every form.

    Args:
        q, k: [B, T, H, K];  v: [B, T, H, V];  g: [B, T, H, K] log forget gates (<= 0);
            float32, bfloat16 or float16 (one dtype for q, k, v; g may differ).
        scale: multiplies q; default K ** -0.5.
        initial_state: S_0 [B, H, K, V] (kept in float32);  output_final_state: also return S_T.
        chunk_size: C, a power of two from 16 to 128 (sub-chunks of 16 inside).
        materialize: True — write chunk states to memory, then all chunk outputs in parallel;
            False — keep the state on-chip and walk the chunks in order (one program per head).
    Returns:
        o [B, T, H, V] in q's dtype, and S_T [B, H, K, V] float32 (or None).

    Differentiable in q, k, v, g and initial_state; the backward recomputes the chunk states.
    Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
    """
    on_cpu = q.device.type == "cpu"
    info = validate(q, k, v, g, scale, initial_state, check_values=on_cpu)
    check_power_of_two("chunk_size", chunk_size)
    if not 16 <= chunk_size <= 128:
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128 for the kernels (tensor-core tiles), got {chunk_size}")
    if torch.float64 in (q.dtype, g.dtype):
        raise TypeError(
            f"flash_gla computes in float32 on the chip; got float64 inputs (q {q.dtype}, g {g.dtype}). "
            "Use float32, bfloat16 or float16, or the reference forms (glalearn.chunk_gla) for float64."
        )
    if not isinstance(materialize, bool):
        raise TypeError(f"materialize must be True or False, got {materialize!r}")
    _check_device(q)
    _check_grid(info.B, info.T, info.H, chunk_size)
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    S0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o, final = FlashGLAFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), S0, info.scale, chunk_size,
        materialize, output_final_state,
    )
    return o, (final if output_final_state else None)


__all__ = ["FlashGLAFunction", "flash_backward", "flash_forward", "flash_gla", "interpreter_active"]

