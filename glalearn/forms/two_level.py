"""Secondary-level chunking (chapter 4): the intra-chunk part made matmul-shaped and still exact.

Chapter 3's intra-chunk scores need one exp per (i, j, c) triple: no tensor cores. Split each chunk of
C tokens again into sub-chunks of L tokens (paper §4.3, Listing 1). For a query sub-chunk u and an
*earlier* key sub-chunk w < u, take the reference row uL, the first row of sub-chunk u:

    P[i, j] = Σ_c (q_ic exp(G_ic - G_uL,c)) · (k_jc exp(G_uL,c - G_jc))      i in u, j in w < u

Both factors are <= 1 (i >= uL > j and G only decreases), so the two operands are bounded and can be
rounded to half precision and multiplied on tensor cores. Only the diagonal sub-chunks (w = u) have
pairs on both sides of every reference point; they stay in float32 log space, L x L x K per sub-chunk
(or are split again, recursively). The chunk states and the inter-chunk products are matmuls too.

Where a chunk's whole decay is modest, even sub-chunks are unnecessary: ``diagonal="guarded"`` makes the
chunk ONE product against the midpoint of its decay, guarded by a bound on the decay span (chapter 4,
:func:`guarded_scores`), and falls back to the sub-chunks for the chunks past it.

Every exponent is built from small pieces: decays *inside* a sub-chunk (at most L gates summed, in
float32) and decays *between* sub-chunks (a few numbers per sub-chunk, in float64). So no large
cumulative sum is ever subtracted from another, and strong gates lose no precision.
"""

from __future__ import annotations

import torch

from glalearn.forms._contract import cast_output, check_power_of_two, empty_result, validate
from glalearn.forms.chunk import (
    chunk_local_cumsum,
    from_chunks,
    log_space_scores,
    matmul,
    pass_states,
    to_chunks,
)

DIAGONAL_METHODS = ("log_space", "split", "guarded")


def check_diagonal(diagonal) -> str:
    """``diagonal`` must name one of :data:`DIAGONAL_METHODS`."""
    if diagonal not in DIAGONAL_METHODS:
        raise ValueError(f"diagonal must be 'log_space', 'split' or 'guarded', got {diagonal!r}")
    return diagonal


def sub_chunk_decays(g_chunks: torch.Tensor, sub_chunk_size: int) -> dict:
    """The log decays secondary chunking needs, from the gates of each chunk (chapter 4).

    Args:
        g_chunks: [..., C, K] log gates of each chunk;  sub_chunk_size: L, dividing C.
    Returns a dict (S = C / L sub-chunks; "a" indexes query sub-chunks, "b" key sub-chunks):
        "from_first" [..., S, L, K]: G_i - G_r, decay from the sub-chunk's first row r to row i (<= 0)
        "to_last"    [..., S, L, K]: G_e - G_j, decay from row j to the sub-chunk's last row e (<= 0)
        "between"    [..., S, S, 1, K]: G_r(a) - G_e(b), from the end of b to the first row of a
                     (only b < a is meaningful; float64)
        "from_chunk_start" [..., S, K]: G at the row before sub-chunk s, relative to the chunk start
                     (float64; G_i = from_chunk_start + first-row gate + from_first)
        "to_chunk_end" [..., S, K]: γ - G_e(s), from the end of sub-chunk s to the end of the chunk
        "gamma"      [..., K]: γ, the log decay of the whole chunk (float64)
    """
    *lead, C, K = g_chunks.shape
    L = sub_chunk_size
    S = C // L
    local = g_chunks.reshape(*lead, S, L, K).cumsum(-2)  # inside each sub-chunk: at most L gates
    last = local[..., -1:, :]  # [..., S, 1, K]
    totals = last.squeeze(-2).double()  # [..., S, K]
    ends = totals.cumsum(-2)  # G at the last row of each sub-chunk, relative to the chunk start
    starts = ends - totals  # G just before each sub-chunk
    first_gate = local[..., 0, :].double()  # g at the first row of each sub-chunk
    ref = starts + first_gate  # G at the first row of each sub-chunk
    return {
        "from_first": local - local[..., :1, :],
        "to_last": last - local,
        "between": (ref.unsqueeze(-2) - ends.unsqueeze(-3)).unsqueeze(-2),
        "from_chunk_start": starts,
        "to_chunk_end": ends[..., -1:, :] - ends,
        "gamma": ends[..., -1, :],
    }


def _scores(qs, ks, decays, matmul_dtype, diagonal):
    """P [..., S, L, S, L] from sub-chunk pieces; see :func:`sub_chunk_scores`."""
    *lead, S, L, K = qs.shape
    dt = qs.dtype
    q_tilde = qs * decays["from_first"].exp()  # exp(G_i - G_ref) <= 1
    # k̃[u, w] = k_j exp(G_ref(u) - G_j) = k_j exp(G_end(w) - G_j) · exp(G_ref(u) - G_end(w)), both <= 1
    # for w < u: the first factor per key, the second one number per (u, w, channel).
    k_to_last = ks * decays["to_last"].exp()
    earlier = torch.ones(S, S, dtype=torch.bool, device=qs.device).tril(-1)[:, :, None, None]
    between = decays["between"].masked_fill(~earlier, float("-inf")).to(dt)
    k_tilde = k_to_last.unsqueeze(-4) * between.exp()  # [..., S_a, S_b, L, K]
    # One product per query sub-chunk u against all key sub-chunks w at once: [L, K] @ [K, S·L] (S = C / L).
    P = matmul(q_tilde, k_tilde.reshape(*lead, S, S * L, K).transpose(-1, -2), matmul_dtype)
    P = P.reshape(*lead, S, L, S, L)
    # Diagonal sub-chunks in float32, relative to their own first row so the exponents stay small.
    if diagonal == "log_space":
        P_diag = log_space_scores(qs, ks, decays["from_first"])  # [..., S, L, L]
    else:
        P_diag = split_scores(qs, ks, decays["from_first"])
    same = torch.eye(S, dtype=torch.bool, device=qs.device)[:, None, :, None]
    return torch.where(same, P_diag.unsqueeze(-2), P)


def sub_chunk_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    sub_chunk_size: int,
    matmul_dtype: torch.dtype | None = None,
    diagonal: str = "log_space",
) -> torch.Tensor:
    """The intra-chunk score matrix P [..., C, C] built from sub-chunks (chapter 4).

    Args:
        q, k: [..., C, K];  g: [..., C, K] the log gates of each chunk.
        sub_chunk_size: L, dividing C.
        matmul_dtype: dtype of the off-diagonal operands (None: q's dtype).
        diagonal: how the diagonal sub-chunks are computed, both in float32 and exact:
            "log_space" — one exp per (i, j, k) triple, L x L x K per sub-chunk (the paper, the kernel);
            "split" — the sub-chunk trick again, halving down to single tokens (all products);
            "guarded" — the whole chunk as one product where its decay span allows, else "split"
            (see :func:`guarded_scores`).
    Returns:
        P [..., C, C] with P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for j <= i, else 0; in q's dtype.
    """
    check_diagonal(diagonal)
    if diagonal == "guarded":
        return guarded_scores(q, k, g, sub_chunk_size, matmul_dtype)[0]
    *lead, C, K = q.shape
    S = C // sub_chunk_size
    qs, ks = (x.reshape(*lead, S, sub_chunk_size, K) for x in (q, k))
    P = _scores(qs, ks, sub_chunk_decays(g, sub_chunk_size), matmul_dtype, diagonal)
    return P.reshape(*lead, C, C)


def split_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """log_space_scores by recursive halving: exact, and made only of products (chapter 4).

    Split a block of L tokens into halves. Every pair with the query in the second half and the key in
    the first is one product against the reference point r = first row of the second half, both
    factors exp(G_i - G_r) and exp(G_r - G_j) <= 1. The pairs inside each half are split again, down to
    single tokens, whose decay is exp(0) = 1. Cost: O(L K log L) exps instead of O(L^2 K).

    Args: q, k, G: [..., L, K] with L a power of two. Returns: [..., L, L].
    """
    *lead, L, K = q.shape
    P = q.new_zeros((*lead, L, L))
    P.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    h = L // 2
    while h >= 1:
        n = L // (2 * h)  # blocks of 2h tokens
        qb, kb, Gb = (x.reshape(*lead, n, 2, h, K) for x in (q, k, G))
        ref = Gb[..., 1, :1, :]  # first row of each second half
        q_tilde = qb[..., 1, :, :] * (Gb[..., 1, :, :] - ref).exp()
        k_tilde = kb[..., 0, :, :] * (ref - Gb[..., 0, :, :]).exp()
        block = P.view(*lead, n, 2, h, n, 2, h).diagonal(dim1=-6, dim2=-3)  # [..., 2, h, 2, h, n]
        if h == 1:
            cross = (q_tilde * k_tilde).sum(-1, keepdim=True)  # 1 x 1 blocks: a dot product
        else:
            cross = q_tilde @ k_tilde.transpose(-1, -2)
        block[..., 1, :, 0, :, :] = cross.movedim(-3, -1)
        h //= 2
    return P


# ----------------------------------------------------------------------------- the guarded single product
# One product per chunk, P = (q ⊙ exp(G - μ)) (k ⊙ exp(μ - G))ᵀ, is exact wherever its factors stay well
# inside the operand dtype's range. μ is the midpoint of the chunk's decay, so every exponent is within
# ±Δ/2, Δ = the chunk's decay span. The bounds per operand dtype (derived in guarded_scores):
GUARD_SPAN = {torch.float16: 8.0, torch.bfloat16: 64.0, torch.float32: 64.0, torch.float64: 64.0}
GUARD_MAGNITUDE = {torch.float16: 2.0**10, torch.bfloat16: 2.0**60, torch.float32: 2.0**60, torch.float64: 2.0**60}


def chunk_guard(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, matmul_dtype: torch.dtype | None = None) -> dict:
    """Which chunks may take the single product, and its reference point (chapter 4).

    Args:
        q, k: [..., C, K];  G: [..., C, K] cumulative log decay inside each chunk (float64 preferred).
        matmul_dtype: the dtype the product's operands are rounded to (None: q's dtype).
    Returns a dict:
        "span" [...]: Δ = max over channels of G_0 - G_{C-1}, the decay across the chunk (>= 0);
        "mid" [..., 1, K]: μ = (G_0 + G_{C-1}) / 2, so that |G_i - μ| <= Δ / 2 for every row i;
        "fast" [...] bool: Δ <= GUARD_SPAN[dtype] and max |q|, |k| <= GUARD_MAGNITUDE[dtype].
    """
    dtype = matmul_dtype or q.dtype
    first, last = G[..., :1, :], G[..., -1:, :]
    span = (first - last).squeeze(-2).amax(-1)
    size = torch.maximum(q.abs().amax((-2, -1)), k.abs().amax((-2, -1)))
    fast = (span <= GUARD_SPAN[dtype]) & (size <= GUARD_MAGNITUDE[dtype])
    return {"span": span, "mid": (first + last) / 2, "fast": fast}


def _guarded_product(q, k, g, G, sub_chunk_size, matmul_dtype):
    """The factors, the guard and P [..., C, C] of the guarded single product; see guarded_scores."""
    *lead, C, _ = q.shape
    guard = chunk_guard(q, k, G, matmul_dtype)
    fast = guard["fast"]
    all_fast = bool(fast.all())
    exponent = G - guard["mid"]  # float64, |G_i - μ| <= Δ/2
    if not all_fast:  # chunks over the bound: factor 1, so their (discarded) product stays finite
        exponent = exponent.masked_fill(~fast[..., None, None], 0.0)
    factor = exponent.exp_().to(q.dtype)  # computed in float64, one rounding whatever the span
    q_tilde, k_tilde = q * factor, k / factor
    # Above the diagonal the factors do not cancel: exp(G_i - G_j) >= 1 may be huge (even inf/NaN in the
    # product). tril_ *writes* zeros there (as torch.where would) before anything else touches them;
    # multiplying by a 0/1 mask instead would turn 0 * inf into NaN.
    P = matmul(q_tilde, k_tilde.transpose(-1, -2), matmul_dtype).tril_()
    if not all_fast:  # the chunks over the bound: the exact two-level path, only for them
        slow = (~fast).flatten().nonzero().squeeze(-1)
        flat = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, g))
        q_s, k_s, g_s = (x[slow] for x in flat)
        P_slow = sub_chunk_scores(q_s, k_s, g_s, sub_chunk_size, matmul_dtype, "split")
        P = P.reshape(-1, C, C).index_put((slow,), P_slow).reshape(*lead, C, C)
    return {"q_tilde": q_tilde, "k_tilde": k_tilde, "P": P, **guard}


def guarded_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    sub_chunk_size: int = 16,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The intra-chunk scores as ONE product per chunk where that is safe, else two-level (chapter 4).

    For a chunk with cumulative log decay G (per channel) and any reference μ (one number per channel):

        P[i, j] = Σ_c (q_ic exp(G_ic - μ_c)) · (k_jc exp(μ_c - G_jc))          for j <= i

    Each term equals q_ic k_jc exp(G_ic - G_jc) up to rounding *relative to that term*: no cancellation.
    The only danger is the range of the factors. With μ = the midpoint (G_0 + G_{C-1}) / 2, every
    exponent is within ±Δ/2, Δ = max_c (G_0,c - G_{C-1},c) the chunk's decay span. The guard:

    * float32 and bfloat16 (largest finite ≈ e^88.7, smallest normal ≈ e^-87.3): Δ <= 64, so factors
      lie in [e^-32, e^32]; with |q|, |k| <= 2^60 ≈ e^41.6 every operand stays finite, and any q, k
      above 1e-24 stay normal numbers after the factor. float64 uses the same bound.
    * float16 operands (largest 65504 ≈ e^11.1, smallest normal ≈ e^-9.7): Δ <= 8, factors in
      [e^-4, e^4] ≈ [0.018, 55]; with |q|, |k| <= 2^10 the operands stay below 65504, and any q, k
      above 3.4e-3 stay normal numbers after the factor.

    Each factor exp(G - μ) is computed in float64 and rounded once, so its relative error is one
    rounding however large Δ is. Entries above the diagonal (j > i) carry exp(G_i - G_j) >= 1, up to e^Δ
    (inf/NaN if the product overflows); they are overwritten with zeros (``tril_``, like ``torch.where``;
    never a multiplication by a 0/1 mask, which would make 0 · inf = NaN). Chunks over the bound (strong gates, or huge q, k) fall back
    to :func:`sub_chunk_scores` with ``diagonal="split"``, recomputed for those chunks only.

    Args:
        q, k: [..., C, K];  g: [..., C, K] the log gates of each chunk.
        sub_chunk_size: L of the fallback, dividing C.
        matmul_dtype: dtype of the product's operands (None: q's dtype).
    Returns:
        (P [..., C, C] with P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for j <= i, else 0, in q's dtype;
         fast [...] bool: True where the chunk took the single product, False where it fell back).
    """
    G = g.cumsum(-2, dtype=torch.float64)
    out = _guarded_product(q, k, g, G, sub_chunk_size, matmul_dtype)
    return out["P"], out["fast"]


def two_level_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    sub_chunk_size: int = 16,
    matmul_dtype: torch.dtype | None = None,
    diagonal: str = "log_space",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA with secondary-level chunking (chapter 4).

    Args:
        q, k: [B, T, H, K];  v: [B, T, H, V];  g: [B, T, H, K] log forget gates (<= 0).
        scale: multiplies q; default K ** -0.5.
        initial_state: S_[0] [B, H, K, V];  output_final_state: also return S_[N], the final state.
        chunk_size: C, a power of two;  sub_chunk_size: L, a power of two <= C.
        matmul_dtype: dtype every matrix product's operands are rounded to (e.g. torch.bfloat16, as on
            tensor cores); accumulation, states and the diagonal sub-chunks stay float32.
        diagonal: "log_space" (default; as the paper and the Triton kernel), "split" (recursive
            halving, all products; faster on a CPU) or "guarded" (the fastest on a CPU: each chunk whose
            decay span Δ is within GUARD_SPAN — 64 nats, 8 for float16 products — is ONE product
            (q ⊙ exp(G - μ))(k ⊙ exp(μ - G))ᵀ against the midpoint μ of its decay, the chunk states
            and read-out reusing the same operands; chunks over the bound fall back to "split"; see
            :func:`guarded_scores`). All three are exact.
    Returns:
        o [B, T, H, V] in q's dtype, and S_[N] [B, H, K, V] (float32, float64 for float64 inputs) or None.

    Exact for every legal gate. Differentiable by autograd.
    """
    info = validate(q, k, v, g, scale, initial_state)
    check_power_of_two("chunk_size", chunk_size)
    check_power_of_two("sub_chunk_size", sub_chunk_size)
    if sub_chunk_size > chunk_size:
        raise ValueError(f"sub_chunk_size must be <= chunk_size = {chunk_size}, got {sub_chunk_size}")
    if matmul_dtype is not None and matmul_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"matmul_dtype must be None or a floating dtype, got {matmul_dtype!r}")
    check_diagonal(diagonal)
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    dt = info.compute_dtype
    C, L = chunk_size, sub_chunk_size
    qc, kc, vc, gc = (to_chunks(x.to(dt), C) for x in (q, k, v, g))
    S0 = None if initial_state is None else initial_state.to(dt)
    if diagonal == "guarded":
        o, final = _guarded_chunks(qc, kc, vc, gc, S0, L, matmul_dtype, info.scale)
        return cast_output(from_chunks(o, info.T), info), (final if output_final_state else None)
    *lead, _, K = qc.shape
    S = C // L
    decays = sub_chunk_decays(gc, L)
    qs, ks = qc.reshape(*lead, S, L, K), kc.reshape(*lead, S, L, K)
    # Chunk states: S_[n+1] = exp(γ) S_[n] + (k ⊙ Γ)^T v with Γ_j = exp(G_e(w) - G_j) · exp(γ - G_e(w)),
    # G_e(w) the last row of j's sub-chunk w.
    k_decayed = ks * decays["to_last"].exp() * decays["to_chunk_end"].to(dt).exp().unsqueeze(-2)
    updates = matmul(k_decayed.reshape(*lead, C, K).transpose(-1, -2), vc, matmul_dtype)
    states, final = pass_states(updates, decays["gamma"].to(dt).exp(), S0)
    # Inter-chunk output: (q ⊙ Λ) S_[n] with Λ_i = exp(G_i) = exp(G before the sub-chunk + g_first) · exp(from_first).
    ref = decays["from_chunk_start"] + gc.reshape(*lead, S, L, K)[..., 0, :].double()
    q_decayed = qs * decays["from_first"].exp() * ref.to(dt).exp().unsqueeze(-2)
    o_inter = matmul(q_decayed.reshape(*lead, C, K), states, matmul_dtype)
    P = _scores(qs, ks, decays, matmul_dtype, diagonal).reshape(*lead, C, C)
    o = info.scale * (o_inter + matmul(P, vc, matmul_dtype))
    return cast_output(from_chunks(o, info.T), info), (final if output_final_state else None)


def _guarded_chunks(qc, kc, vc, gc, S0, sub_chunk_size, matmul_dtype, scale):
    """Chunk outputs [B, H, N, C, V] and S_[N] of two_level_chunk_gla(diagonal="guarded")."""
    dt = qc.dtype
    G = chunk_local_cumsum(gc)  # float64
    parts = _guarded_product(qc, kc, gc, G, sub_chunk_size, matmul_dtype)
    gamma, mid = G[..., -1:, :], parts["mid"]
    # The inter-chunk factors from the same operands: exp(G_i) = exp(G_i - μ) exp(μ) and
    # exp(γ - G_j) = exp(μ - G_j) exp(γ - μ), with exp(μ) <= 1 and exp(γ - μ) <= 1.
    q_decayed = parts["q_tilde"] * mid.exp().to(dt)
    k_decayed = parts["k_tilde"] * (gamma - mid).exp().to(dt)
    if not bool(parts["fast"].all()):  # chunks over the bound: their factors directly, as in chapter 3
        slow = (~parts["fast"]).flatten().nonzero().squeeze(-1)
        C, K = qc.shape[-2:]
        q_s, k_s, G_s, gamma_s = (x.reshape(-1, *x.shape[-2:])[slow] for x in (qc, kc, G, gamma))
        q_decayed = q_decayed.reshape(-1, C, K).index_put((slow,), q_s * G_s.exp().to(dt)).reshape(qc.shape)
        k_decayed = k_decayed.reshape(-1, C, K).index_put((slow,), k_s * (gamma_s - G_s).exp().to(dt))
        k_decayed = k_decayed.reshape(kc.shape)
    updates = matmul(k_decayed.transpose(-1, -2), vc, matmul_dtype)
    states, final = pass_states(updates, gamma.squeeze(-2).exp().to(dt), S0)
    if matmul_dtype not in (None, dt):
        return scale * (matmul(q_decayed, states, matmul_dtype) + matmul(parts["P"], vc, matmul_dtype)), final
    # o = scale (q ⊙ Λ) S_[n] + scale P v: one batched product added onto the other, scaled inside BLAS.
    *lead, C, K = qc.shape
    V = vc.shape[-1]
    intra = parts["P"].reshape(-1, C, C) @ vc.reshape(-1, C, V)
    o = torch.baddbmm(intra, q_decayed.reshape(-1, C, K), states.reshape(-1, K, V), beta=scale, alpha=scale)
    return o.reshape(*lead, C, V), final
