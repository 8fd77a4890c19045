"""The recurrent form of GLA — the definition (chapter 1).

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t          (paper Eq. 3, with α_t = exp(g_t))
    o_t = scale * q_t S_t

One step costs O(K·V); the whole sequence O(T·K·V), strictly in order. Every other form in the book
is checked against this loop run in float64.
"""

from __future__ import annotations

import torch

from glalearn.forms._contract import cast_output, empty_result, validate


def recurrent_step(
    state: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, g_t: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (chapter 1).

    Args:
        state: S_{t-1}, [..., K, V].
        q_t, k_t, g_t: [..., K];  v_t: [..., V].
    Returns:
        (o_t [..., V], S_t [..., K, V]).
    """
    state = state * g_t.exp().unsqueeze(-1) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    o_t = scale * (q_t.unsqueeze(-2) @ state).squeeze(-2)
    return o_t, state


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA by its definition: a loop over time (chapter 1).

    Args:
        q, k: [B, T, H, K];  v: [B, T, H, V];  g: [B, T, H, K] log forget gates (<= 0).
        scale: multiplies q; default K ** -0.5.
        initial_state: S_{-1}, the state before token 0, [B, H, K, V] (float32 unless the inputs are float64).
        output_final_state: also return S_{T-1}, the state after the last token.
    Returns:
        o [B, T, H, V] in q's dtype, and S_{T-1} [B, H, K, V] (float32, or float64 for float64 inputs) or None.

    Computes in float32 (float64 when any input is float64). Differentiable by autograd, which stores
    every per-step state: O(T·K·V) memory. Chapter 5 shows how the chunk form avoids that.
    """
    info = validate(q, k, v, g, scale, initial_state)
    if info.T == 0:
        return empty_result(q, v, initial_state, output_final_state, info)
    dt = info.compute_dtype
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    if initial_state is None:
        state = q.new_zeros((info.B, info.H, info.K, info.V))
    else:
        state = initial_state.to(dt)
    outputs = []
    for t in range(info.T):
        o_t, state = recurrent_step(state, q[:, t], k[:, t], v[:, t], g[:, t], info.scale)
        outputs.append(o_t)
    o = cast_output(torch.stack(outputs, dim=1), info)
    return o, (state if output_final_state else None)
