"""The chunk-state kernel (chapter 6): the only sequential pass of the materialized forward.

    S_{n+1} = Diag(exp(γ_n)) S_n + (K_n ⊙ exp(γ_n - G_n))^T V_n          (chapter 3's recurrence)

One program owns one [BK, BV] block of one head's state and walks the N chunks in order, keeping the
block in registers (float32) and writing every state it passes: h[n] = S_n, the state *entering*
chunk n, for n = 0 .. N (h[N] is the final state). The K and V blocks are independent (the decay is
per key channel), so a head's state is split over (K / BK) x (V / BV) programs.

Bytes per chunk and program: k, g [C, BK] and v [C, BV] in, one [BK, BV] float32 state out.
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import load_gate, load_tile, mm, store_tile


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
        G, gamma = load_gate(g_base, n * C, i_k * BK, T, K, H * K, C, BK, CUMULATIVE)
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
