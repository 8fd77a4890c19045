"""The chunk-output kernel (chapters 6-7): every chunk's output at once, given the chunk states.

    O_n = scale · ( (Q_n ⊙ exp(G_n)) S_n  +  P_n V_n )          inter-chunk + intra-chunk

One program per (V block, chunk, head): chunks are independent once h holds S_n, so this is the
parallel half of the materialized forward. The intra-chunk scores P_n [C, C] are built over the K
blocks (``common.chunk_scores``: one guarded product, or secondary-level chunking when the chunk's
decay is too strong for it) and never leave the chip. Q ⊙ exp(G) serves both terms.

Bytes per program: q, k, g [C, K], v [C, BV] and the [K, BV] float32 state in, o [C, BV] out.
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import chunk_scores, load_gate, load_tile, mm, store_tile


@triton.jit
def chunk_output_kernel(
    q, k, v, g, h, o,  # q, k, g [B, T, H, K]; v, o [B, T, H, V]; h [B, H, N + 1, K, V] float32
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False,
):
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    v_base = v + (i_b * T * H + i_h) * V
    o_base = o + (i_b * T * H + i_h) * V
    h_base = h + (i_bh * (N + 1) + i_n) * K * V
    rv = i_v * BV + tl.arange(0, BV)
    row0 = i_n * C
    inter = tl.zeros((C, BV), dtype=tl.float32)
    P = tl.zeros((C, C), dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        q_n = load_tile(q_base, row0, i_k * BK, T, K, H * K, C, BK)
        k_n = load_tile(k_base, row0, i_k * BK, T, K, H * K, C, BK)
        G, _ = load_gate(g_base, row0, i_k * BK, T, K, H * K, C, BK, CUMULATIVE)
        qe = q_n * tl.exp(G)  # <= |q|: the past through S_n, and the chunk's own scores
        rk = i_k * BK + tl.arange(0, BK)
        S = tl.load(h_base + rk[:, None] * V + rv[None, :], mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0)
        inter = mm(qe, S, inter, PRECISION)
        P += chunk_scores(q_n, k_n, G, qe, C, L, BK, SPAN_MAX, PRECISION)
    v_n = load_tile(v_base, row0, i_v * BV, T, V, H * V, C, BV)
    out = scale * mm(P, v_n, inter, PRECISION)
    store_tile(o_base, out, row0, i_v * BV, T, V, H * V, C, BV)
