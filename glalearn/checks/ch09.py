"""Chapter 9 exercise: one recurrent generation step of a GLA layer."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from glalearn.checks.ch08 import EPS, TAU, layer_from_weights, layer_weights
from glalearn.checks.core import KV_TRANSPOSED, Case, Exercise, Mistake
from glalearn.checks.inputs import label, randn

NOTEBOOK = "09_training"


def gla_layer_step(x_t, state, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    """The library layer's ``step`` with these weights (the reference of exercise 9.1)."""
    return layer_from_weights(W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads).step(x_t, state)


def _cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, d, H in ((1, 16, 2), (3, 24, 4), (2, 40, 1), (1, 32, 4)):
        x_t = randn(gen, B, d)
        state = randn(gen, B, H, d // 2 // H, d // H)
        cases.append(Case(label(B=B, d=d, H=H), (x_t, state, *layer_weights(gen, d, H), H)))
    return cases


def _step(x_t, state, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads, *, tau=TAU, gate_new=False,
          old_state=False, kv_transposed=False):
    B, H = x_t.shape[0], num_heads
    q, k = (x_t @ W_q).view(B, H, -1), (x_t @ W_k).view(B, H, -1)
    v = (x_t @ W_v).view(B, H, -1)
    alpha = (F.logsigmoid(x_t @ W_1 @ W_2 + b) / tau).view(B, H, -1).exp().unsqueeze(-1)
    kv = v.unsqueeze(-1) * k.unsqueeze(-2) if kv_transposed else k.unsqueeze(-1) * v.unsqueeze(-2)
    new = alpha * (state + kv) if gate_new else alpha * state + kv
    read = state if old_state else new
    o = q.shape[-1] ** -0.5 * (q.unsqueeze(-2) @ read).squeeze(-2)
    o = F.rms_norm(o, (o.shape[-1],), w_norm, EPS).flatten(1)
    return (o * F.silu(x_t @ W_r)) @ W_o, new


LAYER_STEP = Exercise(
    id="9.1",
    title="a recurrent generation step",
    points=2,
    signature="gla_step(x_t, state, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads) -> (y_t, new_state)",
    statement=(
        "Run one token through the GLA layer of exercise 8.1 **recurrently**, as `generate` does for every "
        "new character: project $x_t$ to $q_t, k_t, v_t$ and the log gate $g_t = \\mathrm{logsigmoid}(x_t "
        "W_\\alpha^1 W_\\alpha^2 + b_\\alpha)/16$ (per head), update the state\n\n$$S_t = "
        "\\mathrm{Diag}(e^{g_t})\\, S_{t-1} + k_t^\\top v_t, \\qquad o_t = K^{-1/2}\\, q_t S_t,$$\n\nthen apply the "
        "per-head RMSNorm (eps 1e-5, weight `w_norm`), the output gate $r_t = \\mathrm{Swish}(x_t W_r)$ and "
        "$W_O$.\n\nInputs (every tensor float64): `x_t` `[B, d]`; `state` $S_{t-1}$ `[B, H, K, V]` (row c for "
        "key channel c); the weights as in 8.1; `num_heads` H a Python int. Return `(y_t [B, d], new_state "
        "[B, H, K, V])`, both float64: `new_state` is $S_t$."
    ),
    hints=(
        "Per head, this is chapter 1's recurrent step; around it are the layer's projections of exercise 8.1.",
        "Reshape the projections to [B, H, K] (v to [B, H, V]): q = (x_t @ W_q).view(B, H, -1). The gate scales the ROWS of S.",
        ("new = g.exp().unsqueeze(-1) * state + k.unsqueeze(-1) * v.unsqueeze(-2); "
         "o = K ** -0.5 * (q.unsqueeze(-2) @ new).squeeze(-2); then rms_norm per head, flatten, silu gate, @ W_o"),
    ),
    reference=gla_layer_step,
    cases=_cases,
    outputs=(("y_t", "[B, d]"), ("new_state", "[B, H, K, V]")),
    tolerance=1e-5,  # the layer computes in float32
    state_outputs=("new_state",),
    state_inputs=("state",),
    forbidden=("glalearn.layers.GatedLinearAttention.step", "glalearn.layers.GatedLinearAttention.forward",
               layer_from_weights),
    mistakes=(
        Mistake(KV_TRANSPOSED, lambda *a: _step(*a, kv_transposed=True)),
        Mistake("the gate also decays the new k_tᵀv_t; only the old state is decayed",
                lambda *a: _step(*a, gate_new=True)),
        Mistake("o_t reads the old state S_{t-1}; it must read the updated S_t", lambda *a: _step(*a, old_state=True)),
        Mistake("the gate is not divided by τ = 16", lambda *a: _step(*a, tau=1.0)),
    ),
)

EXERCISES = [LAYER_STEP]
