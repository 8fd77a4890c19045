"""Chapter 6 exercises: the chunk-state kernel and the chunk-output kernel, written in Triton.

The learner's functions launch their own Triton kernels (in the interpreter on a CPU). The references
are the library's PyTorch chunk form (chapter 3), in the same layout the kernels use.
"""

from __future__ import annotations

import torch

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label
from glalearn.forms.chunk import chunk_local_cumsum, chunk_states, from_chunks, log_space_scores, to_chunks

NOTEBOOK = "06_triton_from_zero"
CHUNK = 16


# ----------------------------------------------------------------------------- 6.1 the state kernel
def _states(k, v, g, chunk_size=CHUNK, shift=0, key_decay="gamma_minus_G", carry=True):
    kc, vc, gc = (to_chunks(x, chunk_size) for x in (k, v, g))
    G = chunk_local_cumsum(gc).to(k.dtype)
    gamma = G[:, :, :, -1:, :]
    if key_decay == "gamma_minus_G":
        kd = kc * (gamma - G).exp()
    else:  # a plausible slip: the query-side decay exp(G)
        kd = kc * G.exp()
    updates = kd.transpose(-1, -2) @ vc
    state = k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])
    states = []
    for n in range(kc.shape[2]):
        states.append(state)
        decay = gamma[:, :, n, 0, :].exp().unsqueeze(-1) if carry else 1.0
        state = decay * state + updates[:, :, n]
    stacked = torch.stack(states + [state], dim=2)
    return stacked[:, :, shift:shift + kc.shape[2]], state


def chunk_states_reference(k, v, g, chunk_size=CHUNK):
    """(states [B, H, N, K, V]: the state entering each chunk, final_state [B, H, K, V])."""
    kc, vc, gc = (to_chunks(x, chunk_size) for x in (k, v, g))
    return chunk_states(kc, vc, chunk_local_cumsum(gc).to(k.dtype))


def _state_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, H, K, V, tau, _ in GRID:
        x = gla_inputs(gen, B, T, H, K, V, tau)
        cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau), (x["k"], x["v"], x["g"])))
    return cases


STATE_KERNEL = Exercise(
    id="6.1",
    title="the state kernel",
    points=3,
    signature="chunk_states_triton(k, v, g, chunk_size=16) -> (states, final_state)",
    statement=(
        "Write a Triton kernel (and its launch) for the inter-chunk recurrence of chapter 3, "
        "$S_{n+1} = \\mathrm{Diag}(e^{\\gamma_n}) S_n + (K_n \\odot e^{\\gamma_n - G_n})^\\top V_n$, with $S_0 = 0$.\n\n"
        "Inputs: `k`, `g` `[B, T, H, K]`, `v` `[B, T, H, V]` (float64 in the check; T need not be a "
        "multiple of the chunk, K and V need not be powers of two: pad blocks with "
        "`triton.next_power_of_2` and mask loads and stores). Return `states` `[B, H, N, K, V]` (the "
        "state *entering* chunk n, N = ceil(T / C)) and `final_state` `[B, H, K, V]`. One program per "
        "(batch, head) walking the chunks in order is enough."
    ),
    hints=(
        ("Grid (B·H,). In the program: i_b = pid // H, i_h = pid % H; token t of head h starts at "
        "((i_b·T + t)·H + i_h)·K. Keep the [BK, BV] state in registers; store it, then update it, chunk by chunk."),
        ("G = tl.cumsum(g_n, axis=0); gamma = tl.sum(g_n, axis=0) (masked rows load g = 0, which decays nothing); "
        "state = state * tl.exp(gamma)[:, None] + tl.dot(tl.trans(k_n * tl.exp(gamma[None, :] - G)), v_n)."),
        ("Allocate h = torch.empty(B, H, N + 1, K, V, dtype=k.dtype), loop n over range(N + 1) storing the state "
        "first (the last iteration's loads are all masked), and return h[:, :, :N], h[:, :, N]."),
    ),
    reference=chunk_states_reference,
    cases=_state_cases,
    outputs=(("states", "[B, H, N, K, V]"), ("final_state", "[B, H, K, V]")),
    tolerance=1e-6,
    mistakes=(
        Mistake("states[n] is the state LEAVING chunk n; it must be the one ENTERING it (S_0 = 0 first)",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, shift=1)),
        Mistake("the keys are decayed by exp(G) (the query side); the update needs exp(γ − G): "
                "how much each key decays until the END of the chunk",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, key_decay="G")),
        Mistake("the carried state is not decayed: multiply it by exp(γ_n) (the whole chunk's gate) first",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, carry=False)),
    ),
)


# ----------------------------------------------------------------------------- 6.2 the output kernel
def chunk_output_reference(q, k, v, g, states, scale, chunk_size=CHUNK, inter=True, intra="log_space"):
    """o [B, T, H, V] from the chunk states (chapter 3's inter + intra decomposition)."""
    qc, kc, vc, gc = (to_chunks(x, chunk_size) for x in (q, k, v, g))
    G = chunk_local_cumsum(gc).to(q.dtype)
    if intra == "log_space":
        P = log_space_scores(qc, kc, G)
    else:  # "strict": the diagonal j = i left out
        P = log_space_scores(qc, kc, G).tril(-1)
    o = P @ vc
    if inter:
        o = o + (qc * G.exp()) @ states
    return from_chunks(scale * o, q.shape[1])


def _output_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, H, K, V, tau, s0 in GRID:
        x = gla_inputs(gen, B, T, H, K, V, tau, initial_state=s0)
        kc, vc, gc = (to_chunks(x[n], CHUNK) for n in ("k", "v", "g"))
        states, _ = chunk_states(kc, vc, chunk_local_cumsum(gc), x.get("initial_state"))
        cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau, s0=s0),
                          (x["q"], x["k"], x["v"], x["g"], states, K**-0.5)))
    return cases


OUTPUT_KERNEL = Exercise(
    id="6.2",
    title="the output kernel",
    points=3,
    signature="chunk_output_triton(q, k, v, g, states, scale, chunk_size=16) -> o",
    statement=(
        "Write a Triton kernel (and its launch) that computes every chunk's output from the chunk states:\n\n"
        "$O_n = \\text{scale}\\cdot\\big((Q_n \\odot e^{G_n}) S_n + P_n V_n\\big)$, "
        "$P_n[i, j] = \\sum_k q_{ik} k_{jk} e^{G_{ik} - G_{jk}}$ for $j \\le i$.\n\n"
        "Inputs: `q`, `k`, `g` `[B, T, H, K]`, `v` `[B, T, H, V]`, `states` `[B, H, N, K, V]` (the state "
        "entering each chunk), `scale` a float. Return `o` `[B, T, H, V]`. One program per (chunk, batch·head); "
        "P may be computed in float32/float64 log space as a [C, C, BK] tile — mask the exponent to −inf "
        "above the diagonal *before* the exp."
    ),
    hints=(
        ("Grid (N, B·H). Load q, k, g for the chunk (masked rows = 0), G = tl.cumsum(g, axis=0), and the [BK, BV] "
        "state at states[b, h, n]; rows of a head are H·K apart in [B, T, H, K]."),
        ("inter = tl.dot(q * tl.exp(G), S); expo = tl.where(causal[:, :, None], G[:, None, :] - G[None, :, :], "
        "float('-inf')) with causal = rows[:, None] >= rows[None, :]; P = tl.sum(q[:, None, :] * k[None, :, :] * "
        "tl.exp(expo), axis=2)."),
        ("out = scale * (inter + tl.dot(P, v)); store with the (t < T) & (column < V) mask; allocate o = "
        "torch.empty_like(v) and launch with C = chunk_size, BK/BV = max(16, triton.next_power_of_2(K/V))."),
    ),
    reference=chunk_output_reference,
    cases=_output_cases,
    outputs=(("o", "[B, T, H, V]"),),
    tolerance=1e-6,
    mistakes=(
        Mistake("the inter-chunk term (Q ⊙ exp(G)) S_n is missing: the past reaches a chunk only through its state",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, scale, chunk_size, inter=False)),
        Mistake("the diagonal j = i is left out of P: o_t must see its own k_t v_t (mask j <= i, not j < i)",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, scale, chunk_size, intra="strict")),
        Mistake("scale is not applied: o = scale · (inter + intra)",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, 1.0, chunk_size)),
    ),
)

EXERCISES = [STATE_KERNEL, OUTPUT_KERNEL]
