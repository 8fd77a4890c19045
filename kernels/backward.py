"""The backward kernels (chapter 7). Chunk states are recomputed, not stored by the forward.

In the book's notation (chapter 0: Λ_[n] = exp(G), Γ_[n] = exp(γ_[n] − G) with G the chunk-local
cumulative gate), with dS_[n+1] the gradient reaching the state that *leaves* chunk n (dh[n] below):

    dS_[n] = Diag(exp(γ_[n])) dS_[n+1] + scale · (q_[n] ⊙ Λ_[n])ᵀ do_[n]      reverse pass, sequential
    dv_[n] = (k_[n] ⊙ Γ_[n]) dS_[n+1] + scale · P_[n]ᵀ do_[n]
    dq_[n] = scale · Λ_[n] ⊙ (do_[n] S_[n]ᵀ)       + scale · intra(dP_[n] = do_[n] v_[n]ᵀ)
    dk_[n] = Γ_[n] ⊙ (v_[n] dS_[n+1]ᵀ)             + scale · intra(dP_[n])
    dg     = the gate-gradient trick (chapter 5), per chunk, grouped by the paths that cross t:
             reverse cumsum of (q ⊙ dq - k ⊙ dk_intra)  +  exclusive cumsum of k ⊙ dk_carry
             +  exp(γ_[n]) ⊙ Σ_v S_[n] ⊙ dS_[n+1]
(dk_carry = Γ_[n] ⊙ (v_[n] dS_[n+1]ᵀ), the keys' path into later chunks). Summing
q ⊙ dq - k ⊙ dk over the whole chunk and adding Σ_v S_[n+1] ⊙ dS_[n+1] is the same in exact
arithmetic, but subtracts large nearly equal sums under strong decay.

Launches of the segmented backward (CONFIG["bwd_segmented"] = True; section below): segment_state_kernel and
segment_combine_kernel (the states, as in the forward), segment_dstate_kernel and
segment_combine_kernel(REVERSE=True) (the state gradients), chunk_bwd_kernel (dq, dk, dg, and dv when the
key width fits one block; else chunk_bwd_dv_kernel), each chunk-parallel kernel followed by a launch for
the chunks flagged for the exact path. The sequential backward (CONFIG["bwd_segmented"] = False, the default):
chunk_cumsum_kernel (G, unless the forward kept it), chunk_state_kernel (recompute h),
chunk_state_backward_kernel (dh, dh0), chunk_dv_kernel, chunk_dqkg_kernel — the last two parallel over chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl
from glalearn.kernels.chunk_state import store_state
from glalearn.kernels.common import (
    chunk_score_grads,
    chunk_scores,
    decay_span,
    load_gate,
    load_rows,
    load_tile,
    mm,
    operand,
    store_tile,
    triangle_sum,
)


@triton.jit
def chunk_state_backward_kernel(
    q, g, do, dht, dh, dh0,  # q, g [B, T, H, K]; do [B, T, H, V]; dht, dh0 [B, H, K, V]; dh [B, H, N, K, V]
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr, CUMULATIVE: tl.constexpr = False,
):
    """dh[n] = dS_[n+1], walking the chunks from last to first; dh0 = dS_[0]."""
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
    """dv_[n] = (k_[n] ⊙ Γ_[n]) dS_[n+1] + scale · P_[n]ᵀ do_[n]: the output kernel, transposed."""
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
    h_base = h + (i_bh * (N + 1) + i_n) * K * V  # S_[n]
    dh_base = dh + (i_bh * N + i_n) * K * V  # dS_[n+1]
    dP = tl.zeros((C, C), dtype=tl.float32)
    dq_inter = tl.zeros((C, BK), dtype=tl.float32)
    dk_inter = tl.zeros((C, BK), dtype=tl.float32)
    through = tl.zeros((BK,), dtype=tl.float32)  # Σ_v S_[n] ⊙ dS_[n+1]
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
    # intra pairs and the reads of S_[n] (the i = j terms cancel exactly and are added after). Keys
    # before t that reach later chunks: an exclusive cumulative sum of k ⊙ dk_carry. S_[n] itself,
    # carried through the whole chunk: exp(γ) ⊙ Σ_v S_[n] ⊙ dS_[n+1].
    k_carry = k_n * dk_carry
    dg_n = (tl.cumsum(q_n * dq_n - scale * k_n * dk_intra, axis=0, reverse=True)
            + (tl.cumsum(k_carry, axis=0) - k_carry) + (tl.exp(gamma) * through)[None, :])
    rows = tl.arange(0, C)
    dP_diag = scale * tl.sum(tl.where(rows[:, None] == rows[None, :], dP, 0.0), axis=1)[:, None]
    store_tile(dq + off_k, dq_n + dP_diag * k_n, row0, i_k * BK, T, K, H * K, C, BK)
    store_tile(dk + off_k, dk_n + dP_diag * q_n, row0, i_k * BK, T, K, H * K, C, BK)
    store_tile(dg + off_k, dg_n, row0, i_k * BK, T, K, H * K, C, BK)


# ---------------------------------------------------------------------------------------------------
# The segmented backward (chapter 7): the forward's three ideas applied to the gradients.
#
# 1. The state gradients are a linear recurrence too, run backwards:
#        dS_[n] = Diag(exp(γ_[n])) dS_[n+1] + scale · (q_[n] ⊙ Λ_[n])ᵀ do_[n].
#    Cut the chunks into the forward's segments n0 .. n1 - 1. Walked from a zero gradient at the
#    segment's end, each segment gives its local gradients dU; the true one is
#        dS_[n+1] = dU_[n+1] + Diag(exp(λ′_[n])) dS_[n₁],    λ′_[n] = γ_[n+1] + ... + γ_[n₁−1],
#    with dS_[n₁] (the gradient reaching the state that leaves the segment) from a walk over the
#    segments in reverse (``segment_combine_kernel(REVERSE=True)``). ``segment_dstate_kernel`` writes dU
#    (bf16 where the products round to bf16 anyway) and λ′.
# 2. The chunk states S_[n] are recomputed the forward's way (segment-local U_[n] and λ_[n], entering states).
# 3. One chunk-parallel kernel, ``chunk_bwd_kernel``, forms S_[n] and dS_[n+1] on the chip and computes dq,
#    dk, dg (and dv, when the whole key width fits one block), with the intra-chunk scores as single
#    products; the gates are scanned on the tensor cores inside it (no G round trip), and the cumulative
#    sums of the gate gradient are products with triangles of ones. Chunks whose decay span rules the
#    product out are flagged and redone exactly by a second, mostly idle launch (FALLBACK="flagged").
# ---------------------------------------------------------------------------------------------------


@triton.jit
def segment_dstate_kernel(
    q, g, do, dh, lamb, ends,
    # q, g [B, T, H, K]; do [B, T, H, V]; dh [B, H, N, K, V] (any float dtype): dU, the segment-local
    # gradient reaching the state that leaves chunk n; lamb [B, H, N, K] float32: λ′_[n]; ends [B, H, NSEG, K, V]
    scale, T, SEG, NSEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, SCAN: tl.constexpr,
):
    """One program per (K block, V block, head, segment): the segment's chunks from last to first,
    from a zero gradient; ends[segment] = its contribution to the gradient of the state entering it."""
    i_k, i_v, i_x = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_bh, i_s = i_x // NSEG, i_x % NSEG
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    q_base = q + (i_b * T * H + i_h) * K
    g_base = g + (i_b * T * H + i_h) * K
    do_base = do + (i_b * T * H + i_h) * V
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    state_mask = (rk < K)[:, None] & (rv < V)[None, :]
    state_offsets = rk[:, None] * V + rv[None, :]
    lam_mask = rk < tl.where(i_v == 0, K, 0)  # the V blocks of a K block share λ′: the first writes it
    n0 = i_s * SEG
    n1 = tl.minimum(n0 + SEG, N)
    d_state = tl.zeros((BK, BV), dtype=tl.float32)
    decay = tl.zeros((BK,), dtype=tl.float32)  # λ′_[n]
    for m in range(n1 - n0):
        n = n1 - 1 - m
        store_state(dh + (i_bh * N + n) * K * V + state_offsets, d_state, state_mask, PRECISION)
        tl.store(lamb + (i_bh * N + n) * K + rk, decay, mask=lam_mask)
        q_n = load_tile(q_base, n * C, i_k * BK, T, K, H * K, C, BK)
        do_n = load_rows(do_base, n * C, i_v * BV, T, V, H * V, C, BV)
        G, gamma = load_gate(g_base, n * C, i_k * BK, T, K, H * K, C, BK, False, SCAN)
        d_state = mm(tl.trans(scale * q_n * tl.exp(G)), do_n, d_state * tl.exp(gamma)[:, None], PRECISION)
        decay += gamma
    tl.store(ends + (i_bh * NSEG + i_s) * K * V + state_offsets, d_state, mask=state_mask)


@triton.jit
def chunk_bwd_kernel(
    q, k, v, g, do, h, lam, hs, dh, lamb, dhs, dq, dk, dv, dg, flags,
    # q, k, g, dq, dk, dg [B, T, H, K]; v, do, dv [B, T, H, V]; h, dh [B, H, N, K, V]: U_[n], dU_[n];
    # lam, lamb [B, H, N, K]: λ_[n], λ′_[n]; hs, dhs [B, H, NSEG, K, V] float32: the state entering each
    # segment and the gradient reaching the state leaving it; flags [B, H, N, K / BK] int32
    scale, T, SEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, INTRA_PRECISION: tl.constexpr, SCAN: tl.constexpr,
    DG_SCAN: tl.constexpr, FUSE_DV: tl.constexpr, FALLBACK: tl.constexpr, TOTAL=0,
    FLAG_BLOCK: tl.constexpr = 16,
):
    """dq, dk, dg of one (K block, chunk, head), the V dimension walked in blocks; FUSE_DV (one K block
    holds the whole key width): dv of the chunk too.

    FALLBACK as in ``chunk_output_kernel``: "inline" (guarded scores, both paths in this program),
    "defer" (the single products only; flags[chunk, K block] = 1 where the span ruled them out) or
    "flagged" (the launch after a "defer" one: FLAG_BLOCK flags per program, the flagged chunks redone
    exactly, overwriting what the fast launch stored)."""
    NK: tl.constexpr = (K + BK - 1) // BK
    N = tl.cdiv(T, C)
    if FALLBACK == "flagged":
        first = tl.program_id(0).to(tl.int64) * FLAG_BLOCK
        ids = first + tl.arange(0, FLAG_BLOCK)
        flagged = tl.load(flags + ids, mask=ids < TOTAL, other=0)
        if tl.max(flagged, axis=0) != 0:
            for j in range(FLAG_BLOCK):
                idx = first + j  # flagged[j] (a masked sum: 0 past the last entry)
                if tl.sum(tl.where(tl.arange(0, FLAG_BLOCK) == j, flagged, 0), axis=0) != 0:
                    chunk_grads(q, k, v, g, do, h, lam, hs, dh, lamb, dhs, dq, dk, dv, dg, flags,
                                idx % NK, (idx // NK) % N, idx // (NK * N), scale, T, SEG, H, K, V, C, L, BK, BV,
                                SPAN_MAX, PRECISION, INTRA_PRECISION, SCAN, DG_SCAN, FUSE_DV, True)
    else:
        chunk_grads(q, k, v, g, do, h, lam, hs, dh, lamb, dhs, dq, dk, dv, dg, flags,
                    tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), scale, T, SEG,
                    H, K, V, C, L, BK, BV, SPAN_MAX, PRECISION, INTRA_PRECISION, SCAN, DG_SCAN, FUSE_DV,
                    FALLBACK == "inline")


@triton.jit
def segment_states(h, lam, hs, i_bh, i_n, rk, rv, N, SEG, K: tl.constexpr, V: tl.constexpr):
    """A [BK, BV] block of U_[n] + exp(λ_[n]) ⊙ S_[n₀] (the forward's S_[n]; with the backward's dU, λ′, dS_[n₁]:
    dS_[n+1]), float32."""
    NSEG = tl.cdiv(N, SEG)
    mask = (rk < K)[:, None] & (rv < V)[None, :]
    offsets = rk[:, None] * V + rv[None, :]
    local = tl.load(h + (i_bh * N + i_n) * K * V + offsets, mask=mask, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(lam + (i_bh * N + i_n) * K + rk, mask=rk < K, other=0.0))
    carried = tl.load(hs + (i_bh * NSEG + i_n // SEG) * K * V + offsets, mask=mask, other=0.0)
    return local + decay[:, None] * carried


@triton.jit
def chunk_grads(q, k, v, g, do, h, lam, hs, dh, lamb, dhs, dq, dk, dv, dg, flags, i_k, i_n, i_bh, scale, T, SEG,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, L: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr,
                INTRA_PRECISION: tl.constexpr, SCAN: tl.constexpr, DG_SCAN: tl.constexpr,
                FUSE_DV: tl.constexpr, EXACT: tl.constexpr):
    """One chunk's gradients (see ``chunk_bwd_kernel`` and the formulas at the top of this file).
    EXACT: guarded intra-chunk scores with the secondary-level fallback; otherwise single products.

    Registers decide the speed of this kernel, so tiles that only feed products are kept as the
    products' operands (bf16 where the products round to bf16: half the registers), and q, k are
    loaded again at the end (from cache) rather than held through the V loop."""
    NK: tl.constexpr = (K + BK - 1) // BK
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    off_k = (i_b * T * H + i_h) * K
    off_v = (i_b * T * H + i_h) * V
    row0 = i_n * C
    rows = tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    G, gamma = load_gate(g + off_k, row0, i_k * BK, T, K, H * K, C, BK, False, SCAN)
    q_n = load_tile(q + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    k_n = load_tile(k + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    qe = q_n * tl.exp(G)  # <= |q|
    if not EXACT:
        span = decay_span(G)
        ke = operand(k_n * tl.exp(-G), INTRA_PRECISION)  # <= |k| e^span: only where the span allows it
    if FUSE_DV:  # dv_[n] = (k_[n] ⊙ Γ_[n]) dS_[n+1] + scale · P_[n]ᵀ do_[n], first and on its own
        if EXACT:
            P = scale * chunk_scores(q_n, k_n, G, qe, C, L, BK, SPAN_MAX, PRECISION)
        else:
            P = mm(qe, tl.trans(ke), tl.zeros((C, C), dtype=tl.float32), PRECISION)
            P = tl.where(rows[:, None] >= rows[None, :], scale * P, 0.0)
        P = operand(tl.trans(P), PRECISION)
        kd = operand(k_n * tl.exp(gamma[None, :] - G), PRECISION)  # K ⊙ exp(γ - G), <= |k|
        for i_v in range(tl.cdiv(V, BV)):
            rv = i_v * BV + tl.arange(0, BV)
            dS = segment_states(dh, lamb, dhs, i_bh, i_n, rk, rv, N, SEG, K, V)
            do_b = load_rows(do + off_v, row0, i_v * BV, T, V, H * V, C, BV)
            dv_b = mm(P, do_b, mm(kd, dS, tl.zeros((C, BV), dtype=tl.float32), PRECISION), PRECISION)
            store_tile(dv + off_v, dv_b, row0, i_v * BV, T, V, H * V, C, BV)
    qe_op = operand(qe, INTRA_PRECISION)
    dP = tl.zeros((C, C), dtype=tl.float32)
    acc_q = tl.zeros((C, BK), dtype=tl.float32)  # do_[n] S_[n]ᵀ (+ the intra part below)
    acc_k = tl.zeros((C, BK), dtype=tl.float32)  # v_[n] dS_[n+1]ᵀ
    through = tl.zeros((BK,), dtype=tl.float32)  # Σ_v S_[n] ⊙ dS_[n+1]
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        S = segment_states(h, lam, hs, i_bh, i_n, rk, rv, N, SEG, K, V)
        dS = segment_states(dh, lamb, dhs, i_bh, i_n, rk, rv, N, SEG, K, V)
        do_b = load_rows(do + off_v, row0, i_v * BV, T, V, H * V, C, BV)
        v_b = load_rows(v + off_v, row0, i_v * BV, T, V, H * V, C, BV)
        dP = mm(do_b, tl.trans(v_b), dP, PRECISION)
        acc_q = mm(do_b, tl.trans(S), acc_q, PRECISION)
        acc_k = mm(v_b, tl.trans(dS), acc_k, PRECISION)
        through += tl.sum(S * dS, axis=1)
    diag = scale * tl.sum(tl.where(rows[:, None] == rows[None, :], dP, 0.0), axis=1)[:, None]
    # Stored one after the other (fewer tiles alive at once): dq, dk, then dg, the gate gradient grouped
    # by the paths that cross each position (see the top of this file): the reverse cumsum of
    # q ⊙ dq - k ⊙ dk_intra, the exclusive cumsum of k ⊙ dk_carry, and exp(γ) Σ_v S_[n] ⊙ dS_[n+1].
    q_n = load_tile(q + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    k_n = load_tile(k + off_k, row0, i_k * BK, T, K, H * K, C, BK)
    if EXACT:
        dq_intra, dk_intra = chunk_score_grads(dP, q_n, k_n, G, qe, C, L, BK, SPAN_MAX, INTRA_PRECISION)
        dq_n = scale * (acc_q * tl.exp(G) + dq_intra)
    else:
        dP = tl.where(rows[:, None] > rows[None, :], dP, 0.0)
        dq_n = scale * tl.exp(G) * mm(dP, ke, acc_q, INTRA_PRECISION)
        tl.store(flags + (i_bh * N + i_n) * NK + i_k, (span > SPAN_MAX).to(tl.int32))
    store_tile(dq + off_k, dq_n + diag * k_n, row0, i_k * BK, T, K, H * K, C, BK)
    within = q_n * dq_n
    if not EXACT:
        dk_intra = tl.exp(-G) * mm(tl.trans(dP), qe_op, tl.zeros((C, BK), dtype=tl.float32), INTRA_PRECISION)
    within -= scale * k_n * dk_intra
    dk_carry = acc_k * tl.exp(gamma[None, :] - G)  # through the state leaving the chunk
    store_tile(dk + off_k, dk_carry + scale * dk_intra + diag * q_n, row0, i_k * BK, T, K, H * K, C, BK)
    k_carry = k_n * dk_carry
    if DG_SCAN == "cumsum":
        dg_n = tl.cumsum(within, axis=0, reverse=True) + (tl.cumsum(k_carry, axis=0) - k_carry)
    else:
        dg_n = triangle_sum(within, tl.zeros((C, BK), dtype=tl.float32), C, "reverse", DG_SCAN)
        dg_n = triangle_sum(k_carry, dg_n, C, "exclusive", DG_SCAN)
    dg_n += (tl.exp(gamma) * through)[None, :]
    store_tile(dg + off_k, dg_n, row0, i_k * BK, T, K, H * K, C, BK)


@triton.jit
def chunk_bwd_dv_kernel(
    q, k, g, do, dh, lamb, dhs, dv, flags,  # as in chunk_bwd_kernel; flags [B, H, N] int32
    scale, T, SEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, SCAN: tl.constexpr, FALLBACK: tl.constexpr, TOTAL=0,
    FLAG_BLOCK: tl.constexpr = 16,
):
    """dv_[n] = (k_[n] ⊙ Γ_[n]) dS_[n+1] + scale · P_[n]ᵀ do_[n] for one (V block, chunk, head), the K
    dimension walked in blocks: the dv of ``chunk_bwd_kernel`` for keys wider than one block.
    FALLBACK as there ("flagged": program_id(0) owns FLAG_BLOCK chunks, program_id(1) is the V block)."""
    N = tl.cdiv(T, C)
    if FALLBACK == "flagged":
        first = tl.program_id(0).to(tl.int64) * FLAG_BLOCK
        ids = first + tl.arange(0, FLAG_BLOCK)
        flagged = tl.load(flags + ids, mask=ids < TOTAL, other=0)
        if tl.max(flagged, axis=0) != 0:
            for j in range(FLAG_BLOCK):
                idx = first + j
                if tl.sum(tl.where(tl.arange(0, FLAG_BLOCK) == j, flagged, 0), axis=0) != 0:
                    chunk_dv(q, k, g, do, dh, lamb, dhs, dv, flags, tl.program_id(1), idx % N, idx // N,
                             scale, T, SEG, H, K, V, C, L, BK, BV, SPAN_MAX, PRECISION, SCAN, True)
    else:
        chunk_dv(q, k, g, do, dh, lamb, dhs, dv, flags, tl.program_id(0), tl.program_id(1),
                 tl.program_id(2).to(tl.int64), scale, T, SEG, H, K, V, C, L, BK, BV, SPAN_MAX, PRECISION,
                 SCAN, FALLBACK == "inline")


@triton.jit
def chunk_dv(q, k, g, do, dh, lamb, dhs, dv, flags, i_v, i_n, i_bh, scale, T, SEG, H: tl.constexpr,
             K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr, SCAN: tl.constexpr,
             EXACT: tl.constexpr):
    """One chunk's dv block (see ``chunk_bwd_dv_kernel``)."""
    i_b, i_h = i_bh // H, i_bh % H
    N = tl.cdiv(T, C)
    off_k = (i_b * T * H + i_h) * K
    off_v = (i_b * T * H + i_h) * V
    row0 = i_n * C
    rows = tl.arange(0, C)
    rv = i_v * BV + tl.arange(0, BV)
    inter = tl.zeros((C, BV), dtype=tl.float32)
    P = tl.zeros((C, C), dtype=tl.float32)
    span = 0.0
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        q_n = load_tile(q + off_k, row0, i_k * BK, T, K, H * K, C, BK)
        k_n = load_tile(k + off_k, row0, i_k * BK, T, K, H * K, C, BK)
        G, gamma = load_gate(g + off_k, row0, i_k * BK, T, K, H * K, C, BK, False, SCAN)
        dS = segment_states(dh, lamb, dhs, i_bh, i_n, rk, rv, N, SEG, K, V)
        inter = mm(k_n * tl.exp(gamma[None, :] - G), dS, inter, PRECISION)
        qe = q_n * tl.exp(G)
        if EXACT:
            P += chunk_scores(q_n, k_n, G, qe, C, L, BK, SPAN_MAX, PRECISION)
        else:
            span = tl.maximum(span, decay_span(G))
            P = mm(qe, tl.trans(k_n * tl.exp(-G)), P, PRECISION)
    if not EXACT:
        P = tl.where(rows[:, None] >= rows[None, :], P, 0.0)
        tl.store(flags + i_bh * N + i_n, (span > SPAN_MAX).to(tl.int32))
    do_n = load_rows(do + off_v, row0, i_v * BV, T, V, H * V, C, BV)
    store_tile(dv + off_v, mm(tl.trans(scale * P), do_n, inter, PRECISION), row0, i_v * BV, T, V, H * V, C, BV)
