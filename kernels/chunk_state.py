"""The chunk-state kernel (chapter 6): the only sequential pass of the materialized forward.

    S_[n+1] = Diag(exp(γ_[n])) S_[n] + (k_[n] ⊙ Γ_[n])ᵀ v_[n]          (chapter 3's recurrence)

One program owns one [BK, BV] block of one head's state and walks the N chunks in order, keeping the
block in registers (float32) and writing every state it passes: h[n] = S_[n], the state *entering*
chunk n, for n = 0 .. N (h[N] is the final state). The K and V blocks are independent (the decay is
per key channel), so a head's state is split over (K / BK) x (V / BV) programs.

Bytes per chunk and program: k, g [C, BK] and v [C, BV] in, one [BK, BV] float32 state out.
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import load_gate, load_tile, mm, round_to_bf16, store_tile


@triton.jit
def chunk_state_kernel(
    k, v, g, h0, h,  # pointers: k, g [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V]; h [B, H, N + 1, K, V]
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False,
):
    """CUMULATIVE: g holds G, the chunk-local cumulative gates (``chunk_cumsum_kernel``), not g."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    # This head's [T, K] and [T, V] matrices: row stride H·K (or H·V), start at (b, 0, h, 0).
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    v_base = v + (i_b * T * H + i_h) * V
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = rk[:, None] * V + rv[None, :]
    h_base = h + i_bh * (N + 1) * K * V
    if USE_H0:
        state = tl.load(h0 + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    for n in range(N):
        tl.store(h_base + n * K * V + state_offsets, state, mask=state_mask)
        k_n = load_tile(k_base, n * C, i_k * BK, T, K, H * K, C, BK)
        v_n = load_tile(v_base, n * C, i_v * BV, T, V, H * V, C, BV)
        # G: chunk-local cumulative log decay; gamma: the log decay over the whole chunk, [BK]
        G, gamma = load_gate(g_base, n * C, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, "cumsum")
        k_decayed = k_n * tl.exp(gamma[None, :] - G)  # exp(γ - G_j) <= 1
        state = mm(tl.trans(k_decayed), v_n, state * tl.exp(gamma)[:, None], PRECISION)
    tl.store(h_base + N * K * V + state_offsets, state, mask=state_mask)


@triton.jit
def chunk_cumsum_kernel(
    g, G,  # g [B, T, H, K] (any float dtype); G [B, T, H, K] float32
    T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """G = the chunk-local inclusive cumulative sum of g, every chunk at once (one program per
    (K block, chunk, head)). Written once, it spares every later kernel the scan along the chunk."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offset = (i_b * T * H + i_h) * K
    x = load_tile(g + offset, i_n * C, i_k * BK, T, K, H * K, C, BK)
    store_tile(G + offset, tl.cumsum(x, axis=0), i_n * C, i_k * BK, T, K, H * K, C, BK)


# ---------------------------------------------------------------------------------------------------
# The segmented state pass (chapter 7): the sequential walk cut into independent segments.
#
# The recurrence is linear in the state, so a segment of chunks n₀ … n₁ − 1 can be walked from a zero
# state while the state that really enters it, S_[n₀], is still unknown:
#     S_[n] = U_[n] + Diag(exp(λ_[n])) S_[n₀],     λ_[n] = γ_[n₀] + ... + γ_[n−1]   (the decay since n₀)
# where U_[n] is the segment-local state (the walk from zero). Three steps:
#   1. ``segment_state_kernel``: every segment at once writes U_[n] and λ_[n] for its chunks, and its
#      end state U_[n₁] and total decay λ_[n₁];
#   2. ``segment_combine_kernel``: a short sequential walk over the *segments* (not the chunks) gives
#      each segment's entering state S_[n₀] (and the final state);
#   3. the output kernel forms S_[n] = U_[n] + exp(λ_[n]) ⊙ S_[n₀] on the chip before its product.
# One head's sequential chain shrinks from N chunk steps to SEG chunk steps plus N / SEG segment steps,
# and the number of programs grows N / SEG times: the pass becomes bound by bytes, not by latency.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def store_state(ptr, x, mask, PRECISION: tl.constexpr):
    """Store a float32 tile into a state buffer of any float dtype. Under the interpreter with
    bf16 emulation ("bf16_round") round to bfloat16 first: the interpreter's conversion truncates."""
    if PRECISION == "bf16_round":
        x = round_to_bf16(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def segment_state_kernel(
    k, v, g, h, lam, ends, seg_decay,
    # k, g [B, T, H, K]; v [B, T, H, V]; h [B, H, N, K, V] (any float dtype): U_[n];
    # lam [B, H, N, K] float32: λ_[n]; ends [B, H, NSEG, K, V] float32; seg_decay [B, H, NSEG, K] float32
    T, SEG, NSEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False, SCAN: tl.constexpr = "cumsum",
):
    """One program per (K block, V block, head, segment of SEG chunks): U_[n] and λ_[n] for the segment's
    chunks, then its end state and total decay. CUMULATIVE as in ``chunk_state_kernel``."""
    i_k, i_v, i_x = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_bh, i_s = i_x // NSEG, i_x % NSEG
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    v_base = v + (i_b * T * H + i_h) * V
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = rk[:, None] * V + rv[None, :]
    lam_mask = rk < tl.where(i_v == 0, K, 0)  # the V blocks of a K block share λ: the first writes it
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, N)
    state = tl.zeros((BK, BV), dtype=tl.float32)
    decay = tl.zeros((BK,), dtype=tl.float32)  # λ_[n]
    for n in range(n0, n1):
        store_state(h + (i_bh * N + n) * K * V + state_offsets, state, state_mask, PRECISION)
        tl.store(lam + (i_bh * N + n) * K + rk, decay, mask=lam_mask)
        k_n = load_tile(k_base, n * C, i_k * BK, T, K, H * K, C, BK)
        v_n = load_tile(v_base, n * C, i_v * BV, T, V, H * V, C, BV)
        G, gamma = load_gate(g_base, n * C, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, SCAN)
        k_decayed = k_n * tl.exp(gamma[None, :] - G)
        state = mm(tl.trans(k_decayed), v_n, state * tl.exp(gamma)[:, None], PRECISION)
        decay += gamma
    tl.store(ends + (i_bh * NSEG + i_s) * K * V + state_offsets, state, mask=state_mask)
    tl.store(seg_decay + (i_bh * NSEG + i_s) * K + rk, decay, mask=lam_mask)


@triton.jit
def segment_combine_kernel(
    ends, seg_decay, h0, hs, ht,  # ends [B, H, NSEG, K, V]; seg_decay [B, H, NSEG, K]; h0, ht [B, H, K, V];
    NSEG, K: tl.constexpr, V: tl.constexpr,  # hs [B, H, NSEG, K, V]: the state entering each segment
    BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr = False,
):
    """S_[n₀] of every segment by the recurrence over segments, S ← Diag(exp(λ)) S + U_end, from S_[0]
    (h0, or zero); the state after the last segment is the final state. All float32.

    REVERSE (the backward's state gradients, ``backward.segment_dstate_kernel``): the same walk from the
    last segment to the first, dS ← Diag(exp(λ)) dS + dU_start, from dS_[N] (h0 here: the final state's
    gradient, or zero): hs[s] = the gradient reaching the state that leaves segment s; ht = dS_[0]."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = rk[:, None] * V + rv[None, :]
    if USE_H0:
        state = tl.load(h0 + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    for t in range(NSEG):
        s = t
        if REVERSE:
            s = NSEG - 1 - t
        tl.store(hs + (i_bh * NSEG + s) * K * V + state_offsets, state, mask=state_mask)
        decay = tl.load(seg_decay + (i_bh * NSEG + s) * K + rk, mask=rk < K, other=0.0)
        end = tl.load(ends + (i_bh * NSEG + s) * K * V + state_offsets, mask=state_mask, other=0.0)
        state = state * tl.exp(decay)[:, None] + end
    if STORE_FINAL:
        tl.store(ht + i_bh * K * V + state_offsets, state, mask=state_mask)
