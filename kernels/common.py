"""Building blocks every GLA kernel shares (chapters 6-7): loading a chunk, its cumulative gate, and
the intra-chunk scores by secondary-level chunking.

All helpers are ``@triton.jit`` functions, inlined into the kernels that call them. They work on
register tiles of one chunk: C rows (tokens) by a block of BK channels. Everything is float32 inside,
whatever the input dtype; only the matrix products may round their operands (``PRECISION``).

Notation (the book's, chapter 0; as in ``glalearn/forms/chunk.py`` and ``two_level.py``): rows
i, j = 0 ... C-1 of one chunk (query row i, key row j <= i), c a key channel, and

    G_i = g_0 + ... + g_i           the chunk-local cumulative log decay (inclusive), per channel
    P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc),  j <= i        the intra-chunk scores ("A" in fla)

The chunk of C rows is split into NS = C / L sub-chunks of L rows; sub-chunk u holds rows
uL ... uL+L-1. A pair of *different* sub-chunks (query sub-chunk u after key sub-chunk w < u) is a
matrix product of bounded operands, with
    exp(G_i - G_j) = exp(G_i - F_u) · exp(F_u - E_w) · exp(E_w - G_j)
where F_u is G at the first row of sub-chunk u and E_w is G at the last row of sub-chunk w: every
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
    The tile's first row is added to the pointer in int64 (row0 · stride_t passes 2^31 once
    T · H · K does); the offsets inside the tile stay small.
    """
    return load_rows(base, row0, col0, T, D, stride_t, ROWS, COLS).to(tl.float32)


@triton.jit
def load_rows(base, row0, col0, T, D, stride_t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """:func:`load_tile` in the buffer's own dtype (for tiles that only feed products)."""
    rows = tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, COLS)
    mask = ((row0 + rows) < T)[:, None] & (cols < D)[None, :]
    start = base + tl.cast(row0, tl.int64) * stride_t
    return tl.load(start + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(base, x, row0, col0, T, D, stride_t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Write the valid part (rows < T, columns < D) of the tile x, cast to the buffer's dtype."""
    rows = tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, COLS)
    mask = ((row0 + rows) < T)[:, None] & (cols < D)[None, :]
    start = base + tl.cast(row0, tl.int64) * stride_t
    tl.store(start + rows[:, None] * stride_t + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def last_row(x, ROWS: tl.constexpr):
    """x[ROWS - 1, :] of a [ROWS, COLS] tile, as a [COLS] vector (a masked sum: tiles cannot be sliced)."""
    rows = tl.arange(0, ROWS)
    return tl.sum(tl.where((rows == ROWS - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def load_gate(g_base, row0, col0, T, D, stride_t, ROWS: tl.constexpr, COLS: tl.constexpr,
              CUMULATIVE: tl.constexpr, SCAN: tl.constexpr):
    """G (the chunk-local inclusive cumulative log decay, [ROWS, COLS]) and γ (G at the chunk's last
    valid row, [COLS]) of the chunk starting at row0. Rows past T continue γ (no decay there).

    CUMULATIVE=False: g_base points to the gates g; the cumulative sum is taken here (a scan along
    the chunk, and a reduction for γ). CUMULATIVE=True: g_base points to G, written once by
    ``chunk_cumsum_kernel``: two loads, no scan — what the sequential passes want on their critical path.
    SCAN (CUMULATIVE=False): "cumsum" (``tl.cumsum``) or a mode of :func:`cumsum_by_product`.
    """
    if CUMULATIVE:
        G = load_tile(g_base, row0, col0, T, D, stride_t, ROWS, COLS)
        cols = col0 + tl.arange(0, COLS)
        last = tl.cast(tl.minimum(row0 + ROWS, T) - 1, tl.int64)
        gamma = tl.load(g_base + last * stride_t + cols, mask=cols < D, other=0.0).to(tl.float32)
        rows = row0 + tl.arange(0, ROWS)
        G = tl.where((rows < T)[:, None], G, gamma[None, :])
    elif SCAN == "cumsum":
        G = tl.cumsum(load_tile(g_base, row0, col0, T, D, stride_t, ROWS, COLS), axis=0)
        gamma = last_row(G, ROWS)
    else:
        G = cumsum_by_product(load_tile(g_base, row0, col0, T, D, stride_t, ROWS, COLS), ROWS, SCAN)
        gamma = last_row(G, ROWS)
    return G, gamma


@triton.jit
def cumsum_by_product(x, ROWS: tl.constexpr, SCAN: tl.constexpr):
    """The inclusive cumulative sum along the rows of a float32 tile as a product with the lower
    triangle of ones, tril(1) @ x, on the tensor cores instead of a scan across the warps.

    SCAN: "ieee" (float32 product, exact: the interpreter, float32 inputs); "bf16" (x holds bfloat16
    values, so one bf16 product is exact, sums in float32); "bf16x3" (x split into three bfloat16
    pieces, hi + mid + lo, which carry float32's 24 bits: three exact products).
    """
    return triangle_sum(x, tl.zeros_like(x), ROWS, "inclusive", SCAN)


@triton.jit
def triangle_sum(x, acc, ROWS: tl.constexpr, KIND: tl.constexpr, SCAN: tl.constexpr):
    """acc + M @ x for a triangle M of ones: a cumulative sum along the rows of the float32 tile x.

    KIND: "inclusive" (out_i = Σ_{j<=i} x_j), "exclusive" (Σ_{j<i}) or "reverse" (Σ_{j>=i}).
    SCAN as in :func:`cumsum_by_product` ("ieee", "bf16", "bf16x3"; "tf32" too).
    """
    rows = tl.arange(0, ROWS)
    if KIND == "inclusive":
        keep = rows[:, None] >= rows[None, :]
    elif KIND == "exclusive":
        keep = rows[:, None] > rows[None, :]
    else:
        keep = rows[:, None] <= rows[None, :]
    tri = tl.where(keep, 1.0, 0.0)
    if SCAN == "ieee" or SCAN == "tf32":
        return tl.dot(tri, x, acc, input_precision=SCAN)
    ones = tri.to(tl.bfloat16)
    hi = x.to(tl.bfloat16)
    out = tl.dot(ones, hi, acc)
    if SCAN == "bf16x3":
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        out = tl.dot(ones, mid, out)
        out = tl.dot(ones, (rest - mid.to(tl.float32)).to(tl.bfloat16), out)
    return out


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
def bridge(F, E, w, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """exp(F_u - E_w) for key sub-chunk w and every query sub-chunk u > w (0 for u <= w), spread to
    the rows of each u: [C, BK].

    The exponent is masked to -inf before the exp: for u <= w it would be >= 0 and could overflow.
    """
    NS: tl.constexpr = C // L
    subs = tl.arange(0, NS)  # u = 0 ... NS-1
    E_w = tl.sum(tl.where((subs == w)[:, None], E, 0.0), axis=0)  # [BK]
    later = (subs > w)[:, None]
    factor = tl.exp(tl.where(later, F - E_w[None, :], float("-inf")))  # [NS, BK], each <= 1
    return per_row(factor, C, L, BK)


@triton.jit
def intra_chunk_scores(q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
    """P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for j <= i (0 above the diagonal), over one K block.

    q, k, G: [C, BK] float32 tiles (G the chunk-local inclusive cumulative log decay). Returns [C, C].
    Off-diagonal sub-chunk pairs: NS - 1 products (one per key sub-chunk w) of bounded operands;
    diagonal sub-chunks: float32 log space, every (i, j, c) of all NS sub-chunks in one 4-d tile.
    """
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    F, E = sub_chunk_ends(G, C, L, BK)
    q_hat = q * tl.exp(G - per_row(F, C, L, BK))  # q_i exp(G_i - F_u) : |.| <= |q_i|
    k_hat = k * tl.exp(per_row(E, C, L, BK) - G)  # k_j exp(E_w - G_j) : |.| <= |k_j|
    P = tl.zeros((C, C), dtype=tl.float32)
    for w in range(NS - 1):
        keys_w = tl.where((rows // L == w)[:, None], k_hat, 0.0)  # only key sub-chunk w
        P = tl.dot(q_hat * bridge(F, E, w, C, L, BK), tl.trans(keys_w), P, input_precision=PRECISION)
    # Diagonal sub-chunks, all (i, j) pairs of every sub-chunk at once: a [NS, L, L, BK] tile.
    q3 = tl.reshape(q, (NS, L, BK))
    k3 = tl.reshape(k, (NS, L, BK))
    G3 = tl.reshape(G, (NS, L, BK))
    causal = tl.arange(0, L)[None, :, None, None] >= tl.arange(0, L)[None, None, :, None]  # i >= j
    decay = tl.exp(tl.where(causal, G3[:, :, None, :] - G3[:, None, :, :], float("-inf")))
    P_d = tl.sum(q3[:, :, None, :] * k3[:, None, :, :] * decay, axis=3)  # [NS, L, L]: P_d[u, i, j]
    # Place P_d in the diagonal blocks of P: repeat its L columns NS times, keep the own block.
    P_d_wide = tl.reshape(tl.broadcast_to(tl.reshape(P_d, (C, 1, L)), (C, NS, L)), (C, C))
    same_block = (rows[:, None] // L) == (rows[None, :] // L)
    return P + tl.where(same_block, P_d_wide, 0.0)


@triton.jit
def intra_chunk_score_grads(dP, q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Gradients of :func:`intra_chunk_scores` for the strictly lower part (j < i) of dP.

        dq_ic = Σ_{j<i} dP_ij k_jc exp(G_ic - G_jc),     dk_jc = Σ_{i>j} dP_ij q_ic exp(G_ic - G_jc)

    dP: [C, C] (its diagonal and upper part are ignored); q, k, G: [C, BK]. Returns (dq, dk) [C, BK].
    The i = j terms (dP_ii k_i and dP_ii q_i) are left to the caller: they cancel in the gate gradient
    q ⊙ dq - k ⊙ dk, so they are added only after it is formed.
    """
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    F, E = sub_chunk_ends(G, C, L, BK)
    from_first = tl.exp(G - per_row(F, C, L, BK))  # exp(G_i - F_u)
    to_last = tl.exp(per_row(E, C, L, BK) - G)  # exp(E_w - G_j)
    q_hat = q * from_first
    k_hat = k * to_last
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for w in range(NS - 1):
        br = bridge(F, E, w, C, L, BK)
        dP_w = tl.where((rows // L == w)[None, :], dP, 0.0)  # key columns of sub-chunk w
        dP_w = tl.where((rows // L > w)[:, None], dP_w, 0.0)  # query rows after it
        dq += br * tl.dot(dP_w, k_hat, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dP_w), q_hat * br, input_precision=PRECISION)
    dq = dq * from_first
    dk = dk * to_last
    # Diagonal sub-chunks, strictly below the diagonal (i > j), in log space: [NS, L, L, BK] tiles.
    # dP_d[u, i, j] = dP[uL + i, uL + j]: the diagonal blocks of dP.
    dP3 = tl.reshape(dP, (C, NS, L))
    own = tl.arange(0, NS)[None, :, None] == (rows // L)[:, None, None]
    dP_d = tl.reshape(tl.sum(tl.where(own, dP3, 0.0), axis=1), (NS, L, L))
    q3 = tl.reshape(q, (NS, L, BK))
    k3 = tl.reshape(k, (NS, L, BK))
    G3 = tl.reshape(G, (NS, L, BK))
    below = tl.arange(0, L)[None, :, None, None] > tl.arange(0, L)[None, None, :, None]  # i > j
    terms = dP_d[:, :, :, None] * tl.exp(tl.where(below, G3[:, :, None, :] - G3[:, None, :, :], float("-inf")))
    dq3 = tl.sum(terms * k3[:, None, :, :], axis=2)  # Σ_j  [NS, L, BK]
    dk3 = tl.sum(terms * q3[:, :, None, :], axis=1)  # Σ_i
    return dq + tl.reshape(dq3, (C, BK)), dk + tl.reshape(dk3, (C, BK))


# ---------------------------------------------------------------------------------------------------
# The guarded chunk scores (chapter 7): one tensor-core product per chunk whenever it is safe.
#
# With the chunk-local cumulative decay G (G_i <= 0, decreasing), every score factors through the
# chunk's start as reference point:
#     exp(G_i - G_j) = exp(G_i) · exp(-G_j),      so  P = tril( (q ⊙ exp(G)) (k ⊙ exp(-G))^T ).
# q ⊙ exp(G) is bounded (<= |q|) and is the same factor the inter-chunk term uses. k ⊙ exp(-G) grows
# up to exp(Δ), Δ = max(-G) the chunk's decay span. Each term of a kept entry (j <= i) is then the
# exact q_ic k_jc exp(G_ic - G_jc) up to a rounding *relative to that term*: nothing large cancels.
# The one danger is the range of the factors, so the product is used only while Δ <= SPAN_MAX
# (e^40 ≈ 2e17: far inside float32's, tf32's and bf16's e^88). A chunk with a larger span (gates of
# about -0.6 per step or stronger, averaged over 64 steps) takes the exact secondary-level path:
# sub-chunk pairs as products against the query sub-chunk's first row, diagonal sub-chunks element
# by element in float32 log space.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: add half of the
    dropped 16 bits (minus one unless the kept part is odd) to the bit pattern, then clear them."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mm(lhs, rhs, acc, PRECISION: tl.constexpr):
    """acc + lhs @ rhs. PRECISION: "ieee" | "tf32" | "tf32x3" (float32 operands) or "bf16" (operands
    rounded to bfloat16, the tensor cores' fastest path; bf16 keeps float32's exponent range).
    "bf16_round" is "bf16" for Triton's interpreter, whose bfloat16 products are not right: round the
    operands to bfloat16, multiply them in float32 (what the tensor cores compute: products of bf16
    values are exact in float32, sums accumulate in float32). lhs and rhs may be float32 tiles or tiles in
    their buffer's dtype (``load_rows``)."""
    if PRECISION == "bf16":
        return tl.dot(lhs.to(tl.bfloat16), rhs.to(tl.bfloat16), acc)
    elif PRECISION == "bf16_round":
        return tl.dot(round_to_bf16(lhs.to(tl.float32)), round_to_bf16(rhs.to(tl.float32)), acc, input_precision="ieee")
    else:  # operands may come in their buffer's dtype (load_rows): one dtype for both
        return tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def operand(x, PRECISION: tl.constexpr):
    """x kept as an operand of ``mm(..., PRECISION)``: in bfloat16 where the product rounds its operands
    to bfloat16 anyway (the same product, half the registers to hold it), else as it is."""
    if PRECISION == "bf16":
        y = x.to(tl.bfloat16)
    else:
        y = x
    return y


@triton.jit
def decay_span(G):
    """max over the tile of -G: the largest cumulative decay (in nats) inside the chunk, a scalar."""
    return -tl.min(tl.min(G, axis=1), axis=0)


@triton.jit
def row_of(x, r, ROWS: tl.constexpr):
    """Row r (a runtime index) of a [ROWS, COLS] tile, as a [COLS] vector (a masked sum)."""
    return tl.sum(tl.where((tl.arange(0, ROWS) == r)[:, None], x, 0.0), axis=0)


@triton.jit
def secondary_chunk_scores(q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                           PRECISION: tl.constexpr):
    """P[i, j] for j <= i by secondary-level chunking, exact for every gate (the fallback path).

    Sub-chunk pairs (query sub-chunk u, the key sub-chunks w < u): one product per u, against
    R = G_{uL}, G at u's first row (chapter 4's q̃, k̃): q̃_i = q_i exp(G_i - G_{uL}) <= |q_i| and
    k̃_j = k_j exp(G_{uL} - G_j) <= |k_j| for j before row uL.
    Exponents are masked to -inf *before* the exp wherever they could be positive. Diagonal
    sub-chunks: float32 log space, one key row j per step.
    """
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    P = tl.zeros((C, C), dtype=tl.float32)
    for u in range(1, NS):
        R = row_of(G, u * L, C)  # [BK]: G_{uL}
        in_u = ((rows >= u * L) & (rows < (u + 1) * L))[:, None]
        before_u = (rows < u * L)[:, None]
        q_hat = q * tl.exp(tl.where(in_u, G - R[None, :], float("-inf")))
        k_hat = k * tl.exp(tl.where(before_u, R[None, :] - G, float("-inf")))
        P = mm(q_hat, tl.trans(k_hat), P, PRECISION)
    for j in range(C):
        k_j = row_of(k, j, C)
        G_j = row_of(G, j, C)
        own = (rows >= j) & (rows < (j // L + 1) * L)  # rows i >= j in j's sub-chunk
        terms = q * k_j[None, :] * tl.exp(tl.where(own[:, None], G - G_j[None, :], float("-inf")))
        P = tl.where((rows == j)[None, :], P + tl.sum(terms, axis=1)[:, None], P)
    return P


@triton.jit
def chunk_scores(q, k, G, qe, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                 SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr):
    """P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for j <= i, 0 above the diagonal: [C, C] float32.

    qe = q ⊙ exp(G) (the caller has it already, for the inter-chunk term). One product when the
    chunk's decay span allows it, the secondary-level path otherwise (see the block comment above).
    """
    rows = tl.arange(0, C)
    if decay_span(G) <= SPAN_MAX:
        ke = k * tl.exp(-G)  # <= |k| e^SPAN_MAX
        P = mm(qe, tl.trans(ke), tl.zeros((C, C), dtype=tl.float32), PRECISION)
        P = tl.where(rows[:, None] >= rows[None, :], P, 0.0)  # the upper part may be huge: drop it
    else:
        P = secondary_chunk_scores(q, k, G, C, L, BK, PRECISION)
    return P


@triton.jit
def secondary_chunk_score_grads(dP, q, k, G, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                                PRECISION: tl.constexpr):
    """The exact (secondary-level) path of :func:`chunk_score_grads`, strictly below the diagonal."""
    NS: tl.constexpr = C // L
    rows = tl.arange(0, C)
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for u in range(1, NS):
        R = row_of(G, u * L, C)  # G_{uL}
        in_u = ((rows >= u * L) & (rows < (u + 1) * L))[:, None]
        before_u = (rows < u * L)[:, None]
        from_R = tl.exp(tl.where(in_u, G - R[None, :], float("-inf")))  # rows of u, else 0
        to_R = tl.exp(tl.where(before_u, R[None, :] - G, float("-inf")))  # rows before u, else 0
        dP_u = tl.where(in_u & (rows < u * L)[None, :], dP, 0.0)  # query rows in u, key columns before u
        dq += from_R * mm(dP_u, k * to_R, tl.zeros((C, BK), dtype=tl.float32), PRECISION)
        dk += to_R * mm(tl.trans(dP_u), q * from_R, tl.zeros((C, BK), dtype=tl.float32), PRECISION)
    for j in range(C):
        k_j = row_of(k, j, C)
        G_j = row_of(G, j, C)
        dP_j = tl.sum(tl.where((rows == j)[None, :], dP, 0.0), axis=1)  # column j of dP: [C]
        own = (rows > j) & (rows < (j // L + 1) * L)  # rows i > j in j's sub-chunk
        terms = dP_j[:, None] * tl.exp(tl.where(own[:, None], G - G_j[None, :], float("-inf")))  # [C, BK]
        dq += terms * k_j[None, :]
        dk = tl.where((rows == j)[:, None], dk + tl.sum(terms * q, axis=0)[None, :], dk)
    return dq, dk


@triton.jit
def chunk_score_grads(dP, q, k, G, qe, C: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                      SPAN_MAX: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of :func:`chunk_scores` through the strictly lower part (j < i) of dP:

        dq_ic = Σ_{j<i} dP_ij k_jc exp(G_ic - G_jc),     dk_jc = Σ_{i>j} dP_ij q_ic exp(G_ic - G_jc)

    Fast path: dq = exp(G) ⊙ (dP (k ⊙ exp(-G))),  dk = exp(-G) ⊙ (dPᵀ (q ⊙ exp(G))). The i = j terms
    are left to the caller (they cancel in the gate gradient q ⊙ dq - k ⊙ dk).
    """
    rows = tl.arange(0, C)
    dP = tl.where(rows[:, None] > rows[None, :], dP, 0.0)
    if decay_span(G) <= SPAN_MAX:
        e_neg = tl.exp(-G)
        dq = tl.exp(G) * mm(dP, k * e_neg, tl.zeros((C, BK), dtype=tl.float32), PRECISION)
        dk = e_neg * mm(tl.trans(dP), qe, tl.zeros((C, BK), dtype=tl.float32), PRECISION)
    else:
        dq, dk = secondary_chunk_score_grads(dP, q, k, G, C, L, BK, PRECISION)
    return dq, dk
