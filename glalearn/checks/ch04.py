"""Chapter 4 exercises: one off-diagonal sub-chunk block, and the whole sub-chunk decomposition.

These two run in float32, as a kernel would: the point of secondary chunking is that every operand of
a product stays bounded (≤ 1) so it survives low precision, and under strong gates (τ = 0.1) the
unbounded factors exp(-G) overflow float32. Tolerance: relative RMSE 1e-5.
"""

from __future__ import annotations

import torch

from glalearn.checks.core import FORMS, Case, Exercise, Mistake
from glalearn.checks.inputs import label, log_gate, randn
from glalearn.forms.chunk import log_space_scores

NOTEBOOK = "04_secondary_chunking"
F32 = torch.float32
SCORES = ("glalearn.forms.chunk.log_space_scores", "glalearn.forms.chunk._log_space_scores",
          "glalearn.forms.two_level.sub_chunk_scores", "glalearn.forms.two_level._scores",
          "glalearn.forms.two_level.split_scores", "glalearn.forms.two_level.guarded_scores",
          "glalearn.forms.two_level._guarded_product")


def _chunk(gen, lead, C, K, tau):
    """q, k [*lead, C, K] and the chunk-local cumulative log decay G, all float32."""
    q, k = randn(gen, *lead, C, K, dtype=F32), randn(gen, *lead, C, K, dtype=F32)
    G = log_gate(gen, *lead, C, K, normalizer=tau).cumsum(-2).to(F32)
    return q, k, G


def _scores64(q, k, G, L=None):
    """The exact intra-chunk scores (chapter 3's log-space form, float64), rounded to float32 at the end.

    Every way of building P from sub-chunks must give these numbers; L does not change them.
    """
    return log_space_scores(q.double(), k.double(), G.double()).to(q.dtype)


# ----------------------------------------------------------------------------- 4.1 one block
def _block_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for lead, L, K, tau in (((1, 1, 1), 16, 16, 1.0), ((2, 2, 3), 16, 20, 0.1), ((1, 3, 2), 8, 60, 16.0),
                            ((1, 1, 2), 32, 12, 0.1)):
        q, k, G = _chunk(gen, lead, 2 * L, K, tau)  # key sub-chunk w = 0 right before query sub-chunk u = 1
        args = (q[..., L:, :], k[..., :L, :], G[..., L:, :], G[..., :L, :])
        sizes = dict(zip("BHN", lead))
        cases.append(Case(label(**sizes, L=L, K=K, tau=tau), args))
    return cases


def _block_reference(q_u, k_w, G_u, G_w):
    """Block (u, w) of the exact scores of the two sub-chunks [w; u] (w earlier, so G_u <= G_w)."""
    L = q_u.shape[-2]
    zeros = torch.zeros_like(q_u)
    q = torch.cat([zeros, q_u], dim=-2)
    k = torch.cat([k_w, zeros], dim=-2)
    return _scores64(q, k, torch.cat([G_w, G_u], dim=-2))[..., L:, :L]


def _block_with_reference(q_u, k_w, G_u, G_w, ref):
    return (q_u * (G_u - ref).exp()) @ (k_w * (ref - G_w).exp()).transpose(-1, -2)


SUB_CHUNK_BLOCK = Exercise(
    id="4.1",
    title="an off-diagonal sub-chunk block",
    points=2,
    signature="sub_chunk_block(q_u, k_w, G_u, G_w) -> P_uw",
    statement=(
        "Split a chunk into sub-chunks of L rows: sub-chunk u holds rows uL … uL+L−1. For a query sub-chunk "
        "$u$ and an **earlier** key sub-chunk $w < u$, every pair (i, j) is causal, and with the reference "
        "row $uL$, the first row of $u$ (paper §4.3):\n\n$P_{uw}[i, j] = \\sum_c \\underbrace{q_{ic}\\, e^{G_{ic} "
        "- G_{uL,c}}}_{\\tilde q_{ic},\\ |\\cdot| \\le |q_{ic}|}\\;\\underbrace{k_{jc}\\, e^{G_{uL,c} - "
        "G_{jc}}}_{\\tilde k_{jc},\\ |\\cdot| \\le |k_{jc}|}$, i.e. $P_{uw} = \\tilde q_u \\tilde k_w^\\top$ — one "
        "matmul of bounded operands.\n\nInputs (every tensor **float32**): `q_u`, `G_u` `[B, H, N, L, K]` (the "
        "rows of sub-chunk u), `k_w`, `G_w` `[B, H, N, L, K]` (the rows of sub-chunk w), G the chunk-local "
        "cumulative log decay. Return `P_uw` `[B, H, N, L, L]` float32: rows for the queries of u, columns "
        "for the keys of w. The check includes τ = 0.1, where $e^{-G_j}$ alone overflows float32."
    ),
    hints=(
        ("exp(G_i - G_j) = exp(G_i - G_uL) · exp(G_uL - G_j): split the exponent at the reference row uL, "
         "with G_j ≥ G_uL ≥ G_i, so both factors are ≤ 1."),
        ("The reference row is the first row of sub-chunk u: ref = G_u[..., :1, :] ([B, H, N, 1, K]); since w comes "
         "earlier, G_w ≥ ref ≥ G_u."),
        "return (q_u * (G_u - ref).exp()) @ (k_w * (ref - G_w).exp()).transpose(-1, -2)",
    ),
    reference=_block_reference,
    cases=_block_cases,
    outputs=(("P_uw", "[B, H, N, L, L]"),),
    tolerance=1e-5,
    forbidden=SCORES,
    mistakes=(
        Mistake("no reference row: exp(G_i) and exp(-G_j) as separate factors overflow float32 under strong "
                "gates; measure both from the reference row uL, the first row of sub-chunk u",
                lambda q_u, k_w, G_u, G_w: (q_u * G_u.exp()) @ (k_w * (-G_w).exp()).transpose(-1, -2)),
        Mistake("the reference row is in sub-chunk w: then exp(G_ref - G_j) ≥ 1 is unbounded; take the first row of u",
                lambda q_u, k_w, G_u, G_w: _block_with_reference(q_u, k_w, G_u, G_w, G_w[..., :1, :])),
        Mistake("the block is transposed: rows are the queries i of u, columns the keys j of w (q̃_u k̃_wᵀ, not k̃_w q̃_uᵀ)",
                lambda q_u, k_w, G_u, G_w: _block_with_reference(q_u, k_w, G_u, G_w, G_u[..., :1, :]).transpose(-1, -2)),
    ),
)


# ----------------------------------------------------------------------------- 4.2 the decomposition
def _scores_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for lead, C, L, K, tau in (((1, 1, 1), 16, 4, 16, 1.0), ((2, 2, 2), 64, 16, 20, 0.1),
                               ((1, 3, 1), 32, 8, 36, 16.0), ((1, 1, 3), 64, 8, 12, 0.1)):
        q, k, G = _chunk(gen, lead, C, K, tau)
        cases.append(Case(label(**dict(zip("BHN", lead)), C=C, L=L, K=K, tau=tau), (q, k, G, L)))
    return cases


def _block_masks(C: int, L: int):
    block = torch.arange(C) // L
    same = block[:, None] == block[None, :]
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    return same, causal


def _scores_no_diagonal(q, k, G, sub_chunk_size):
    same, _ = _block_masks(q.shape[-2], sub_chunk_size)
    return _scores64(q, k, G, sub_chunk_size).masked_fill(same, 0.0)


def _scores_diagonal_not_causal(q, k, G, sub_chunk_size):
    same, causal = _block_masks(q.shape[-2], sub_chunk_size)
    E = (G[..., :, None, :] - G[..., None, :, :]).exp()  # float32, all pairs
    full = (q[..., :, None, :] * k[..., None, :, :] * E).sum(-1)
    return torch.where(same & ~causal, full, _scores64(q, k, G, sub_chunk_size))


def _scores_naive(q, k, G, sub_chunk_size):
    _, causal = _block_masks(q.shape[-2], sub_chunk_size)
    return ((q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)).masked_fill(~causal, 0.0)


SUB_CHUNK_SCORES = Exercise(
    id="4.2",
    title="the sub-chunk decomposition",
    points=3,
    signature="sub_chunk_scores(q, k, G, sub_chunk_size) -> P",
    statement=(
        "Build a chunk's whole score matrix $P[i, j] = \\sum_c q_{ic}\\, k_{jc}\\, e^{G_{ic} - G_{jc}}$ ($j \\le "
        "i$, else 0) from sub-chunks of L rows: the blocks (u, w) whose key sub-chunk comes **before** the "
        "query sub-chunk (w < u) are matmuls of bounded operands (exercise 4.1); the **diagonal** blocks (w "
        "= u) straddle their own reference row, so compute them in log space (one exponent per pair, masked "
        "$j \\le i$); the blocks above the diagonal are 0.\n\nInputs: `q`, `k`, `G` `[B, H, N, C, K]`, every "
        "one **float32**; `sub_chunk_size` L a Python int dividing C. Return `P` `[B, H, N, C, C]` float32. "
        "Strong gates (τ = 0.1) are in the check."
    ),
    hints=(
        ("Loop over query sub-chunks u and key sub-chunks w ≤ u (C / L of each); w < u is 4.1's block, w = u the "
         "log-space form of chapter 3 on L rows."),
        ("For the diagonal block use exponents inside the block: E = G_u[..., :, None, :] - G_u[..., None, :, :], "
         "masked with -inf where j > i before exp."),
        ("P = q.new_zeros(*q.shape[:-1], C); for u in range(C // L): for w in range(u): P[..., u*L:(u+1)*L, "
         "w*L:(w+1)*L] = sub_chunk_block(...); then P[..., u-block, u-block] = the masked log-space scores."),
    ),
    reference=lambda q, k, G, sub_chunk_size: _scores64(q, k, G, sub_chunk_size),
    cases=_scores_cases,
    outputs=(("P", "[B, H, N, C, C]"),),
    tolerance=1e-5,
    forbidden=(*SCORES, *FORMS),
    mistakes=(
        Mistake("the diagonal sub-chunks are missing: the blocks w = u need the log-space path", _scores_no_diagonal),
        Mistake("the diagonal blocks are not causal: inside a block only j ≤ i contributes (mask with -inf before exp)",
                _scores_diagonal_not_causal),
        Mistake("the naive factorization exp(G_i) · exp(-G_j) over the whole chunk overflows float32; use "
                "sub-chunk reference rows", _scores_naive),
    ),
)

EXERCISES = [SUB_CHUNK_BLOCK, SUB_CHUNK_SCORES]
