"""The chunkwise form of GLA (chapter 3), with a hand-written backward (chapter 5).

Split the sequence into chunks of C tokens (chunk n holds tokens nC ... nC+C-1; notation of chapter 0).
Inside chunk n, with the chunk-local cumulative log decay G_i = g_{nC} + ... + g_{nC+i} (so
Λ_i = exp(G_i), Γ_i = exp(γ - G_i), and γ = G_{C-1} the log decay across the chunk), chunk n reads the
state S_[n] entering it and writes S_[n+1]:

    S_[n+1] = Diag(exp(γ_[n])) S_[n] + (k_[n] ⊙ Γ_[n])^T v_[n]                  state passed between chunks
    o_[n]   = scale * (q_[n] ⊙ Λ_[n]) S_[n]                                      inter-chunk: the past
            + scale * P_[n] v_[n],   P_[n][i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc)  intra-chunk, j <= i

Only N = T / C steps are sequential; everything else is a batched product. The intra-chunk scores are
computed in log space (every exponent <= 0), so the form is exact for every legal gate; chapter 4
makes that part matmul-shaped. Cost: O(T·C·K) for the scores, O(T·K·V) for states and outputs.
"""

from __future__ import annotations

import torch

from glalearn.forms._contract import cast_output, check_power_of_two, empty_result, validate

# The intra-chunk score tensors [chunks, C, C, K] are processed in groups of at most this many elements.
_GROUP_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- layout helpers
def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padding T up to N * C (chapter 3).

    Zero padding is harmless: padded k and v add nothing to the state, and a padded g = 0 means
    "no decay", so the state leaves the last chunk unchanged by the padding.
    """
    B, T, H, D = x.shape
    N = -(-T // chunk_size)
    x = x.transpose(1, 2)
    if N * chunk_size != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, N * chunk_size - T))
    return x.reshape(B, H, N, chunk_size, D).contiguous()


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padding (chapter 3)."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :T].transpose(1, 2)


def chunk_local_cumsum(g_chunks: torch.Tensor) -> torch.Tensor:
    """G = log Λ: the chunk-local cumulative log decay, G_i = g_{nC} + ... + g_{nC+i}. [..., C, K] (chapter 3).

    Accumulated in float64: under strong gates G reaches hundreds, and a float32 prefix sum of that
    size keeps only ~1e-5 of the small differences G_i - G_j that the exponents need. Every consumer
    takes a difference first and rounds to the compute dtype just before exp.
    """
    return g_chunks.cumsum(dim=-2, dtype=torch.float64)


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """a @ b with both operands rounded to ``dtype`` (None: as given); result in a's dtype (chapter 4)."""
    if dtype is None or dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


# ----------------------------------------------------------------------------- the forward pieces
def chunk_states(
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    G: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-chunk recurrence S_[n+1] = Diag(exp(γ_[n])) S_[n] + (k_[n] ⊙ Γ_[n])^T v_[n] (chapter 3).

    Args:
        k_chunks: [B, H, N, C, K];  v_chunks: [B, H, N, C, V];  G: chunk-local cumulative log decay.
        initial_state: S_[0] [B, H, K, V] or None (zeros).
        matmul_dtype: dtype of the operands of the update product (chapter 4); states stay in G's dtype.
    Returns:
        (states [B, H, N, K, V]: S_[0] ... S_[N-1], the state entering each chunk; final_state S_[N] [B, H, K, V]).
    """
    dt = k_chunks.dtype
    gamma = G[:, :, :, -1, :]  # [B, H, N, K] log decay over the whole chunk
    # Every chunk's own contribution in one batched product; exp(γ - G) <= 1, never overflows.
    k_decayed = k_chunks * (gamma.unsqueeze(-2) - G).to(dt).exp()
    updates = matmul(k_decayed.transpose(-1, -2), v_chunks, matmul_dtype)
    return pass_states(updates, gamma.to(dt).exp(), initial_state)


def pass_states(
    updates: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk S_[n+1] = Diag(decay_[n]) S_[n] + update_[n] over the chunks: the only sequential loop (chapter 3).

    Args: updates: [B, H, N, K, V];  decay exp(γ): [B, H, N, K];  initial_state S_[0]: [B, H, K, V] or None.
    Returns: (S_[0] ... S_[N-1], the states entering each chunk [B, H, N, K, V], S_[N] [B, H, K, V]).
    """
    B, H, N, K, V = updates.shape
    decay = decay.unsqueeze(-1)
    state = updates.new_zeros((B, H, K, V)) if initial_state is None else initial_state
    states = []
    for n in range(N):  # N = T / C steps
        states.append(state)
        state = decay[:, :, n] * state + updates[:, :, n]
    return torch.stack(states, dim=2), state


def log_space_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """P[i, j] = Σ_c q_ic k_jc exp(G_ic - G_jc) for j <= i, else 0 (chapter 3; no scale).

    Args: q, k, G: [..., C, K]. Returns: [..., C, C]. Every exponent is <= 0, so nothing overflows.
    Differentiable in q, k and G (the G gradient by the gate-gradient trick, chapter 5).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, G)):
        return _LogSpaceScores.apply(q, k, G)
    return _log_space_scores(q, k, G)


def _log_space_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    *lead, C, K = q.shape
    q3, k3, G3 = (x.reshape(-1, C, K) for x in (q, k, G))
    out = q3.new_empty((q3.shape[0], C, C))
    upper = ~torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    step = max(1, _GROUP_ELEMENTS // (C * C * K))
    for a in range(0, q3.shape[0], step):
        b = min(q3.shape[0], a + step)
        E = (G3[a:b, :, None, :] - G3[a:b, None, :, :]).to(q.dtype)  # [m, i, j, K]: G_i - G_j
        E.masked_fill_(upper[..., None], float("-inf")).exp_().mul_(k3[a:b, None, :, :])
        out[a:b] = (E.reshape(-1, C, K) @ q3[a:b].reshape(-1, K, 1)).reshape(b - a, C, C)
    return out.reshape(*lead, C, C)


def log_space_scores_backward(
    dP: torch.Tensor, q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, with_scores: bool = False
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`log_space_scores` with respect to q and k, holding G fixed (chapter 5).

    dq_ic = Σ_j dP_ij k_jc exp(G_ic - G_jc),  dk_jc = Σ_i dP_ij q_ic exp(G_ic - G_jc).
    The gradient with respect to G follows from these by the gate-gradient trick.
    With ``with_scores`` also returns the scores P themselves, from the same exps (the backward
    needs P for dv and would otherwise compute every exp once more).
    """
    C, K = q.shape[-2:]
    q3, k3, G3 = (x.reshape(-1, C, K) for x in (q, k, G))
    dP3 = dP.reshape(-1, C, C)
    dq, dk = torch.empty_like(q3), torch.empty_like(k3)
    P = q3.new_empty((q3.shape[0], C, C)) if with_scores else None
    upper = ~torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    step = max(1, _GROUP_ELEMENTS // (C * C * K))
    for a in range(0, q3.shape[0], step):
        b, m = min(q3.shape[0], a + step), min(q3.shape[0], a + step) - a
        E = (G3[a:b, :, None, :] - G3[a:b, None, :, :]).to(q.dtype)  # [m, i, j, K]
        E.masked_fill_(upper[..., None], float("-inf")).exp_()
        Ek = (E * k3[a:b, None, :, :]).reshape(-1, C, K)  # exp(G_i - G_j) k_j
        if with_scores:
            P[a:b] = (Ek @ q3[a:b].reshape(-1, K, 1)).reshape(m, C, C)
        dq[a:b] = (dP3[a:b].reshape(-1, 1, C) @ Ek).reshape(m, C, K)
        ET = E.transpose(1, 2).mul_(q3[a:b, None, :, :])  # [m, j, i, K]: exp(G_i - G_j) q_i
        dk[a:b] = (dP3[a:b].transpose(1, 2).reshape(-1, 1, C) @ ET.reshape(-1, C, K)).reshape(m, C, K)
    if with_scores:
        return dq.reshape(q.shape), dk.reshape(k.shape), P.reshape(*q.shape[:-1], C)
    return dq.reshape(q.shape), dk.reshape(k.shape)


class _LogSpaceScores(torch.autograd.Function):
    """Autograd for :func:`log_space_scores`; dG_i = q_i ⊙ dq_i - k_i ⊙ dk_i (the diagonal cancels)."""

    @staticmethod
    def forward(ctx, q, k, G):
        ctx.save_for_backward(q, k, G)
        return _log_space_scores(q, k, G)

    @staticmethod
    def backward(ctx, dP):
        q, k, G = ctx.saved_tensors
        diag = dP.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        dq, dk = log_space_scores_backward(dP.tril(-1), q, k, G)
        dG = (q * dq - k * dk).to(G.dtype)
        return dq + diag * k, dk + diag * q, dG


def reverse_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """y_t = Σ_{i >= t} x_i along ``dim`` (chapter 5: d g_t = Σ_{i >= t} d log b_i)."""
    return x.flip(dim).cumsum(dim).flip(dim)


# ----------------------------------------------------------------------------- autograd
class ChunkGLAFunction(torch.autograd.Function):
    """The chunk form with a hand-written backward (chapter 5).

    The forward keeps no chunk states for the backward: it saves only q, k, v, g and S_[0] and
    recomputes the N chunk states there (N·K·V numbers, never the T·K·V per-step states).
    The gate gradient uses the paper's trick: d log b_t = q_t ⊙ dq_t - k_t ⊙ dk_t, then
    dg_t = Σ_{t' >= t} d log b_{t'} (a reverse cumulative sum), grouped so that nothing large cancels.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state):
        T = q.shape[1]
        qc, kc, vc, gc = (to_chunks(x, chunk_size) for x in (q, k, v, g))
        G = chunk_local_cumsum(gc)
        states, final = chunk_states(kc, vc, G, initial_state)
        o = scale * ((qc * G.to(qc.dtype).exp()) @ states) + scale * (_log_space_scores(qc, kc, G) @ vc)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return from_chunks(o, T), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, initial_state = ctx.saved_tensors
        scale, C, T = ctx.scale, ctx.chunk_size, q.shape[1]
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        qc, kc, vc, gc, doc = (to_chunks(x, C) for x in (q, k, v, g, do))
        G = chunk_local_cumsum(gc)
        states, final = chunk_states(kc, vc, G, initial_state)  # recomputed, not stored
        gamma = G[:, :, :, -1:, :]
        q_decay = G.to(qc.dtype).exp()  # Λ
        q_decayed = qc * q_decay  # q ⊙ Λ
        k_decay = (gamma - G).to(qc.dtype).exp()  # Γ
        # dS_[n]: the gradient reaching the state entering chunk n, walked backwards through the chunks.
        local = scale * q_decayed.transpose(-1, -2) @ doc  # [B, H, N, K, V] from o_[n]'s inter term
        decay = gamma.squeeze(-2).to(qc.dtype).exp().unsqueeze(-1)
        d_state = torch.zeros_like(final) if dfinal is None else dfinal
        d_leaving = []  # dS_[n+1], the gradient at the state leaving chunk n
        for n in reversed(range(qc.shape[2])):
            d_leaving.append(d_state)
            d_state = decay[:, :, n] * d_state + local[:, :, n]
        d_leaving = torch.stack(d_leaving[::-1], dim=2)
        # Intra-chunk part, log space. The diagonal pairs (i = j, decay exp(0) = 1) are kept apart:
        # they add q_i k_i dP_ii to both q ⊙ dq and k ⊙ dk, which cancel exactly in the gate gradient,
        # and computing them twice would leave only their rounding error behind.
        dP = doc @ vc.transpose(-1, -2)
        dP_diag = scale * dP.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [B, H, N, C, 1]
        dq, dk, P = log_space_scores_backward(dP.tril(-1), qc, kc, G, with_scores=True)
        dq, dk = scale * dq, scale * dk
        dv = scale * P.transpose(-1, -2) @ doc
        # Inter-chunk part: o_[n] = scale (q⊙Λ) S_[n] and S_[n+1] = ... + (k⊙Γ)^T v.
        dq = dq + scale * (doc @ states.transpose(-1, -2)) * q_decay
        dk_state = (vc @ d_leaving.transpose(-1, -2)) * k_decay  # through S_[n+1]
        dv = dv + (kc * k_decay) @ d_leaving
        # The gate-gradient trick: d log b_t = q_t ⊙ dq_t - k_t ⊙ dk_t, summed over t' >= t. Written as
        # one reverse sum it subtracts large, nearly equal totals whenever gates are strong, so the
        # terms are grouped by the pairs (query, key) whose decay spans t (key < t <= query), none
        # subtracted:
        #   - both in the chunk, and the chunk's outputs against the past: reverse sum inside the chunk
        #     of q ⊙ dq - k ⊙ dk_intra (bounded to C terms);
        #   - key j < t of the chunk read after the chunk (through S_[n+1]): a forward sum of k ⊙ dk_state
        #     over j < t;
        #   - the past S_[n] read after the chunk: exp(γ) ⊙ (S_[n] ⊙ dS_[n+1]) 1, the same for every t.
        within = (qc * dq - kc * dk).to(torch.float64)
        through_state = (kc * dk_state).to(torch.float64)
        earlier_keys = through_state.cumsum(-2) - through_state  # Σ_{j < t}
        past = decay.squeeze(-1).double() * (states * d_leaving).sum(-1, dtype=torch.float64)  # [B, H, N, K]
        dg = reverse_cumsum(within, dim=-2) + earlier_keys + past.unsqueeze(-2)
        dg = from_chunks(dg.to(qc.dtype), T)
        dk = dk + dk_state
        dq, dk, dv = (from_chunks(x, T) for x in (dq + dP_diag * kc, dk + dP_diag * qc, dv))
        d_initial = d_state if initial_state is not None else None
        return dq, dk, dv, dg, d_initial, None, None, None


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA in chunks: states passed between chunks, parallel inside (chapters 3 and 5).

    Args:
        q, k: [B, T, H, K];  v: [B, T, H, V];  g: [B, T, H, K] log forget gates (<= 0).
        scale: multiplies q; default K ** -0.5.
        initial_state: S_[0] [B, H, K, V];  output_final_state: also return S_[N], the final state.
        chunk_size: C, a power of two; T need not be a multiple of it.
    Returns:
        o [B, T, H, V] in q's dtype, and S_[N] [B, H, K, V] (float32, float64 for float64 inputs) or None.

    Exact for every legal gate (intra-chunk scores in log space). Differentiable through a
    hand-written backward that recomputes chunk states and uses the gate-gradient trick.
    """
    info = validate(q, k, v, g, scale, initial_state)
    check_power_of_two("chunk_size", chunk_size)
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    dt = info.compute_dtype
    S0 = None if initial_state is None else initial_state.to(dt)
    o, final = ChunkGLAFunction.apply(
        q.to(dt), k.to(dt), v.to(dt), g.to(dt), S0, info.scale, chunk_size, output_final_state
    )
    return cast_output(o, info), (final if output_final_state else None)
