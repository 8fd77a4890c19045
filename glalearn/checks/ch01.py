"""Chapter 1 exercises: one recurrent step, the full recurrent form, the gate parameterization."""

from __future__ import annotations

import torch

from glalearn.checks.core import FORMS, KV_TRANSPOSED, Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label, log_gate, randn
from glalearn.forms.parallel import parallel_gla
from glalearn.forms.recurrent import recurrent_step
from glalearn.gates import gla_gate

NOTEBOOK = "01_linear_attention_and_the_gate"


# ----------------------------------------------------------------------------- 1.1 one recurrent step
def _step_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, H, K, V, tau in ((1, 1, 16, 16, 1.0), (2, 3, 20, 36, 0.1), (1, 2, 60, 100, 16.0), (3, 1, 7, 5, 1.0)):
        args = (randn(gen, B, H, K, V), randn(gen, B, H, K), randn(gen, B, H, K), randn(gen, B, H, V),
                log_gate(gen, B, H, K, normalizer=tau), K ** -0.5)
        cases.append(Case(label(B=B, H=H, K=K, V=V, tau=tau), args))
    return cases


def _step_gate_after_add(state, q_t, k_t, v_t, g_t, scale):
    state = (state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)) * g_t.exp().unsqueeze(-1)
    return scale * (q_t.unsqueeze(-2) @ state).squeeze(-2), state


def _step_no_gate(state, q_t, k_t, v_t, g_t, scale):
    return recurrent_step(state, q_t, k_t, v_t, torch.zeros_like(g_t), scale)


def _step_log_not_exp(state, q_t, k_t, v_t, g_t, scale):
    state = state * g_t.unsqueeze(-1) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return scale * (q_t.unsqueeze(-2) @ state).squeeze(-2), state


def _step_old_state_output(state, q_t, k_t, v_t, g_t, scale):
    o_t = scale * (q_t.unsqueeze(-2) @ state).squeeze(-2)
    return o_t, recurrent_step(state, q_t, k_t, v_t, g_t, scale)[1]


def _step_no_scale(state, q_t, k_t, v_t, g_t, scale):
    return recurrent_step(state, q_t, k_t, v_t, g_t, 1.0)


def _step_kv_transposed(state, q_t, k_t, v_t, g_t, scale):
    state = state * g_t.exp().unsqueeze(-1) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)  # v_tᵀ k_t: [V, K]
    return scale * (q_t.unsqueeze(-2) @ state).squeeze(-2), state


def _step_gate_on_columns(state, q_t, k_t, v_t, g_t, scale):
    if state.shape[-1] != state.shape[-2]:
        raise ValueError("only defined when K == V")
    state = state * g_t.exp().unsqueeze(-2) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return scale * (q_t.unsqueeze(-2) @ state).squeeze(-2), state


RECURRENT_STEP = Exercise(
    id="1.1",
    title="one recurrent step",
    points=1,
    signature="recurrent_step(state, q_t, k_t, v_t, g_t, scale) -> (o_t, new_state)",
    statement=(
        "Write one step of the GLA recurrence (paper Eq. 3, rows are vectors). With the forget gate "
        "$\\alpha_t = \\exp(g_t)$,\n\n$S_t = \\mathrm{Diag}(\\alpha_t)\\, S_{t-1} + k_t^\\top v_t, \\qquad o_t = "
        "\\text{scale}\\cdot q_t S_t$\n\n— the state after token t is the state before it, its row c decayed by "
        "the gate's entry $\\alpha_{tc}$, plus the outer product of the token's key and value; the output "
        "reads the new state.\n\nInputs (every tensor float64): `state` $S_{t-1}$ `[B, H, K, V]` (row c for "
        "key channel c); `q_t`, `k_t`, `g_t` `[B, H, K]` (`g_t` is the **log** of the forget gate, ≤ 0); "
        "`v_t` `[B, H, V]`; `scale` a Python float. Return `(o_t [B, H, V], new_state [B, H, K, V])`, both "
        "float64: `new_state` is $S_t$."
    ),
    hints=(
        "The forget gate α_t = exp(g_t) has one entry per key channel k: it scales row k of the K x V state.",
        "k_tᵀ v_t is an outer product: k_t.unsqueeze(-1) * v_t.unsqueeze(-2) has shape [B, H, K, V].",
        ("new_state = state * g_t.exp().unsqueeze(-1) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2); "
         "o_t = scale * (q_t.unsqueeze(-2) @ new_state).squeeze(-2) — the output reads the NEW state."),
    ),
    reference=recurrent_step,
    cases=_step_cases,
    outputs=(("o_t", "[B, H, V]"), ("new_state", "[B, H, K, V]")),
    state_outputs=("new_state",),
    state_inputs=("state",),
    forbidden=FORMS,
    mistakes=(
        Mistake("the gate is missing: the old state must be multiplied by exp(g_t) before k_tᵀv_t is added",
                _step_no_gate),
        Mistake(KV_TRANSPOSED, _step_kv_transposed),
        Mistake("the gate also decays the new k_tᵀv_t: S_t = exp(g_t) ⊙ S_{t-1} + k_tᵀv_t decays only the old state",
                _step_gate_after_add),
        Mistake("g_t is used as the gate, but it is the LOG of the gate: multiply by exp(g_t)", _step_log_not_exp),
        Mistake("o_t reads the old state S_{t-1}; it must read S_t, after the update", _step_old_state_output),
        Mistake("scale is missing from o_t = scale · q_t S_t", _step_no_scale),
        Mistake("the gate scales the columns (values) of S; it must scale the rows (one per key channel): "
                "g_t.exp().unsqueeze(-1)", _step_gate_on_columns),
    ),
)


# ----------------------------------------------------------------------------- 1.2 the recurrent form
def _recurrent_reference(q, k, v, g, scale=None, initial_state=None):
    # The log-space parallel form gives the recurrence's numbers (tests/test_forms.py) without a Python loop.
    return parallel_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=True)


def _recurrent_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, H, K, V, tau, s0 in GRID:
        x = gla_inputs(gen, B, T, H, K, V, tau, initial_state=s0)
        args = (x["q"], x["k"], x["v"], x["g"])
        kwargs = {"initial_state": x["initial_state"]} if s0 else {}
        cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau, s0=s0), args, kwargs))
    return cases


def _recurrent_no_gate(q, k, v, g, scale=None, initial_state=None):
    return _recurrent_reference(q, k, v, torch.zeros_like(g), scale, initial_state)


def _recurrent_shifted_gate(q, k, v, g, scale=None, initial_state=None):
    shifted = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)  # α_{t-1} used at step t
    return _recurrent_reference(q, k, v, shifted, scale, initial_state)


def _recurrent_no_initial_state(q, k, v, g, scale=None, initial_state=None):
    return _recurrent_reference(q, k, v, g, scale, None if initial_state is None else torch.zeros_like(initial_state))


def _recurrent_no_scale(q, k, v, g, scale=None, initial_state=None):
    return _recurrent_reference(q, k, v, g, 1.0, initial_state)


def _recurrent_with(step, q, k, v, g, scale=None, initial_state=None):
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.clone()
    out = []
    for t in range(T):
        o_t, S = step(S, q[:, t], k[:, t], v[:, t], g[:, t], scale)
        out.append(o_t)
    return torch.stack(out, 1), S


def _recurrent_gate_after_add(q, k, v, g, scale=None, initial_state=None):
    return _recurrent_with(_step_gate_after_add, q, k, v, g, scale, initial_state)


def _recurrent_kv_transposed(q, k, v, g, scale=None, initial_state=None):
    return _recurrent_with(_step_kv_transposed, q, k, v, g, scale, initial_state)


RECURRENT_FORM = Exercise(
    id="1.2",
    title="the recurrent form",
    points=2,
    signature="recurrent_gla(q, k, v, g, scale=None, initial_state=None) -> (o, final_state)",
    statement=(
        "Run the recurrence over a whole sequence, batch-first like flash-linear-attention: $S_t = "
        "\\mathrm{Diag}(\\alpha_t)\\, S_{t-1} + k_t^\\top v_t$ and $o_t = \\text{scale}\\cdot q_t S_t$ for $t = 0, "
        "\\dots, T-1$, starting from the initial state $S_{-1}$.\n\nInputs (every tensor float64): `q`, `k`, "
        "`g` `[B, T, H, K]`; `v` `[B, T, H, V]`; `scale` a Python float, default `K ** -0.5`; "
        "`initial_state` $S_{-1}$ `[B, H, K, V]` or `None` (zeros). Return `(o [B, T, H, V], final_state [B, "
        "H, K, V])`, both float64: every $o_t$, and the final state $S_{T-1}$. Work in the inputs' dtype."
    ),
    hints=(
        "Loop t = 0 .. T-1 and apply one recurrent step (exercise 1.1) to q[:, t], k[:, t], v[:, t], g[:, t].",
        "Start from S = initial_state (or q.new_zeros(B, H, K, V)); collect o_t in a list and torch.stack(..., dim=1).",
        ("S = S * g[:, t].exp().unsqueeze(-1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2); "
         "o_t = scale * (q[:, t].unsqueeze(-2) @ S).squeeze(-2); return torch.stack(outs, 1), S."),
    ),
    reference=_recurrent_reference,
    cases=_recurrent_cases,
    outputs=(("o", "[B, T, H, V]"), ("final_state", "[B, H, K, V]")),
    state_outputs=("final_state",),
    state_inputs=("initial_state",),
    forbidden=FORMS,
    mistakes=(
        Mistake("the gate is missing: each step must decay the state by exp(g_t)", _recurrent_no_gate),
        Mistake(KV_TRANSPOSED, _recurrent_kv_transposed),
        Mistake("the gate is off by one step: step t decays by exp(g_t), the gate of the SAME token",
                _recurrent_shifted_gate),
        Mistake("initial_state is ignored: the recurrence must start from S_{-1} = initial_state when it is given",
                _recurrent_no_initial_state),
        Mistake("scale is missing: its default is K ** -0.5", _recurrent_no_scale),
        Mistake("the gate also decays the new k_tᵀv_t; it decays only the old state", _recurrent_gate_after_add),
    ),
)


# ----------------------------------------------------------------------------- 1.3 the gate
def _gate_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, d, K, tau in ((1, 1, 24, 16, 1.0), (2, 63, 40, 20, 0.1), (1, 65, 33, 60, 16.0)):
        r = 16
        args = (randn(gen, B, T, d), randn(gen, d, r) / d ** 0.5, randn(gen, r, K) / r ** 0.5, randn(gen, K))
        cases.append(Case(label(B=B, T=T, d=d, r=r, K=K, tau=tau), args, {"normalizer": tau}))
    return cases


def _gate_times_tau(x, W1, W2, b, normalizer=16.0):
    return torch.nn.functional.logsigmoid(x @ W1 @ W2 + b) * normalizer


def _gate_sigmoid(x, W1, W2, b, normalizer=16.0):
    return torch.sigmoid(x @ W1 @ W2 + b) / normalizer


def _gate_no_bias(x, W1, W2, b, normalizer=16.0):
    return torch.nn.functional.logsigmoid(x @ W1 @ W2) / normalizer


def _gate_tau_in_logit(x, W1, W2, b, normalizer=16.0):
    return torch.nn.functional.logsigmoid((x @ W1 @ W2 + b) / normalizer)


GATE = Exercise(
    id="1.3",
    title="the gate parameterization",
    points=1,
    signature="gate(x, W1, W2, b, normalizer=16.0) -> g",
    statement=(
        "GLA's forget gate (paper §4.4) is a low-rank projection of the token, squashed and softened: "
        "$\\alpha_t = \\sigma(x_t W_\\alpha^1 W_\\alpha^2 + b_\\alpha)^{1/\\tau}$. The forms take its log:\n\n$g_t = "
        "\\log \\alpha_t = \\mathrm{logsigmoid}(x_t W_\\alpha^1 W_\\alpha^2 + b_\\alpha)\\,/\\,\\tau$\n\nInputs (every "
        "tensor float64): `x` `[B, T, d]`; `W1` $= W_\\alpha^1$ `[d, r]`; `W2` $= W_\\alpha^2$ `[r, K]`; `b` "
        "$= b_\\alpha$ `[K]`; `normalizer` τ > 0 a Python float. Return `g` `[B, T, K]` float64, every entry "
        "< 0."
    ),
    hints=(
        "Three steps: the low-rank logit x W1 W2 + b, then the log of a sigmoid, then divide by τ.",
        "log(sigmoid(z)) underflows for very negative z; torch.nn.functional.logsigmoid is the stable version.",
        "return torch.nn.functional.logsigmoid(x @ W1 @ W2 + b) / normalizer",
    ),
    reference=gla_gate,
    cases=_gate_cases,
    outputs=(("g", "[B, T, K]"),),
    forbidden=("glalearn.gates.LowRankGate.forward", "glalearn.layers.GatedLinearAttention.log_gate"),
    mistakes=(
        Mistake("τ multiplies the log gate; it must divide it (α^(1/τ) ⇒ log α / τ)", _gate_times_tau),
        Mistake("sigmoid without the log: g is the LOG of the gate, log σ(z) / τ", _gate_sigmoid),
        Mistake("the bias b is missing from the logit x W1 W2 + b", _gate_no_bias),
        Mistake("τ divides the logit; it must divide the log gate: logsigmoid(z) / τ, not logsigmoid(z / τ)",
                _gate_tau_in_logit),
    ),
)

EXERCISES = [RECURRENT_STEP, RECURRENT_FORM, GATE]
