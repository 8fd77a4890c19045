"""Chapter 6 exercises: the chunk-state kernel and the chunk-output kernel, written in Triton.

The learner hands in a ``@triton.jit`` kernel; the check allocates the outputs (filled with NaN, so a
value the kernel never stores shows as non-finite), launches the kernel on its own grid (in Triton's
interpreter on a CPU) and compares. The references are the library's PyTorch chunk form (chapter 3), in
the layout the kernels use.
"""

from __future__ import annotations

import torch

from glalearn.checks.core import FORMS, Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label
from glalearn.forms.chunk import chunk_local_cumsum, chunk_states, from_chunks, log_space_scores, to_chunks

NOTEBOOK = "06_triton_from_zero"
CHUNK = 16
KV_KERNEL = ("the update (k_[n] ⊙ Γ_[n])ᵀ v_[n] is transposed: tl.dot(tl.trans(k_decayed), v_n) is [BK, BV] like the "
             "state; tl.dot(tl.trans(v_n), k_decayed) is [BV, BK]")
KERNEL_REFUSED = (*FORMS, "glalearn.forms.chunk.chunk_states", "glalearn.forms.chunk.pass_states",
                  "glalearn.forms.chunk.log_space_scores", "glalearn.forms.chunk._log_space_scores")


def block(n: int) -> int:
    """The register block for n channels: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def device_of(kernel) -> torch.device:
    """Where a kernel runs: the CPU under Triton's interpreter, else the GPU."""
    return torch.device("cpu") if type(kernel).__name__ == "InterpretedFunction" else torch.device("cuda")


def nan_buffer(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def launch_state_kernel(kernel, k, v, g, chunk_size=CHUNK):
    """Launch a learner's state kernel on (B·H,) programs; return (states, final_state) on the CPU."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = -(-T // chunk_size)
    dev = device_of(kernel)
    states = nan_buffer(B, H, N, K, V, dtype=k.dtype, device=dev)
    final_state = nan_buffer(B, H, K, V, dtype=k.dtype, device=dev)
    kernel[(B * H,)](k=k.to(dev).contiguous(), v=v.to(dev).contiguous(), g=g.to(dev).contiguous(),
                     states=states, final_state=final_state, T=T, H=H, K=K, V=V, C=chunk_size,
                     BK=block(K), BV=block(V))
    return states.cpu(), final_state.cpu()


# ----------------------------------------------------------------------------- 6.1 the state kernel
def _states(k, v, g, chunk_size=CHUNK, shift=0, key_decay="gamma_minus_G", carry=True, kv_transposed=False):
    kc, vc, gc = (to_chunks(x, chunk_size) for x in (k, v, g))
    G = chunk_local_cumsum(gc).to(k.dtype)
    gamma = G[:, :, :, -1:, :]
    if key_decay == "gamma_minus_G":
        kd = kc * (gamma - G).exp()
    else:  # a plausible slip: the query-side decay exp(G)
        kd = kc * G.exp()
    updates = kd.transpose(-1, -2) @ vc
    if kv_transposed:  # tl.dot(tl.trans(v_n), k_decayed): [BV, BK], added to a [BK, BV] state
        if block(k.shape[-1]) != block(v.shape[-1]):
            raise ValueError("incompatible block shapes: the update is [BV, BK], the state [BK, BV]")
        updates = updates.transpose(-1, -2)
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
    signature="state_kernel(k, v, g, states, final_state, T, H, K, V, C, BK, BV)",
    statement=(
        "Write the Triton kernel of chapter 3's inter-chunk recurrence as a `@triton.jit` function: chunk n "
        "reads $S_{[n]}$ and writes\n\n$S_{[n+1]} = \\mathrm{Diag}(e^{\\gamma_{[n]}})\\, S_{[n]} + (k_{[n]} \\odot "
        "\\Gamma_{[n]})^\\top v_{[n]}, \\qquad \\Gamma_{[n], i} = e^{\\gamma_{[n]} - G_i},$ from $S_{[0]} = "
        "0$.\n\nThe check launches it itself, on a grid of `(B·H,)` programs: program `pid` handles batch `pid "
        "// H`, head `pid % H`, and walks the chunks n = 0, 1, …, N−1 in order with its [BK, BV] state in "
        "registers.\n\nArguments, passed by name: `k`, `g` `[B, T, H, K]` and `v` `[B, T, H, V]`, float64, "
        "contiguous (token t of head h in batch b starts at element `((b·T + t)·H + h)·K` of k); `states` "
        "`[B, H, N, K, V]` and `final_state` `[B, H, K, V]`, float64 buffers filled with NaN for the kernel "
        "to write: `states[b, h, n]` is $S_{[n]}$, the state **entering** chunk n (N = ⌈T / C⌉), and "
        "`final_state[b, h]` is $S_{[N]}$, the state leaving the last chunk, both [K, V] with row c for key "
        "channel c; `T` an int; `tl.constexpr` `H`, `K`, `V`, `C` (the chunk size, 16 in the check), `BK`, "
        "`BV` (`max(16, triton.next_power_of_2(K))`, the same for V). T need not be a multiple of C, and K, "
        "V need not be powers of two: mask the loads (masked rows read 0) and the stores. The kernel runs in "
        "Triton's interpreter on a CPU."
    ),
    hints=(
        ("i_b, i_h = pid // H, pid % H; rows t = n·C + tl.arange(0, C) of head i_h start at "
         "((i_b·T + t)·H + i_h)·K. Keep state = tl.zeros((BK, BV), dtype=tl.float64); for each chunk, store it "
         "to states[i_b, i_h, n] first, then update it."),
        ("G = tl.cumsum(g_n, axis=0); gamma = tl.sum(g_n, axis=0) (masked rows load g = 0, which decays nothing); "
         "state = state * tl.exp(gamma)[:, None] + tl.dot(tl.trans(k_n * tl.exp(gamma[None, :] - G)), v_n)."),
        ("The offset of state element (c, v) of states[i_b, i_h, n] is ((i_b·H + i_h)·N + n)·K·V + c·V + v, with "
         "N = tl.cdiv(T, C); store with the mask (rk < K)[:, None] & (rv < V)[None, :]; after the loop store the "
         "state once more at final_state + (i_b·H + i_h)·K·V + ..."),
    ),
    reference=chunk_states_reference,
    cases=_state_cases,
    outputs=(("states", "[B, H, N, K, V]"), ("final_state", "[B, H, K, V]")),
    tolerance=1e-6,
    state_outputs=("states", "final_state"),
    forbidden=KERNEL_REFUSED,
    launch=launch_state_kernel,
    mistakes=(
        Mistake("states[b, h, n] holds the state LEAVING chunk n; it must be S_[n], the one ENTERING it (S_[0] = 0 first)",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, shift=1)),
        Mistake("the keys are decayed by exp(G) (the query side); the update needs exp(γ − G): "
                "how much each key decays until the END of the chunk",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, key_decay="G")),
        Mistake("the carried state is not decayed: multiply it by exp(γ_[n]) (the whole chunk's gate) first",
                lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, carry=False)),
        Mistake(KV_KERNEL, lambda k, v, g, chunk_size=CHUNK: _states(k, v, g, chunk_size, kv_transposed=True)),
    ),
)


# ----------------------------------------------------------------------------- 6.2 the output kernel
def chunk_output_reference(q, k, v, g, states, scale, chunk_size=CHUNK, inter=True, intra="log_space",
                           states_order="KV"):
    """o [B, T, H, V] from the chunk states (chapter 3's inter + intra decomposition)."""
    if states_order == "VK":  # each state read from its buffer as if it were stored [V, K]
        *lead, K, V = states.shape
        states = states.reshape(*lead, V, K).transpose(-1, -2)
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


def launch_output_kernel(kernel, q, k, v, g, states, scale, chunk_size=CHUNK):
    """Launch a learner's output kernel on (N, B·H) programs; return o [B, T, H, V] on the CPU."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = -(-T // chunk_size)
    dev = device_of(kernel)
    o = nan_buffer(B, T, H, V, dtype=q.dtype, device=dev)
    kernel[(N, B * H)](q=q.to(dev).contiguous(), k=k.to(dev).contiguous(), v=v.to(dev).contiguous(),
                       g=g.to(dev).contiguous(), states=states.to(dev).contiguous(), o=o, scale=scale, T=T,
                       H=H, K=K, V=V, C=chunk_size, BK=block(K), BV=block(V))
    return o.cpu()


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
    signature="output_kernel(q, k, v, g, states, o, scale, T, H, K, V, C, BK, BV)",
    statement=(
        "Write the Triton kernel that computes every chunk's output from the state it reads, as a "
        "`@triton.jit` function (rows i, j = 0, …, C−1 of chunk n):\n\n$o_{[n]} = "
        "\\text{scale}\\cdot\\big((q_{[n]} \\odot \\Lambda_{[n]})\\, S_{[n]} + P_{[n]} v_{[n]}\\big)$, $\\quad "
        "\\Lambda_{[n], i} = e^{G_i}$, $\\quad P_{[n]}[i, j] = \\sum_c q_{ic}\\, k_{jc}\\, e^{G_{ic} - G_{jc}}$ "
        "for $j \\le i$ (else 0).\n\nThe check launches it itself on a grid of `(N, B·H)` programs: program (n, "
        "pid) computes chunk n of batch `pid // H`, head `pid % H`. Arguments, passed by name: `q`, `k`, `g` "
        "`[B, T, H, K]`, `v` `[B, T, H, V]` and `states` `[B, H, N, K, V]` (`states[b, h, n]` is $S_{[n]}$, "
        "row c for key channel c), all float64 and contiguous; `o` `[B, T, H, V]`, a float64 buffer filled "
        "with NaN for the kernel to write; `scale` a float; `T` an int; `tl.constexpr` `H`, `K`, `V`, `C` "
        "(16 in the check), `BK`, `BV` (`max(16, triton.next_power_of_2(K))`, the same for V). P may be "
        "computed in log space as a [C, C, BK] tile — mask the exponent to −inf above the diagonal *before* "
        "the exp. The kernel runs in Triton's interpreter on a CPU."
    ),
    hints=(
        ("i_n, i_bh = tl.program_id(0), tl.program_id(1). Load q, k, g for the chunk (masked rows = 0), "
         "G = tl.cumsum(g, axis=0), and the [BK, BV] state at states + (i_bh·N + i_n)·K·V; rows of a head are "
         "H·K apart in [B, T, H, K]."),
        ("inter = tl.dot(q * tl.exp(G), S); expo = tl.where(causal[:, :, None], G[:, None, :] - G[None, :, :], "
         "float('-inf')) with causal = rows[:, None] >= rows[None, :]; P = tl.sum(q[:, None, :] * k[None, :, :] * "
         "tl.exp(expo), axis=2)."),
        ("out = scale * (inter + tl.dot(P, v)); store it at o + (i_b·T + t)·H·V + i_h·V + column with the mask "
         "(t < T)[:, None] & (column < V)[None, :]."),
    ),
    reference=chunk_output_reference,
    cases=_output_cases,
    outputs=(("o", "[B, T, H, V]"),),
    tolerance=1e-6,
    forbidden=KERNEL_REFUSED,
    launch=launch_output_kernel,
    mistakes=(
        Mistake("the inter-chunk term (q_[n] ⊙ Λ_[n]) S_[n] is missing: the past reaches a chunk only through its state",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, scale, chunk_size, inter=False)),
        Mistake("the diagonal j = i is left out of P: o_t must see its own k_t v_t (mask j <= i, not j < i)",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, scale, chunk_size, intra="strict")),
        Mistake("scale is not applied: o = scale · (inter + intra)",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, 1.0, chunk_size)),
        Mistake("the states are read in [V, K] order: element (c, v) of states[b, h, n] is at offset c·V + v of "
                "its K·V block (row c for key channel c)",
                lambda q, k, v, g, states, scale, chunk_size=CHUNK:
                chunk_output_reference(q, k, v, g, states, scale, chunk_size, states_order="VK")),
    ),
)

EXERCISES = [STATE_KERNEL, OUTPUT_KERNEL]
