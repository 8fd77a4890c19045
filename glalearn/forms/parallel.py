"""The parallel form of GLA (chapter 2).

Unrolling the recurrence gives, with b_t = exp(G_t), G_t = g_0 + ... + g_t (cumulative log decay, tokens
counted from 0; notation of chapter 0) and b the T x K matrix whose row t is b_t,

    o_t = scale * sum_{s <= t} (q_t ⊙ b_t) · (k_s / b_s)  v_s                  (paper Eq. 4, first form)
    o   = scale * A v,   A = ((q ⊙ b)(k / b)^T) ⊙ M                            M: causal mask

That is one matrix product, but k / b = k_s · exp(-G_s) overflows float32 once G_s < -88
(float16: once G_s < -11), and q ⊙ b underflows. The stable log-space form computes each entry as

    A[t, s] = sum_c q_tc k_sc exp(G_tc - G_sc)        (s <= t, so the exponent is <= 0)

which never overflows but is no longer a matrix product: every (t, s, c) triple needs its own exp,
so it cannot run on tensor cores. Both cost O(T^2) in time.
"""

from __future__ import annotations

import torch

from glalearn.forms._contract import cast_output, empty_result, validate

# Row blocks of the log-space form are sized so one block's [rows, T, K] tensor stays this small.
_LOG_SPACE_BLOCK_ELEMENTS = 1 << 23


def causal_mask(T: int, device=None) -> torch.Tensor:
    """M [T, T]: True where key position s <= query position t (chapter 2)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def parallel_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    log_space: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA as one T x T attention-like product (chapter 2).

    Args:
        q, k: [B, T, H, K];  v: [B, T, H, V];  g: [B, T, H, K] log forget gates (<= 0).
        scale: multiplies q; default K ** -0.5.
        initial_state: S_{-1} [B, H, K, V];  output_final_state: also return S_{T-1}.
        log_space: False gives the textbook form scale·((q⊙b)(k/b)^T ⊙ M) v. It feeds q⊙b and k/b to the
            matrix product in the inputs' dtype (as tensor cores would receive them), so it overflows
            to inf/NaN once the cumulative decay passes the dtype's range: float32 at G < -88,
            float16 at G < -11. True (default) gives the stable form of paper Eq. 4.
    Returns:
        o [B, T, H, V] in q's dtype, and S_{T-1} [B, H, K, V] or None.

    Time and memory O(T^2) (the log-space form works in row blocks so memory stays bounded).
    """
    info = validate(q, k, v, g, scale, initial_state)
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    dt = info.compute_dtype
    # [B, H, T, D]: heads become a batch dimension.
    q, k, v, g = (x.to(dt).transpose(1, 2) for x in (q, k, v, g))
    G = g.to(torch.float64).cumsum(dim=2)  # log b_t, accumulated in float64 (see chunk_local_cumsum)
    mask = causal_mask(info.T, q.device)
    if log_space:
        o = _log_space_output(q, k, v, G, mask, info.scale)
    else:
        # The matmul-shaped form. q⊙b and k/b are rounded to the input dtype before the product.
        q_tilde = (q * G.to(dt).exp()).to(info.out_dtype).to(dt)
        k_tilde = (k * (-G).to(dt).exp()).to(info.out_dtype).to(dt)
        P = (q_tilde @ k_tilde.transpose(-1, -2)).masked_fill(~mask, 0.0)
        o = info.scale * (P @ v)
    final = None
    if initial_state is not None or output_final_state:
        S0 = None if initial_state is None else initial_state.to(dt)
        if S0 is not None:
            # The initial state enters every output through the decay since the start, exp(G_t) <= 1.
            o = o + info.scale * ((q * G.to(dt).exp()) @ S0)
        if output_final_state:
            G_T = G[:, :, -1:, :]
            if log_space:
                k_decayed = k * (G_T - G).to(dt).exp()  # exp(G_T - G_s) <= 1
            else:
                k_decayed = (k * (-G).to(dt).exp()) * G_T.to(dt).exp()
            final = k_decayed.transpose(-1, -2) @ v
            if S0 is not None:
                final = final + G_T.transpose(-1, -2).to(dt).exp() * S0
    return cast_output(o.transpose(1, 2), info, check=log_space), final  # the textbook form may overflow


def _log_space_output(q, k, v, G, mask, scale):
    """sum_{s<=t} scale * (sum_k q_tk k_sk exp(G_tk - G_sk)) v_s, computed in blocks of query rows."""
    B, H, T, K = q.shape
    rows = max(1, min(T, _LOG_SPACE_BLOCK_ELEMENTS // max(1, B * H * T * K)))
    outputs = []
    for start in range(0, T, rows):
        stop = min(T, start + rows)
        # Only keys s < stop can be seen by these queries.
        diff = (G[:, :, start:stop, None, :] - G[:, :, None, :stop, :]).to(q.dtype)  # [B, H, rows, s, K]
        diff = diff.masked_fill(~mask[start:stop, :stop, None], float("-inf"))
        P = (q[:, :, start:stop, None, :] * k[:, :, None, :stop, :] * diff.exp()).sum(-1)
        outputs.append(scale * (P @ v[:, :, :stop]))
    return torch.cat(outputs, dim=2)
