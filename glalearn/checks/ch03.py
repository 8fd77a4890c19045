"""Chapter 3 exercises: splitting into chunks, chunk states, the intra- and inter-chunk outputs."""

from __future__ import annotations

import torch

from glalearn.checks.core import FORMS, KV_TRANSPOSED, STATE_LAYOUT, Case, Exercise, Mistake
from glalearn.checks.inputs import gla_inputs, label, randn
from glalearn.forms.chunk import chunk_local_cumsum, chunk_states, log_space_scores, to_chunks

NOTEBOOK = "03_chunkwise"

# (B, T, H, K, V, C, τ, with initial state): T one off a chunk boundary, C from 16 to 64.
CHUNK_GRID = (
    (1, 1, 1, 16, 16, 16, 1.0, False),
    (2, 63, 2, 20, 36, 16, 0.1, True),
    (1, 65, 3, 24, 40, 32, 16.0, False),
    (1, 200, 1, 12, 20, 64, 1.0, True),
)


def chunked_inputs(gen: torch.Generator, B, T, H, K, V, C, tau, s0) -> dict:
    """Fresh inputs already in chunks: q, k, g [B, H, N, C, K], v [B, H, N, C, V], G, initial_state."""
    x = gla_inputs(gen, B, T, H, K, V, tau, initial_state=s0)
    out = {name: to_chunks(x[name], C) for name in ("q", "k", "v", "g")}
    out["G"] = chunk_local_cumsum(out["g"])
    out["initial_state"] = x.get("initial_state")
    out["label"] = label(B=B, T=T, H=H, K=K, V=V, C=C, tau=tau, s0=s0)
    return out


# ----------------------------------------------------------------------------- 3.1 to_chunks
def _to_chunks_cases(gen: torch.Generator) -> list[Case]:
    return [Case(label(B=B, T=T, H=H, D=D, C=C), (randn(gen, B, T, H, D), C))
            for B, T, H, D, C in ((1, 1, 2, 36, 16), (2, 63, 3, 20, 16), (1, 65, 1, 12, 32), (2, 200, 2, 5, 64))]


def _to_chunks_no_transpose(x, chunk_size):
    B, T, H, D = x.shape
    N = -(-T // chunk_size)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * chunk_size - T))
    return x.reshape(B, H, N, chunk_size, D)


def _to_chunks_pad_front(x, chunk_size):
    B, T, H, D = x.shape
    N = -(-T // chunk_size)
    x = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, N * chunk_size - T, 0))
    return x.reshape(B, H, N, chunk_size, D)


TO_CHUNKS = Exercise(
    id="3.1",
    title="splitting into chunks",
    points=1,
    signature="to_chunks(x, chunk_size) -> x_chunks",
    statement=(
        "The chunk form works on chunks of C tokens. Reshape `x` `[B, T, H, D]` to `[B, H, N, C, D]` with $N "
        "= \\lceil T / C \\rceil$: heads next to batch, then chunks, then the rows of a chunk. Chunk n holds "
        "tokens nC … nC+C−1, so `x_chunks[b, h, n, i]` is `x[b, n*C + i, h]`. When C does not divide T, pad "
        "the **end** of the sequence with zeros (a padded k, v adds nothing to the state and a padded g = 0 "
        "means no decay).\n\nInputs: `x` `[B, T, H, D]` float64 (D is K or V); `chunk_size` C a Python int. "
        "Return `x_chunks` `[B, H, N, C, D]` float64."
    ),
    hints=(
        "Move H before T first (x.transpose(1, 2) is [B, H, T, D]); a reshape of [B, T, H, D] would mix heads and time.",
        "N = -(-T // C) rounds up; torch.nn.functional.pad(x, (0, 0, 0, N * C - T)) pads dim -2 (time) at the end.",
        "return torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, N * C - T)).reshape(B, H, N, C, D)",
    ),
    reference=to_chunks,
    cases=_to_chunks_cases,
    outputs=(("x_chunks", "[B, H, N, C, D]"),),
    forbidden=("glalearn.forms.chunk.to_chunks",),
    mistakes=(
        Mistake("T and H are not swapped before the reshape: transpose [B, T, H, D] to [B, H, T, D] first",
                _to_chunks_no_transpose),
        Mistake("the padding is at the front; pad the END of the sequence so chunk 0 starts at token 0",
                _to_chunks_pad_front),
    ),
)


# ----------------------------------------------------------------------------- 3.2 chunk states
def _states_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for row in CHUNK_GRID:
        x = chunked_inputs(gen, *row)
        kwargs = {"initial_state": x["initial_state"]} if x["initial_state"] is not None else {}
        cases.append(Case(x["label"], (x["k"], x["v"], x["G"]), kwargs))
    return cases


def _states(k_chunks, v_chunks, G, initial_state=None, k_decay="gamma-G", decay_old=True, store="before",
            decay_update=False, kv_transposed=False):
    B, H, N, _, K = k_chunks.shape
    gamma = G[:, :, :, -1:, :]
    k_decayed = k_chunks * ((gamma - G).exp() if k_decay == "gamma-G" else G.exp())
    updates = v_chunks.transpose(-1, -2) @ k_decayed if kv_transposed else k_decayed.transpose(-1, -2) @ v_chunks
    decay = gamma.squeeze(-2).exp().unsqueeze(-1)
    S = k_chunks.new_zeros(B, H, K, v_chunks.shape[-1]) if initial_state is None else initial_state
    states = []
    for n in range(N):
        if store == "before":
            states.append(S)
        if decay_update:
            S = decay[:, :, n] * (S + updates[:, :, n])
        else:
            S = (decay[:, :, n] * S if decay_old else S) + updates[:, :, n]
        if store == "after":
            states.append(S)
    return torch.stack(states, 2), S


def _states_ignore_initial(k_chunks, v_chunks, G, initial_state=None):
    return _states(k_chunks, v_chunks, G, None if initial_state is None else torch.zeros_like(initial_state))


CHUNK_STATES = Exercise(
    id="3.2",
    title="chunk states",
    points=3,
    signature="chunk_states(k_chunks, v_chunks, G, initial_state=None) -> (states, final_state)",
    statement=(
        "Pass the state from chunk to chunk (paper §4.2): chunk n **reads** $S_{[n]}$, the state entering "
        "it, and **writes** $S_{[n+1]}$, the state leaving it. Inside chunk n, $G_i$ is the chunk-local "
        "cumulative log decay ($g_{nC} + \\dots + g_{nC+i}$ for row i = 0, …, C−1), $\\gamma_{[n]} = G_{C-1}$ "
        "the log decay across the whole chunk, and $\\Gamma_{[n]}$ the decay from each row to the chunk's "
        "end:\n\n$S_{[n+1]} = \\mathrm{Diag}(\\exp(\\gamma_{[n]}))\\, S_{[n]} + (k_{[n]} \\odot \\Gamma_{[n]})^\\top "
        "v_{[n]}, \\qquad \\Gamma_{[n], i} = \\exp(\\gamma_{[n]} - G_i),$\n\nstarting from $S_{[0]}$, the initial "
        "state.\n\nInputs (every tensor float64): `k_chunks` `[B, H, N, C, K]`, `v_chunks` `[B, H, N, C, V]`, "
        "`G` `[B, H, N, C, K]`, `initial_state` $S_{[0]}$ `[B, H, K, V]` or `None` (zeros). Return `states` "
        "`[B, H, N, K, V]` — `states[:, :, n]` is $S_{[n]}$, the state **entering** chunk n — and "
        "`final_state` $S_{[N]}$ `[B, H, K, V]`, the state leaving the last chunk; both float64, row c for "
        "key channel c."
    ),
    hints=(
        ("Only the N chunk-to-chunk steps are sequential: compute every chunk's own update (k_[n] ⊙ Γ_[n])ᵀ v_[n] in one "
         "batched product first."),
        ("gamma = G[:, :, :, -1:, :] is [B, H, N, 1, K]; k_chunks * (gamma - G).exp() decays each key to the END "
         "of its chunk (every factor ≤ 1); updates = k_decayedᵀ @ v_chunks is [B, H, N, K, V]."),
        ("S = initial_state or zeros; for n in range(N): states.append(S); "
         "S = gamma[:, :, n, 0].exp().unsqueeze(-1) * S + updates[:, :, n]; return torch.stack(states, 2), S."),
    ),
    reference=lambda k_chunks, v_chunks, G, initial_state=None: chunk_states(k_chunks, v_chunks, G, initial_state),
    cases=_states_cases,
    outputs=(("states", "[B, H, N, K, V]"), ("final_state", "[B, H, K, V]")),
    state_outputs=("states", "final_state"),
    state_inputs=("initial_state",),
    forbidden=(*FORMS, "glalearn.forms.chunk.chunk_states", "glalearn.forms.chunk.pass_states"),
    mistakes=(
        Mistake(KV_TRANSPOSED,
                lambda k, v, G, initial_state=None: _states(k, v, G, initial_state, kv_transposed=True)),
        Mistake("states[:, :, n] must be S_[n], the state ENTERING chunk n (append before the update, not after)",
                lambda k, v, G, initial_state=None: _states(k, v, G, initial_state, store="after")),
        Mistake("keys are decayed by exp(G) (from the chunk's start); they need exp(γ - G), the decay to its END",
                lambda k, v, G, initial_state=None: _states(k, v, G, initial_state, k_decay="G")),
        Mistake("the old state is not decayed across the chunk: S_[n+1] = Diag(exp(γ_[n])) S_[n] + ...",
                lambda k, v, G, initial_state=None: _states(k, v, G, initial_state, decay_old=False)),
        Mistake("exp(γ_[n]) also decays the chunk's own update, which Γ_[n] already decays to the chunk's end",
                lambda k, v, G, initial_state=None: _states(k, v, G, initial_state, decay_update=True)),
        Mistake("initial_state is ignored: S_[0] is the initial state when one is given", _states_ignore_initial),
    ),
)


# ----------------------------------------------------------------------------- 3.3 intra-chunk output
def _intra_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for row in CHUNK_GRID:
        x = chunked_inputs(gen, *row)
        K = x["q"].shape[-1]
        cases.append(Case(x["label"], (x["q"], x["k"], x["v"], x["G"], K ** -0.5)))
    return cases


def _intra_reference(q_chunks, k_chunks, v_chunks, G, scale):
    return scale * log_space_scores(q_chunks, k_chunks, G) @ v_chunks


def _intra(q, k, v, G, scale, diagonal=0, causal=True, sign=1.0):
    C = q.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool).tril(diagonal) if causal else torch.ones(C, C, dtype=torch.bool)
    D = sign * (G[..., :, None, :] - G[..., None, :, :])
    P = (q[..., :, None, :] * k[..., None, :, :] * D.masked_fill(~mask[..., None], float("-inf")).exp()).sum(-1)
    return scale * P @ v


INTRA = Exercise(
    id="3.3",
    title="the intra-chunk output",
    points=3,
    signature="intra_chunk_output(q_chunks, k_chunks, v_chunks, G, scale) -> o_intra",
    statement=(
        "The part of each output that comes from earlier tokens of the **same** chunk, in log space so it "
        "never overflows (rows i, j = 0, …, C−1 of chunk n, $G$ chunk-local):\n\n$P_{[n]}[i, j] = \\sum_c "
        "q_{ic}\\, k_{jc} \\exp(G_{ic} - G_{jc})$ for $j \\le i$ (else 0), $\\quad o^{\\text{intra}}_{[n]} = "
        "\\text{scale}\\cdot P_{[n]} v_{[n]}$\n\nInputs (every tensor float64): `q_chunks`, `k_chunks`, `G` `[B, "
        "H, N, C, K]`, `v_chunks` `[B, H, N, C, V]`; `scale` a Python float. Return `o_intra` `[B, H, N, C, "
        "V]` float64."
    ),
    hints=(
        "This is chapter 2's log-space form, applied to every chunk at once, with G restarting at each chunk.",
        ("The exponents E = G[..., :, None, :] - G[..., None, :, :] are [B, H, N, C, C, K] (query i, key j, channel c); "
         "mask j > i with -inf before exp."),
        ("P = (q[..., :, None, :] * k[..., None, :, :] * E.masked_fill(~mask[..., None], float('-inf')).exp())"
         ".sum(-1); return scale * P @ v_chunks."),
    ),
    reference=_intra_reference,
    cases=_intra_cases,
    outputs=(("o_intra", "[B, H, N, C, V]"),),
    forbidden=(*FORMS, "glalearn.forms.chunk.log_space_scores", "glalearn.forms.chunk._log_space_scores"),
    mistakes=(
        Mistake("the diagonal is masked out: each token also sees itself (j ≤ i)",
                lambda q, k, v, G, scale: _intra(q, k, v, G, scale, diagonal=-1)),
        Mistake("the causal mask is missing inside the chunk: token i only sees j ≤ i",
                lambda q, k, v, G, scale: _intra(q, k, v, G, scale, causal=False)),
        Mistake("the exponent has the wrong sign: exp(G_i - G_j) (query minus key) is ≤ 1",
                lambda q, k, v, G, scale: _intra(q, k, v, G, scale, sign=-1.0)),
        Mistake("scale is missing", lambda q, k, v, G, scale: _intra(q, k, v, G, 1.0)),
    ),
)


# ----------------------------------------------------------------------------- 3.4 inter-chunk output
def _inter_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for row in CHUNK_GRID:
        x = chunked_inputs(gen, *row)
        states, _ = chunk_states(x["k"], x["v"], x["G"], x["initial_state"])
        K = x["q"].shape[-1]
        cases.append(Case(x["label"], (x["q"], states, x["G"], K ** -0.5)))
    return cases


def _inter_reference(q_chunks, states, G, scale):
    return scale * (q_chunks * G.exp()) @ states


INTER = Exercise(
    id="3.4",
    title="the inter-chunk output",
    points=2,
    signature="inter_chunk_output(q_chunks, states, G, scale) -> o_inter",
    statement=(
        "The part of each output that comes from all earlier chunks, through the state the chunk "
        "reads:\n\n$o^{\\text{inter}}_{[n]} = \\text{scale}\\cdot (q_{[n]} \\odot \\Lambda_{[n]})\\, S_{[n]}, \\qquad "
        "\\Lambda_{[n], i} = \\exp(G_i)$ (the decay from the chunk's start through row i).\n\nInputs (every "
        "tensor float64): `q_chunks`, `G` `[B, H, N, C, K]`; `states` `[B, H, N, K, V]` (from 3.2: "
        "`states[:, :, n]` is $S_{[n]}$, row c for key channel c); `scale` a Python float. Return `o_inter` "
        "`[B, H, N, C, V]` float64. Then $o_{[n]} = o^{\\text{inter}}_{[n]} + o^{\\text{intra}}_{[n]}$."
    ),
    hints=(
        "S_[n] holds everything before chunk n, decayed to the chunk's start; row i must decay it further by Λ_i.",
        "q_chunks * G.exp() is Q ⊙ Λ, [B, H, N, C, K]; a batched matmul with states [B, H, N, K, V] gives [B, H, N, C, V].",
        "return scale * (q_chunks * G.exp()) @ states",
    ),
    reference=_inter_reference,
    cases=_inter_cases,
    outputs=(("o_inter", "[B, H, N, C, V]"),),
    state_inputs=("states",),
    forbidden=FORMS,
    mistakes=(
        Mistake(STATE_LAYOUT, lambda q, S, G, scale: scale * (q * G.exp()) @ S.transpose(-1, -2)),
        Mistake("q is not decayed: row i sees S_[n] through Λ_i = exp(G_i), the decay since the chunk's start",
                lambda q, S, G, scale: scale * q @ S),
        Mistake("q is decayed by exp(γ - G) (to the chunk's end); it needs Λ = exp(G) (from the chunk's start)",
                lambda q, S, G, scale: scale * (q * (G[..., -1:, :] - G).exp()) @ S),
        Mistake("scale is missing", lambda q, S, G, scale: (q * G.exp()) @ S),
    ),
)

EXERCISES = [TO_CHUNKS, CHUNK_STATES, INTRA, INTER]
