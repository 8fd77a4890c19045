"""Chapter 7 exercise: a backward piece — the reverse pass of the state gradients, in Triton."""

from __future__ import annotations

import torch

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label, randn
from glalearn.forms.chunk import chunk_local_cumsum, to_chunks

NOTEBOOK = "07_flash_linear_attention"
CHUNK = 16


def state_gradients_reference(q, g, do, scale, chunk_size=CHUNK, q_decay=True, carry=True, leaving=True):
    """(dh [B, H, N, K, V]: the gradient at the state LEAVING chunk n, dh0 [B, H, K, V] = dS_0)."""
    qc, gc, doc = (to_chunks(x, chunk_size) for x in (q, g, do))
    G = chunk_local_cumsum(gc).to(q.dtype)
    gamma = G[:, :, :, -1, :]
    qd = qc * G.exp() if q_decay else qc
    local = scale * qd.transpose(-1, -2) @ doc  # [B, H, N, K, V]
    d_state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], do.shape[3])
    out = []
    for n in reversed(range(qc.shape[2])):
        if leaving:
            out.append(d_state)
        decay = gamma[:, :, n].exp().unsqueeze(-1) if carry else 1.0
        d_state = decay * d_state + local[:, :, n]
        if not leaving:
            out.append(d_state)
    return torch.stack(out[::-1], dim=2), d_state


def _cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, H, K, V, tau, _ in GRID:
        x = gla_inputs(gen, B, T, H, K, V, tau)
        do = randn(gen, B, T, H, V)
        cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau), (x["q"], x["g"], do, K**-0.5)))
    return cases


STATE_GRADIENTS = Exercise(
    id="7.1",
    title="the state-gradient pass",
    points=3,
    signature="state_gradients_triton(q, g, do, scale, chunk_size=16) -> (dh, dh0)",
    statement=(
        "The backward's second launch walks the chunks **backwards**: with dS_{n+1} the gradient reaching the "
        "state that leaves chunk n (zero after the last chunk),\n\n"
        "$dS_n = \\mathrm{Diag}(e^{\\gamma_n})\\, dS_{n+1} + \\text{scale}\\cdot(Q_n \\odot e^{G_n})^\\top dO_n$.\n\n"
        "Inputs: `q`, `g` `[B, T, H, K]`, `do` `[B, T, H, V]` (the gradient of o), `scale`. Return `dh` "
        "`[B, H, N, K, V]` with `dh[:, :, n]` = dS_{n+1} (the gradient at the state *leaving* chunk n — what "
        "the dv and dk kernels need) and `dh0` = dS_0 `[B, H, K, V]` (the gradient of the initial state)."
    ),
    hints=(
        ("The mirror image of the state kernel (exercise 6.1): one program per (batch, head), the state gradient "
        "in registers, chunks visited n = N-1, ..., 0 (loop m over range(N) and set n = N - 1 - m)."),
        ("Store first (dh[n] = the current dS, the one leaving chunk n), then update: d_state = d_state * "
        "tl.exp(gamma)[:, None] + tl.dot(tl.trans(scale * q_n * tl.exp(G)), do_n)."),
        ("After the loop, d_state is dS_0: store it in dh0. G = tl.cumsum(g_n, axis=0), gamma = tl.sum(g_n, axis=0); "
        "masked rows (t >= T) load 0."),
    ),
    reference=state_gradients_reference,
    cases=_cases,
    outputs=(("dh", "[B, H, N, K, V]"), ("dh0", "[B, H, K, V]")),
    tolerance=1e-6,
    mistakes=(
        Mistake("dh[n] holds the gradient ENTERING chunk n (after the update); it must be the one LEAVING it "
                "(store before updating)",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, leaving=False)),
        Mistake("the gradient is not decayed on its way back: multiply dS_{n+1} by exp(γ_n) first",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, carry=False)),
        Mistake("the queries are not decayed: O_n reads S_n through Q_n ⊙ exp(G_n), so its gradient does too",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, q_decay=False)),
    ),
)

EXERCISES = [STATE_GRADIENTS]
