"""Secondary-level chunking (chapter 4): the intra-chunk part made matmul-shaped and still exact.

Chapter 3's intra-chunk scores need one exp per (i, j, k) triple: no tensor cores. Split each chunk of
C tokens again into sub-chunks of L tokens (paper §4.3, Listing 1). For a query sub-chunk a and an
*earlier* key sub-chunk b < a, pick the reference point r = the first position of sub-chunk a:

    P[i, j] = Σ_k (q_ik exp(G_ik - G_rk)) · (k_jk exp(G_rk - G_jk))      i in a, j in b < a

Both factors are <= 1 (i >= r > j and G only decreases), so the two operands are bounded and can be
rounded to half precision and multiplied on tensor cores. Only the diagonal sub-chunks (a = b) have
pairs on both sides of every reference point; they stay in float32 log space, L x L x K per sub-chunk.
The chunk states and the inter-chunk products are matmuls too, with bounded decays.
"""

from __future__ import annotations

import torch

from glalearn.forms._contract import check_power_of_two, empty_result, validate
from glalearn.forms.chunk import (
    chunk_local_cumsum,
    chunk_states,
    from_chunks,
    log_space_scores,
    matmul,
    to_chunks,
)


def sub_chunk_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    sub_chunk_size: int,
    matmul_dtype: torch.dtype | None = None,
    diagonal: str = "log_space",
) -> torch.Tensor:
    """The intra-chunk score matrix P [..., C, C] built from sub-chunks (chapter 4).

    Args:
        q, k: [..., C, K];  G: [..., C, K] the chunk-local cumulative log decay (float64 is best).
        sub_chunk_size: L, dividing C.
        matmul_dtype: dtype of the off-diagonal operands (None: q's dtype).
        diagonal: how the diagonal sub-chunks are computed, both in float32 and exact:
            "log_space" — one exp per (i, j, k) triple, L x L x K per sub-chunk (the paper, the kernel);
            "split" — the sub-chunk trick again, halving down to single tokens (all products).
    Returns:
        P [..., C, C], lower triangular (diagonal included), in q's dtype.
    """
    *lead, C, K = q.shape
    L = sub_chunk_size
    S = C // L
    dt = q.dtype
    qs, ks, Gs = (x.reshape(*lead, S, L, K) for x in (q, k, G))
    ref = Gs[..., :1, :]  # [..., S, 1, K]: the first row of each query sub-chunk
    end = Gs[..., -1:, :]  # [..., S, 1, K]: the last row of each key sub-chunk
    q_tilde = qs * (Gs - ref).to(dt).exp()  # exp(G_i - G_ref) <= 1
    # k̃[a, b] = k_b exp(G_ref(a) - G_j) = k_b exp(G_end(b) - G_j) · exp(G_ref(a) - G_end(b)), both <= 1
    # for b < a. The first factor is per key, the second one number per (a, b, channel).
    k_to_end = ks * (end - Gs).to(dt).exp()
    between = ref.unsqueeze(-3) - end.unsqueeze(-4)  # [..., S_a, S_b, 1, K]
    earlier = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)[:, :, None, None]
    between = between.masked_fill(~earlier, float("-inf")).to(dt)
    k_tilde = k_to_end.unsqueeze(-4) * between.exp()  # [..., S_a, S_b, L, K]
    # One product per query sub-chunk a against all key sub-chunks b at once: [L, K] @ [K, S·L].
    P_pairs = matmul(q_tilde, k_tilde.reshape(*lead, S, S * L, K).transpose(-1, -2), matmul_dtype)
    P_pairs = P_pairs.reshape(*lead, S, L, S, L).transpose(-3, -2)  # [..., S_a, S_b, L, L]
    # Diagonal sub-chunks, in float32, relative to their own first row so the exponents stay small.
    G_local = (Gs - ref).to(dt)
    if diagonal == "log_space":
        P_diag = log_space_scores(qs, ks, G_local)  # [..., S, L, L]
    elif diagonal == "split":
        P_diag = split_scores(qs, ks, G_local)
    else:
        raise ValueError(f"diagonal must be 'log_space' or 'split', got {diagonal!r}")
    same = torch.eye(S, dtype=torch.bool, device=q.device)[:, :, None, None]
    P = torch.where(same, P_diag.unsqueeze(-3), P_pairs)
    return P.transpose(-3, -2).reshape(*lead, C, C)


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
        block[..., 1, :, 0, :, :] = (q_tilde @ k_tilde.transpose(-1, -2)).movedim(-3, -1)
        h //= 2
    return P


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
        initial_state: S_0 [B, H, K, V];  output_final_state: also return S_T.
        chunk_size: C, a power of two;  sub_chunk_size: L, a power of two <= C.
        matmul_dtype: dtype every matrix product's operands are rounded to (e.g. torch.bfloat16, as on
            tensor cores); accumulation, states and the diagonal sub-chunks stay float32.
        diagonal: "log_space" (default; as the paper and the Triton kernel) or "split" (recursive
            halving, all products; faster on a CPU). Both are exact.
    Returns:
        o [B, T, H, V] in q's dtype, and S_T [B, H, K, V] (float32, float64 for float64 inputs) or None.

    Exact for every legal gate. Differentiable by autograd.
    """
    info = validate(q, k, v, g, scale, initial_state)
    check_power_of_two("chunk_size", chunk_size)
    check_power_of_two("sub_chunk_size", sub_chunk_size)
    if sub_chunk_size > chunk_size:
        raise ValueError(f"sub_chunk_size must be <= chunk_size = {chunk_size}, got {sub_chunk_size}")
    if matmul_dtype is not None and matmul_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"matmul_dtype must be None or a floating dtype, got {matmul_dtype!r}")
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    dt = info.compute_dtype
    qc, kc, vc, gc = (to_chunks(x.to(dt), chunk_size) for x in (q, k, v, g))
    G = chunk_local_cumsum(gc)
    S0 = None if initial_state is None else initial_state.to(dt)
    states, final = chunk_states(kc, vc, G, S0, matmul_dtype)
    o_inter = matmul(qc * G.to(dt).exp(), states, matmul_dtype)
    P = sub_chunk_scores(qc, kc, G, sub_chunk_size, matmul_dtype, diagonal)
    o_intra = matmul(P, vc, matmul_dtype)
    o = info.scale * (o_inter + o_intra)
    return from_chunks(o, info.T).to(info.out_dtype), (final if output_final_state else None)
