"""The backward kernels (chapter 7). Chunk states are recomputed by ``chunk_state_kernel``, not stored.

With dS_{n+1} the gradient reaching the state that *leaves* chunk n (dh[n] below):

    dS_n  = Diag(exp(γ_n)) dS_{n+1} + scale · (Q_n ⊙ exp(G_n))^T dO_n        reverse pass, sequential
    dV_n  = (K_n ⊙ exp(γ_n - G_n)) dS_{n+1} + scale · P_n^T dO_n
    dQ_n  = scale · exp(G_n) ⊙ (dO_n S_n^T)          + scale · intra(dP_n = dO_n V_n^T)
    dK_n  = exp(γ_n - G_n) ⊙ (V_n dS_{n+1}^T)        + scale · intra(dP_n)
    dg    = the gate-gradient trick (chapter 5), per chunk, grouped by the paths that cross t:
            reverse cumsum of (q ⊙ dq - k ⊙ dk_intra)  +  exclusive cumsum of k ⊙ dk_carry
            +  exp(γ_n) ⊙ Σ_v S_n ⊙ dS_{n+1}
(dk_carry = exp(γ_n - G_n) ⊙ (V_n dS_{n+1}^T), the keys' path into later chunks). Summing
q ⊙ dq - k ⊙ dk over the whole chunk and adding Σ_v S_{n+1} ⊙ dS_{n+1} is the same in exact
arithmetic, but subtracts large nearly equal sums under strong decay.

Launches: chunk_cumsum_kernel (G, unless the forward kept it), chunk_state_kernel (recompute h),
chunk_state_backward_kernel (dh, dh0), chunk_dv_kernel, chunk_dqkg_kernel — the last two parallel
over chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.common import chunk_score_grads, chunk_scores, load_gate, load_tile, mm, store_tile


@triton.jit
def chunk_state_backward_kernel(
    q, g, do, dht, dh, dh0,  # q, g [B, T, H, K]; do [B, T, H, V]; dht, dh0 [B, H, K, V]; dh [B, H, N, K, V]
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False,
):
    """dh[n] = dS_{n+1}, walking the chunks from last to first; dh0 = dS_0."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    do_base = do + (i_b * T * H + i_h) * V
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = rk[:, None] * V + rv[None, :]
    dh_base = dh + i_bh * N * K * V
    if USE_DHT:
        d_state = tl.load(dht + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        d_state = tl.zeros((BK, BV), dtype=tl.float32)
    for m in range(N):
        n = N - 1 - m
        tl.store(dh_base + n * K * V + state_offsets, d_state, mask=state_mask)
        q_n = load_tile(q_base, n * C, i_k * BK, T, K, H * K, C, BK)
        do_n = load_tile(do_base, n * C, i_v * BV, T, V, H * V, C, BV)
        G, gamma = load_gate(g_base, n * C, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, "cumsum")
        q_decayed = scale * q_n * tl.exp(G)
        d_state = mm(tl.trans(q_decayed), do_n, d_state * tl.exp(gamma)[:, None], PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_bh * K * V + state_offsets, d_state, mask=state_mask)


@triton.jit
def chunk_dv_kernel(
    q, k, g, do, dh, dv,  # q, k, g [B, T, H, K]; do, dv [B, T, H, V]; dh [B, H, N, K, V] float32
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False,
):
    """dV_n = (K_n ⊙ exp(γ_n - G_n)) dS_{n+1} + scale · P_n^T dO_n: the output kernel, transposed."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    k_base = k + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    do_base = do + (i_b * T * H + i_h) * V
    dv_base = dv + (i_b * T * H + i_h) * V
    dh_base = dh + (i_bh * N + i_n) * K * V
    rv = i_v * BV + tl.arange(0, BV)
    row0 = i_n * C
    inter = tl.zeros((C, BV), dtype=tl.float32)
    P = tl.zeros((C, C), dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        q_n = load_tile(q_base, row0, i_k * BK, T, K, H * K, C, BK)
        k_n = load_tile(k_base, row0, i_k * BK, T, K, H * K, C, BK)
        G, gamma = load_gate(g_base, row0, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, "cumsum")
        rk = i_k * BK + tl.arange(0, BK)
        dS = tl.load(dh_base + rk[:, None] * V + rv[None, :], mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0)
        inter = mm(k_n * tl.exp(gamma[None, :] - G), dS, inter, PRECISION)
        P += chunk_scores(q_n, k_n, G, q_n * tl.exp(G), C, L, BK, SPAN_MAX, PRECISION)
    do_n = load_tile(do_base, row0, i_v * BV, T, V, H * V, C, BV)
    out = mm(tl.trans(scale * P), do_n, inter, PRECISION)
    store_tile(dv_base, out, row0, i_v * BV, T, V, H * V, C, BV)


@triton.jit
def chunk_dqkg_kernel(
    q, k, v, g, do, h, dh, dq, dk, dg,  # [B, T, H, K|V] tensors; h [B, H, N + 1, K, V]; dh [B, H, N, K, V]
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, INTRA_PRECISION: tl.constexpr,
    CUMULATIVE: tl.constexpr = False,
):
    """dq, dk and dg for one (K block, chunk, head); the V dimension is walked in blocks.

    PRECISION: of the products with the states and of dP; INTRA_PRECISION: of the intra-chunk score
    gradients, whose pairs cancel in the gate gradient (so they may need more mantissa bits).
    """
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    off_k = (i_b * T * H + i_h) * K
    off_v = (i_b * T * H + i_h) * V
    row0 = i_n * C
    q_n = load_tile(q + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    k_n = load_tile(k + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    G, gamma = load_gate(g + off_k, row0, i_k * BK, T, K, H * K, C, BK, CUMULATIVE, "cumsum")
    rk = i_k * BK + tl.arange(0, BK)
    h_base = h + (i_bh * (N + 1) + i_n) * K * V  # S_n
    dh_base = dh + (i_bh * N + i_n) * K * V  # dS_{n+1}
    dP = tl.zeros((C, C), dtype=tl.float32)
    dq_inter = tl.zeros((C, BK), dtype=tl.float32)
    dk_inter = tl.zeros((C, BK), dtype=tl.float32)
    through = tl.zeros((BK,), dtype=tl.float32)  # Σ_v S_n ⊙ dS_{n+1}
    for i_v in range(tl.cdiv(V, BV)):
        do_n = load_tile(do + off_v, row0, i_v * BV, T, V, H * V, C, BV)
        v_n = load_tile(v + off_v, row0, i_v * BV, T, V, H * V, C, BV)
        rv = i_v * BV + tl.arange(0, BV)
        mask = (rk < K)[:, None] & (rv < V)[None, :]
        offsets = rk[:, None] * V + rv[None, :]
        S = tl.load(h_base + offsets, mask=mask, other=0.0)
        dS = tl.load(dh_base + offsets, mask=mask, other=0.0)
        dP = mm(do_n, tl.trans(v_n), dP, PRECISION)
        dq_inter = mm(do_n, tl.trans(S), dq_inter, PRECISION)
        dk_inter = mm(v_n, tl.trans(dS), dk_inter, PRECISION)
        through += tl.sum(S * dS, axis=1)
    e_G = tl.exp(G)
    dq_intra, dk_intra = chunk_score_grads(dP, q_n, k_n, G, q_n * e_G, C, L, BK, SPAN_MAX, INTRA_PRECISION)
    dq_n = scale * (dq_inter * e_G + dq_intra)
    dk_carry = dk_inter * tl.exp(gamma[None, :] - G)  # through the state leaving the chunk
    dk_n = dk_carry + scale * dk_intra
    # The gate-gradient trick, grouped so that nothing large cancels: g_t scales every path that
    # crosses position t. Within the chunk: the reverse cumulative sum of q ⊙ dq - k ⊙ dk over the
    # intra pairs and the reads of S_n (the i = j terms cancel exactly and are added after). Keys
    # before t that reach later chunks: an exclusive cumulative sum of k ⊙ dk_carry. S_n itself,
    # carried through the whole chunk: exp(γ) ⊙ Σ_v S_n ⊙ dS_{n+1}.
    k_carry = k_n * dk_carry
    dg_n = (tl.cumsum(q_n * dq_n - scale * k_n * dk_intra, axis=0, reverse=True)
            + (tl.cumsum(k_carry, axis=0) - k_carry) + (tl.exp(gamma) * through)[None, :])
    rows = tl.arange(0, C)
    dP_diag = scale * tl.sum(tl.where(rows[:, None] == rows[None, :], dP, 0.0), axis=1)[:, None]
    store_tile(dq + off_k, dq_n + dP_diag * k_n, row0, i_k * BK, T, K, H * K, C, BK)
    store_tile(dk + off_k, dk_n + dP_diag * q_n, row0, i_k * BK, T, K, H * K, C, BK)
    store_tile(dg + off_k, dg_n, row0, i_k * BK, T, K, H * K, C, BK)
