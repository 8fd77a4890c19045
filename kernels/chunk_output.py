"""The chunk-output kernel (chapters 6-7): every chunk's output at once, given the chunk states.

    o_[n] = scale · ( (q_[n] ⊙ Λ_[n]) S_[n]  +  P_[n] v_[n] )          inter-chunk + intra-chunk

One program per (V block, chunk, head): chunks are independent once h holds S_[n], so this is the
parallel half of the materialized forward. The intra-chunk scores P_[n] [C, C] are built over the K
blocks (``common.chunk_scores``: one guarded product, or secondary-level chunking when the chunk's
decay is too strong for it) and never leave the chip. Q ⊙ exp(G) serves both terms.

Bytes per program: q, k, g [C, K], v [C, BV] and the [K, BV] state in, o [C, BV] out (plus, on the
segmented path, the segment's entering state, shared by its chunks).
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import chunk_scores, decay_span, load_gate, load_tile, mm, store_tile


@triton.jit
def chunk_output_kernel(
    q, k, v, g, h, o,  # q, k, g [B, T, H, K]; v, o [B, T, H, V]; h [B, H, N + 1, K, V] float32
    hs, lam, flags,  # SEGMENTED: hs [B, H, NSEG, K, V], lam [B, H, N, K] float32; flags [B, H, N] int32
    scale, T, SEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr, SCAN: tl.constexpr,
    SEGMENTED: tl.constexpr, FALLBACK: tl.constexpr, TOTAL=0, FLAG_BLOCK: tl.constexpr = 16,
):
    """SEGMENTED: h holds the segment-local states U_[n] [B, H, N, K, V] (any float dtype) of
    ``segment_state_kernel``, and S_[n] = U_[n] + exp(λ_[n]) ⊙ S_[n₀] is formed here, with S_[n₀] = hs[n // SEG]
    from ``segment_combine_kernel``. Otherwise h holds S_[0] … S_[N] of ``chunk_state_kernel``.

    FALLBACK, where the chunks that need the exact secondary-level path are handled:
      "inline"  — in this program (``common.chunk_scores``: both paths compiled into one kernel);
      "defer"   — not here: the scores are the single product, and flags[chunk] records whether the
                  chunk's decay span allowed it. The fast kernel then holds only what the product path
                  needs (the secondary path's tiles set the register count of the whole kernel, and
                  with it how many programs share an SM);
      "flagged" — the second launch after a "defer" one: its programs own FLAG_BLOCK consecutive
                  chunks each (of all B·H·N), load their flags at once, and recompute the flagged
                  chunks inline, overwriting o. Few programs: a launch of one program per chunk, each
                  holding the exact path's registers only to read a flag, cost 37 µs at P1 (H200).
    """
    N = tl.cdiv(T, C)
    if FALLBACK == "flagged":  # program_id(0): the block of flags (the grid's widest axis), (1): the V block
        i_v = tl.program_id(1)
        first = tl.program_id(0).to(tl.int64) * FLAG_BLOCK
        ids = first + tl.arange(0, FLAG_BLOCK)
        flagged = tl.load(flags + ids, mask=ids < TOTAL, other=0)
        if tl.max(flagged, axis=0) != 0:
            for j in range(FLAG_BLOCK):
                idx = first + j  # flagged[j] (a masked sum: 0 past the last chunk)
                if tl.sum(tl.where(tl.arange(0, FLAG_BLOCK) == j, flagged, 0), axis=0) != 0:
                    chunk_output(q, k, v, g, h, o, hs, lam, flags, i_v, idx % N, idx // N, scale, T, SEG,
                                 H, K, V, C, L, BK, BV, SPAN_MAX, PRECISION, CUMULATIVE, SCAN,
                                 SEGMENTED, True)
    else:
        i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        chunk_output(q, k, v, g, h, o, hs, lam, flags, i_v, i_n, i_bh, scale, T, SEG, H, K, V, C, L, BK, BV,
                     SPAN_MAX, PRECISION, CUMULATIVE, SCAN, SEGMENTED, FALLBACK == "inline")


@triton.jit
def chunk_output(q, k, v, g, h, o, hs, lam, flags, i_v, i_n, i_bh, scale, T, SEG, H: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr,
                 CUMULATIVE: tl.constexpr, SCAN: tl.constexpr, SEGMENTED: tl.constexpr, EXACT: tl.constexpr):
    """One chunk's output (see ``chunk_output_kernel``). EXACT: guarded scores with the secondary-level
    fallback; otherwise the single product, and flags[chunk] = 1 where its span exceeds SPAN_MAX."""
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    v_base = v + (i_b * T * H + i_h) * V
    o_base = o + (i_b * T * H + i_h) * V
    if SEGMENTED:
        h_base = h + (i_bh * N + i_n) * K * V
        NSEG = tl.cdiv(N, SEG)
        hs_base = hs + (i_bh * NSEG + i_n // SEG) * K * V
    else:
        h_base = h + (i_bh * (N + 1) + i_n) * K * V
    rv = i_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    row0 = i_n * C
    inter = tl.zeros((C, BV), dtype=tl.float32)
    P = tl.zeros((C, C), dtype=tl.float32)
    span = 0.0
    for i_k in range(tl.cdiv(K, BK)):
        q_n = load_tile(q_base, row0, i_k * BK, T, K, H * K, C, BK)
        k_n = load_tile(k_base, row0, i_k * BK, T, K, H * K, C, BK)
        G, _ = load_gate(g_base, row0, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, SCAN)
        qe = q_n * tl.exp(G)  # <= |q|: the past through S_[n], and the chunk's own scores
        rk = i_k * BK + tl.arange(0, BK)
        state_offsets = rk[:, None] * V + rv[None, :]
        state_mask = (rk < K)[:, None] & (rv < V)[None, :]
        S = tl.load(h_base + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
        if SEGMENTED:  # S_[n] = U_[n] + exp(λ_[n]) ⊙ S_[n₀]
            decay = tl.load(lam + (i_bh * N + i_n) * K + rk, mask=rk < K, other=0.0)
            S += tl.exp(decay)[:, None] * tl.load(hs_base + state_offsets, mask=state_mask, other=0.0)
        inter = mm(qe, S, inter, PRECISION)
        if EXACT:
            P += chunk_scores(q_n, k_n, G, qe, C, L, BK, SPAN_MAX, PRECISION)
        else:
            span = tl.maximum(span, decay_span(G))
            P = mm(qe, tl.trans(k_n * tl.exp(-G)), P, PRECISION)
    if not EXACT:
        P = tl.where(rows[:, None] >= rows[None, :], P, 0.0)
        tl.store(flags + i_bh * N + i_n, (span > SPAN_MAX).to(tl.int32))
    v_n = load_tile(v_base, row0, i_v * BV, T, V, H * V, C, BV)
    out = scale * mm(P, v_n, inter, PRECISION)
    store_tile(o_base, out, row0, i_v * BV, T, V, H * V, C, BV)
