"""The non-materialized (fused) forward kernel (chapter 7): the state never leaves the chip.

One program per (V block, head) walks the chunks in order, holding the [K, BV] state in registers:

    o_[n]   = scale · ( (q_[n] ⊙ Λ_[n]) S_[n] + P_[n] v_[n] )
    S_[n+1] = Diag(exp(γ_[n])) S_[n] + (k_[n] ⊙ Γ_[n])ᵀ v_[n]

It moves the fewest bytes (q, k, v, g in, o out: no chunk states), but only B·H·(V / BV) programs
run, each sequential over T / C chunks: enough parallelism only when B·H is large.
The whole K dimension lives in one block (BK = next power of two >= K).
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import chunk_scores, last_row, load_tile, mm, store_tile


@triton.jit
def fused_forward_kernel(
    q, k, v, g, h0, o, ht,  # q, k, g [B, T, H, K]; v, o [B, T, H, V]; h0, ht [B, H, K, V] float32
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    v_base = v + (i_b * T * H + i_h) * V
    o_base = o + (i_b * T * H + i_h) * V
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = i_bh * K * V + rk[:, None] * V + rv[None, :]
    if USE_H0:
        state = tl.load(h0 + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    for n in range(N):
        q_n = load_tile(q_base, n * C, 0, T, K, H * K, C, BK)
        k_n = load_tile(k_base, n * C, 0, T, K, H * K, C, BK)
        g_n = load_tile(g_base, n * C, 0, T, K, H * K, C, BK)
        v_n = load_tile(v_base, n * C, i_v * BV, T, V, H * V, C, BV)
        G = tl.cumsum(g_n, axis=0)
        gamma = last_row(G, C)
        qe = q_n * tl.exp(G)
        P = chunk_scores(q_n, k_n, G, qe, C, L, BK, SPAN_MAX, PRECISION)
        inter = mm(qe, state, tl.zeros((C, BV), dtype=tl.float32), PRECISION)
        out = scale * mm(P, v_n, inter, PRECISION)
        store_tile(o_base, out, n * C, i_v * BV, T, V, H * V, C, BV)
        k_decayed = k_n * tl.exp(gamma[None, :] - G)
        state = mm(tl.trans(k_decayed), v_n, state * tl.exp(gamma)[:, None], PRECISION)
    if STORE_FINAL:
        tl.store(ht + state_offsets, state, mask=state_mask)
