"""Chapter 4 exercises: one off-diagonal sub-chunk block, and the whole sub-chunk decomposition.

These two run in float32, as a kernel would: the point of secondary chunking is that every operand of
a product stays bounded (≤ 1) so it survives low precision, and under strong gates (τ = 0.1) the
unbounded factors exp(-G) overflow float32. Tolerance: relative RMSE 1e-5.
"""

from __future__ import annotations

import torch

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import label, log_gate, randn
from glalearn.forms.chunk import log_space_scores

NOTEBOOK = "04_secondary_chunking"
F32 = torch.float32


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
        q, k, G = _chunk(gen, lead, 2 * L, K, tau)  # key sub-chunk b = 0 right before query sub-chunk a = 1
        args = (q[..., L:, :], k[..., :L, :], G[..., L:, :], G[..., :L, :])
        sizes = dict(zip("BHN", lead))
        cases.append(Case(label(**sizes, L=L, K=K, tau=tau), args))
    return cases


def _block_reference(q_a, k_b, G_a, G_b):
    """Block (a, b) of the exact scores of the two sub-chunks [b; a] (b earlier, so G_a <= G_b)."""
    L = q_a.shape[-2]
    zeros = torch.zeros_like(q_a)
    q = torch.cat([zeros, q_a], dim=-2)
    k = torch.cat([k_b, zeros], dim=-2)
    return _scores64(q, k, torch.cat([G_b, G_a], dim=-2))[..., L:, :L]


def _block_with_reference(q_a, k_b, G_a, G_b, ref):
    return (q_a * (G_a - ref).exp()) @ (k_b * (ref - G_b).exp()).transpose(-1, -2)


SUB_CHUNK_BLOCK = Exercise(
    id="4.1",
    title="an off-diagonal sub-chunk block",
    points=2,
    signature="sub_chunk_block(q_a, k_b, G_a, G_b) -> P_ab",
    statement=(
        "Split a chunk into sub-chunks of L tokens. For a query sub-chunk $a$ and an **earlier** key "
        "sub-chunk $b < a$, every pair is causal, and with the reference point $r$ = the first row of $a$ "
        "(paper §4.3):\n\n"
        "$P_{ab}[i, j] = \\sum_k \\underbrace{q_{ik} e^{G_{ik} - G_{rk}}}_{\\tilde q,\\ \\le |q|}\\;"
        "\\underbrace{k_{jk} e^{G_{rk} - G_{jk}}}_{\\tilde k,\\ \\le |k|}$, i.e. "
        "$P_{ab} = \\tilde Q_a \\tilde K_b^\\top$ — one matmul of bounded operands.\n\n"
        "Shapes: `q_a`, `G_a` `[B, H, N, L, K]` (sub-chunk a), `k_b`, `G_b` `[B, H, N, L, K]` (sub-chunk b); "
        "all **float32**, G the chunk-local cumulative log decay. Return `P_ab` `[B, H, N, L, L]` in float32. "
        "The check includes τ = 0.1, where $e^{-G_j}$ alone overflows float32."
    ),
    hints=(
        "exp(G_i - G_j) = exp(G_i - G_r) · exp(G_r - G_j): split the exponent at a point r with G_j ≥ G_r ≥ G_i, so both factors are ≤ 1.",
        "r is the first row of sub-chunk a: ref = G_a[..., :1, :] ([B, H, N, 1, K]); since b is earlier, G_b ≥ ref ≥ G_a.",
        "return (q_a * (G_a - ref).exp()) @ (k_b * (ref - G_b).exp()).transpose(-1, -2)",
    ),
    reference=_block_reference,
    cases=_block_cases,
    outputs=(("P_ab", "[B, H, N, L, L]"),),
    tolerance=1e-5,
    mistakes=(
        Mistake("no reference point: exp(G_i) and exp(-G_j) as separate factors overflow float32 under strong "
                "gates; measure both from r, the first row of sub-chunk a",
                lambda q_a, k_b, G_a, G_b: (q_a * G_a.exp()) @ (k_b * (-G_b).exp()).transpose(-1, -2)),
        Mistake("the reference point is in sub-chunk b: then exp(G_r - G_j) ≥ 1 is unbounded; take r in a",
                lambda q_a, k_b, G_a, G_b: _block_with_reference(q_a, k_b, G_a, G_b, G_b[..., :1, :])),
        Mistake("the block is transposed: rows are queries i of a, columns keys j of b (Q̃ K̃ᵀ, not K̃ Q̃ᵀ)",
                lambda q_a, k_b, G_a, G_b: _block_with_reference(q_a, k_b, G_a, G_b, G_a[..., :1, :]).transpose(-1, -2)),
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
        "Build a chunk's whole score matrix $P_{ij} = \\sum_k q_{ik} k_{jk} e^{G_{ik} - G_{jk}}$ ($j \\le i$, "
        "else 0) from sub-chunks of L tokens: blocks with the key sub-chunk **before** the query sub-chunk "
        "are matmuls of bounded operands (exercise 4.1); **diagonal** blocks straddle their own reference "
        "point, so compute them in log space (one exponent per pair, masked $j \\le i$); blocks above the "
        "diagonal are 0.\n\n"
        "Shapes: `q`, `k`, `G` `[B, H, N, C, K]` float32, `sub_chunk_size` L dividing C. Return `P` "
        "`[B, H, N, C, C]` float32. Strong gates (τ = 0.1) are in the check."
    ),
    hints=(
        "Loop over query sub-chunks a and key sub-chunks b ≤ a (S = C / L of each); b < a is 4.1's block, b = a the log-space form of chapter 3 on L tokens.",
        ("For the diagonal block use exponents relative to the block: D = G_a[..., :, None, :] - G_a[..., None, :, :], "
         "masked with -inf where j > i before exp."),
        ("P = q.new_zeros(*q.shape[:-1], C); for a in range(S): for b in range(a): P[..., a*L:(a+1)*L, b*L:(b+1)*L] = "
         "sub_chunk_block(...); then P[..., a-block, a-block] = the masked log-space scores."),
    ),
    reference=lambda q, k, G, sub_chunk_size: _scores64(q, k, G, sub_chunk_size),
    cases=_scores_cases,
    outputs=(("P", "[B, H, N, C, C]"),),
    tolerance=1e-5,
    mistakes=(
        Mistake("the diagonal sub-chunks are missing: blocks a = b need the log-space path", _scores_no_diagonal),
        Mistake("the diagonal blocks are not causal: inside a block only j ≤ i contributes (mask with -inf before exp)",
                _scores_diagonal_not_causal),
        Mistake("the naive factorization exp(G_i) · exp(-G_j) over the whole chunk overflows float32; use "
                "sub-chunk reference points", _scores_naive),
    ),
)

EXERCISES = [SUB_CHUNK_BLOCK, SUB_CHUNK_SCORES]
