"""Counting the work of each GLA form: FLOPs, exps, sequential steps, memory (chapters 3-5).

A cost model, not a timer: it counts what an algorithm must compute for one head of one sequence
(batch and heads multiply every number). A multiply-add counts as 2 FLOPs. FLOPs are split into

* ``matmul_flops`` — dense matrix-matrix products, the shape tensor cores (and CPU BLAS) are fast at;
* ``other_flops``  — elementwise work and matrix-vector products;
* ``exps``         — exp evaluations, counted apart because they are far dearer than a multiply
  (GPU special-function units run at a small fraction of tensor-core throughput).

Dense products are counted at full size (a causal C x C matrix times V counts 2·C·C·V), as hardware
runs them; entrywise log-space scores are counted only for the pairs j <= i that are needed. The
counts describe the algorithms of the paper, not the eager PyTorch code of ``glalearn.forms``, which
sometimes computes masked entries it then throws away.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormCost:
    """The work of one GLA form for one head (chapter 3)."""

    matmul_flops: int
    other_flops: int
    exps: int
    sequential_steps: int

    @property
    def flops(self) -> int:
        """All FLOPs (matmul + other; exps not included)."""
        return self.matmul_flops + self.other_flops

    def __add__(self, other: FormCost) -> FormCost:
        return FormCost(self.matmul_flops + other.matmul_flops, self.other_flops + other.other_flops,
                        self.exps + other.exps, self.sequential_steps + other.sequential_steps)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def num_chunks(T: int, chunk_size: int) -> int:
    """N = ceil(T / C): the number of chunks, and the sequential steps of the chunk form (chapter 3)."""
    _check_sizes(T=T, chunk_size=chunk_size)
    return -(-T // chunk_size)


def recurrent_cost(T: int, K: int, V: int) -> FormCost:
    """The recurrence S_t = Diag(α_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t, step by step (chapter 3).

    Per step: K exps (α_t = exp(g_t)); decay K·V, outer product and add 2·K·V, read-out 2·K·V.
    No matrix-matrix product anywhere, and T steps in order.
    """
    _check_sizes(T=T, K=K, V=V)
    return FormCost(matmul_flops=0, other_flops=5 * T * K * V, exps=T * K, sequential_steps=T)


def _log_space_pairs(n: int) -> int:
    return n * (n + 1) // 2  # pairs j <= i among n tokens


def log_space_scores_cost(C: int, K: int) -> FormCost:
    """P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for the C(C+1)/2 pairs j <= i (chapters 2-3).

    One exp per (i, j, c) triple, plus a subtraction, two multiplies and an add: not a matmul.
    """
    _check_sizes(C=C, K=K)
    triples = _log_space_pairs(C) * K
    return FormCost(matmul_flops=0, other_flops=4 * triples, exps=triples, sequential_steps=0)


def parallel_cost(T: int, K: int, V: int, log_space: bool = True) -> FormCost:
    """The parallel form o = scale · A v over the whole sequence (chapter 2, for comparison in chapter 3).

    ``log_space=False``: (q⊙b)(k/b)^T is one T x T x K product (plus 2·T·K exps and scalings);
    ``log_space=True``: the scores A entrywise, one exp per (t, s, c) triple. Either way one step.
    """
    _check_sizes(T=T, K=K, V=V)
    output = 2 * T * T * V
    if log_space:
        scores = log_space_scores_cost(T, K)
        return FormCost(output, scores.other_flops, scores.exps, 1)
    return FormCost(2 * T * T * K + output, 2 * T * K + T * T, 2 * T * K, 1)


def chunk_cost(T: int, K: int, V: int, chunk_size: int) -> FormCost:
    """The chunkwise form of paper §4.2 with log-space intra-chunk scores (chapter 3).

    With N = ceil(T / C) chunks (T padded to N·C):

    * decays: Λ = exp(G) and Γ = exp(γ - G), 2·N·C·K exps; q⊙Λ and k⊙Γ, 2·N·C·K FLOPs;
    * chunk states: (k⊙Γ)^T v, a C-deep product per chunk, 2·N·C·K·V matmul FLOPs; the recurrence
      S_[n+1] = Diag(exp(γ_[n])) S_[n] + ... costs 2·K·V per chunk and N·K exps: the N sequential steps;
    * inter-chunk output (q⊙Λ) S_[n]: 2·N·C·K·V matmul FLOPs;
    * intra-chunk scores in log space: N·C(C+1)/2·K exps (see :func:`log_space_scores_cost`);
    * intra-chunk output P v: 2·N·C·C·V matmul FLOPs.
    """
    N = num_chunks(T, chunk_size)
    _check_sizes(K=K, V=V)
    C = chunk_size
    Tp = N * C
    scores = log_space_scores_cost(C, K)
    matmul_flops = 2 * Tp * K * V + 2 * Tp * K * V + 2 * N * C * C * V
    other_flops = 2 * Tp * K + 2 * N * K * V + N * scores.other_flops
    exps = 2 * Tp * K + N * K + N * scores.exps
    return FormCost(matmul_flops, other_flops, exps, N)


def two_level_cost(T: int, K: int, V: int, chunk_size: int, sub_chunk_size: int) -> FormCost:
    """Secondary-level chunking, paper §4.3 (chapter 4): the intra-chunk scores from sub-chunks of L.

    Per chunk, with C / L sub-chunks: the (C/L)(C/L - 1)/2 pairs of an earlier key sub-chunk and a later
    query sub-chunk are one L x K x L product each (2·L·L·K matmul FLOPs), against the bounded factors
    q̃ = q ⊙ exp(G - G_uL) and k̃ = k ⊙ exp(G_uL - G), with uL the query sub-chunk's first row
    (2·C·K exps and multiplies for the per-token parts, one more K-vector of exps per pair); the C / L
    diagonal sub-chunks stay in log space,
    L(L+1)/2·K exps each. Everything else is as in :func:`chunk_cost`.
    """
    N = num_chunks(T, chunk_size)
    _check_sizes(K=K, V=V, sub_chunk_size=sub_chunk_size)
    C, L = chunk_size, sub_chunk_size
    if C % L:
        raise ValueError(f"sub_chunk_size must divide chunk_size = {C}, got {L}")
    S = C // L
    pairs = S * (S - 1) // 2
    base = chunk_cost(T, K, V, C)
    log_scores = log_space_scores_cost(C, K)
    diagonal = log_space_scores_cost(L, K)
    intra_matmul = pairs * 2 * L * L * K
    intra_other = 2 * C * K + pairs * L * K + S * diagonal.other_flops
    intra_exps = 2 * C * K + pairs * K + S * diagonal.exps
    return FormCost(
        base.matmul_flops + N * intra_matmul,
        base.other_flops - N * log_scores.other_flops + N * intra_other,
        base.exps - N * log_scores.exps + N * intra_exps,
        N,
    )


def state_memory(T: int, K: int, V: int, chunk_size: int | None = None) -> int:
    """How many state entries the backward pass needs, for one head (chapter 5).

    ``chunk_size=None``: autograd through the recurrence keeps every S_t, T·K·V numbers.
    ``chunk_size=C``: the chunk form's backward recomputes only the N = ceil(T / C) chunk states,
    N·K·V numbers (and saves none of them in the forward).
    """
    _check_sizes(T=T, K=K, V=V)
    steps = T if chunk_size is None else num_chunks(T, chunk_size)
    return steps * K * V
