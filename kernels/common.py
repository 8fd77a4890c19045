"""Building blocks every GLA kernel shares (chapters 6-7): loading a chunk, its cumulative gate, and
the intra-chunk scores by secondary-level chunking.

All helpers are ``@triton.jit`` functions, inlined into the kernels that call them. They work on
register tiles of one chunk: C rows (tokens) by a block of BK channels. Everything is float32 inside,
whatever the input dtype; only the matrix products may round their operands (``PRECISION``).

Notation (as in ``glalearn/forms/chunk.py`` and ``two_level.py``):

    G_i = g_1 + ... + g_i           the chunk-local cumulative log decay (inclusive), per channel
    P[i, j] = Σ_k q_ik k_jk exp(G_ik - G_jk),  j <= i        the intra-chunk scores ("A" in fla)

The chunk of C rows is split into NS = C / L sub-chunks of L rows. A pair of *different* sub-chunks
(query sub-chunk a after key sub-chunk b) is a matrix product of bounded operands, with
    exp(G_i - G_j) = exp(G_i - F_a) · exp(F_a - E_b) · exp(E_b - G_j)
where F_a is G at the first row of sub-chunk a and E_b is G at the last row of sub-chunk b: every
factor is <= 1 because G only decreases. The diagonal sub-chunks stay in float32 log space, one exp
per (i, j, k), with the exponent masked to -inf *before* the exp wherever it could be positive.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(base, row0, col0, T, D, stride_t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows row0..row0+ROWS, columns col0..col0+COLS of a [T, D] matrix with row stride ``stride_t``.

    Rows past T and columns past D read as 0 (so a padded gate is g = 0: no decay). Returns float32.
    """
    rows = row0 + tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, COLS)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    x = tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_tile(base, x, row0, col0, T, D, stride_t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Write the valid part (rows < T, columns < D) of the tile x, cast to the buffer's dtype."""
    rows = row0 + tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, COLS)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    tl.store(base + rows[:, None] * stride_t + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def last_row(x, ROWS: tl.constexpr):
    """x[ROWS - 1, :] of a [ROWS, COLS] tile, as a [COLS] vector (a masked sum: tiles cannot be sliced)."""
    rows = tl.arange(0, ROWS)
    return tl.sum(tl.where((rows == ROWS - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def sub_chunk_ends(G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """G at the first row (F) and last row (E) of each sub-chunk: two [C / L, BK] tiles."""
    NS: tl.constexpr = C // L
    G3 = tl.reshape(G, (NS, L, BK))
    l3 = tl.arange(0, L)[None, :, None]
    first = tl.sum(tl.where(l3 == 0, G3, 0.0), axis=1)
    last = tl.sum(tl.where(l3 == L - 1, G3, 0.0), axis=1)
    return first, last


@triton.jit
def per_row(x, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """Spread a per-sub-chunk tile [C / L, BK] to every row of its sub-chunk: [C, BK]."""
    NS: tl.constexpr = C // L
    return tl.reshape(tl.broadcast_to(x[:, None, :], (NS, L, BK)), (C, BK))


@triton.jit
def bridge(F, E, b, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """exp(F_a - E_b) for every query sub-chunk a > b (0 for a <= b), spread to rows: [C, BK].

    The exponent is masked to -inf before the exp: for a <= b it would be >= 0 and could overflow.
    """
    NS: tl.constexpr = C // L
    subs = tl.arange(0, NS)
    E_b = tl.sum(tl.where((subs == b)[:, None], E, 0.0), axis=0)  # [BK]
    later = (subs > b)[:, None]
    factor = tl.exp(tl.where(later, F - E_b[None, :], float("-inf")))  # [NS, BK], each <= 1
    return per_row(factor, C, L, BK)


@triton.jit
def intra_chunk_scores(q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
    """P[i, j] = Σ_k q_ik k_jk exp(G_ik - G_jk) for j <= i (0 above the diagonal), over one K block.

    q, k, G: [C, BK] float32 tiles (G the chunk-local inclusive cumulative log decay). Returns [C, C].
    Off-diagonal sub-chunk pairs: NS - 1 products (one per key sub-chunk b) of bounded operands;
    diagonal sub-chunks: float32 log space, every (i, j, k) of all NS sub-chunks in one 4-d tile.
    """
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    F, E = sub_chunk_ends(G, C, L, BK)
    q_hat = q * tl.exp(G - per_row(F, C, L, BK))  # q_i exp(G_i - F_a) : |.| <= |q_i|
    k_hat = k * tl.exp(per_row(E, C, L, BK) - G)  # k_j exp(E_b - G_j) : |.| <= |k_j|
    P = tl.zeros((C, C), dtype=tl.float32)
    for b in range(NS - 1):
        keys_b = tl.where((rows // L == b)[:, None], k_hat, 0.0)  # only key sub-chunk b
        P = tl.dot(q_hat * bridge(F, E, b, C, L, BK), tl.trans(keys_b), P, input_precision=PRECISION)
    # Diagonal sub-chunks, all (i, j) pairs of every sub-chunk at once: a [NS, L, L, BK] tile.
    q3 = tl.reshape(q, (NS, L, BK))
    k3 = tl.reshape(k, (NS, L, BK))
    G3 = tl.reshape(G, (NS, L, BK))
    causal = tl.arange(0, L)[None, :, None, None] >= tl.arange(0, L)[None, None, :, None]  # i >= j
    decay = tl.exp(tl.where(causal, G3[:, :, None, :] - G3[:, None, :, :], float("-inf")))
    D = tl.sum(q3[:, :, None, :] * k3[:, None, :, :] * decay, axis=3)  # [NS, L, L]: D[a, i, j]
    # Place D in the diagonal blocks of P: repeat its L columns NS times, keep the own block.
    D_wide = tl.reshape(tl.broadcast_to(tl.reshape(D, (C, 1, L)), (C, NS, L)), (C, C))
    same_block = (rows[:, None] // L) == (rows[None, :] // L)
    return P + tl.where(same_block, D_wide, 0.0)


@triton.jit
def intra_chunk_score_grads(dP, q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Gradients of :func:`intra_chunk_scores` for the strictly lower part (j < i) of dP.

        dq_ik = Σ_{j<i} dP_ij k_jk exp(G_ik - G_jk),     dk_jk = Σ_{i>j} dP_ij q_ik exp(G_ik - G_jk)

    dP: [C, C] (its diagonal and upper part are ignored); q, k, G: [C, BK]. Returns (dq, dk) [C, BK].
    The i = j terms (dP_ii k_i and dP_ii q_i) are left to the caller: they cancel in the gate gradient
    q ⊙ dq - k ⊙ dk, so they are added only after it is formed.
    """
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    F, E = sub_chunk_ends(G, C, L, BK)
    from_first = tl.exp(G - per_row(F, C, L, BK))  # exp(G_i - F_a)
    to_last = tl.exp(per_row(E, C, L, BK) - G)  # exp(E_b - G_j)
    q_hat = q * from_first
    k_hat = k * to_last
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for b in range(NS - 1):
        br = bridge(F, E, b, C, L, BK)
        dP_b = tl.where((rows // L == b)[None, :], dP, 0.0)  # key columns of sub-chunk b
        dP_b = tl.where((rows // L > b)[:, None], dP_b, 0.0)  # query rows after it
        dq += br * tl.dot(dP_b, k_hat, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dP_b), q_hat * br, input_precision=PRECISION)
    dq = dq * from_first
    dk = dk * to_last
    # Diagonal sub-chunks, strictly below the diagonal (i > j), in log space: [NS, L, L, BK] tiles.
    # dP_d[a, i, j] = dP[a·L + i, a·L + j]: the diagonal blocks of dP.
    dP3 = tl.reshape(dP, (C, NS, L))
    own = tl.arange(0, NS)[None, :, None] == (rows // L)[:, None, None]
    dP_d = tl.reshape(tl.sum(tl.where(own, dP3, 0.0), axis=1), (NS, L, L))
    q3 = tl.reshape(q, (NS, L, BK))
    k3 = tl.reshape(k, (NS, L, BK))
    G3 = tl.reshape(G, (NS, L, BK))
    below = tl.arange(0, L)[None, :, None, None] > tl.arange(0, L)[None, None, :, None]  # i > j
    w = dP_d[:, :, :, None] * tl.exp(tl.where(below, G3[:, :, None, :] - G3[:, None, :, :], float("-inf")))
    dq3 = tl.sum(w * k3[:, None, :, :], axis=2)  # Σ_j  [NS, L, BK]
    dk3 = tl.sum(w * q3[:, :, None, :], axis=1)  # Σ_i
    return dq + tl.reshape(dq3, (C, BK)), dk + tl.reshape(dk3, (C, BK))
