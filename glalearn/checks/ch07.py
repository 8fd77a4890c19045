"""Chapter 7 exercise: a backward piece — the reverse pass of the state gradients, as a Triton kernel.

As in chapter 6 the learner hands in a ``@triton.jit`` kernel and the check launches it (NaN-filled
outputs, Triton's interpreter on a CPU).
"""

from __future__ import annotations

import torch

from glalearn.checks.ch06 import KERNEL_REFUSED, block, device_of, nan_buffer
from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label, randn
from glalearn.forms.chunk import chunk_local_cumsum, to_chunks

NOTEBOOK = "07_flash_linear_attention"
CHUNK = 16


def state_gradients_reference(q, g, do, scale, chunk_size=CHUNK, q_decay=True, carry=True, leaving=True,
                              transposed_update=False):
    """(dh [B, H, N, K, V]: the gradient at the state LEAVING chunk n, dh0 [B, H, K, V] = dS_[0])."""
    qc, gc, doc = (to_chunks(x, chunk_size) for x in (q, g, do))
    G = chunk_local_cumsum(gc).to(q.dtype)
    gamma = G[:, :, :, -1, :]
    qd = qc * G.exp() if q_decay else qc
    local = scale * qd.transpose(-1, -2) @ doc  # [B, H, N, K, V]
    if transposed_update:  # tl.dot(tl.trans(do_n), q_n): [BV, BK], added to a [BK, BV] gradient
        if block(q.shape[-1]) != block(do.shape[-1]):
            raise ValueError("incompatible block shapes: the update is [BV, BK], the state gradient [BK, BV]")
        local = local.transpose(-1, -2)
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


def launch_state_gradient_kernel(kernel, q, g, do, scale, chunk_size=CHUNK):
    """Launch a learner's state-gradient kernel on (B·H,) programs; return (dh, dh0) on the CPU."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = -(-T // chunk_size)
    dev = device_of(kernel)
    dh = nan_buffer(B, H, N, K, V, dtype=q.dtype, device=dev)
    dh0 = nan_buffer(B, H, K, V, dtype=q.dtype, device=dev)
    kernel[(B * H,)](q=q.to(dev).contiguous(), g=g.to(dev).contiguous(), do=do.to(dev).contiguous(), dh=dh,
                     dh0=dh0, scale=scale, T=T, H=H, K=K, V=V, C=chunk_size, BK=block(K), BV=block(V))
    return dh.cpu(), dh0.cpu()


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
    signature="state_gradient_kernel(q, g, do, dh, dh0, scale, T, H, K, V, C, BK, BV)",
    statement=(
        "The backward's second launch walks the chunks **backwards**. With $dS_{[n]} = \\partial\\ell / "
        "\\partial S_{[n]}$, the gradient at the state chunk n reads, and $dS_{[N]} = 0$ (nothing reads the "
        "final state here):\n\n$dS_{[n]} = \\mathrm{Diag}(e^{\\gamma_{[n]}})\\, dS_{[n+1]} + "
        "\\text{scale}\\cdot(q_{[n]} \\odot \\Lambda_{[n]})^\\top do_{[n]}$.\n\nWrite it as a `@triton.jit` kernel. "
        "The check launches it itself on a grid of `(B·H,)` programs (program `pid`: batch `pid // H`, head "
        "`pid % H`), each visiting the chunks n = N−1, …, 0 with its [BK, BV] state gradient in registers. "
        "Arguments, passed by name: `q`, `g` `[B, T, H, K]` and `do` `[B, T, H, V]` (the gradient of o), "
        "float64, contiguous; `dh` `[B, H, N, K, V]` and `dh0` `[B, H, K, V]`, float64 buffers filled with "
        "NaN for the kernel to write: `dh[b, h, n]` is $dS_{[n+1]}$, the gradient at the state chunk n "
        "*writes* (what the dv and dk kernels need), and `dh0[b, h]` is $dS_{[0]}$, the gradient of the "
        "initial state — both [K, V] like the state; `scale` a float; `T` an int; `tl.constexpr` `H`, `K`, "
        "`V`, `C` (16 in the check), `BK`, `BV` (`max(16, triton.next_power_of_2(K))`, the same for V). The "
        "kernel runs in Triton's interpreter on a CPU."
    ),
    hints=(
        ("The mirror image of the state kernel (exercise 6.1): one program per (batch, head), the state gradient "
         "in registers, chunks visited n = N-1, ..., 0 (loop m over range(N) and set n = N - 1 - m)."),
        ("Store first (dh[n] = the current dS, the one leaving chunk n), then update: d_state = d_state * "
         "tl.exp(gamma)[:, None] + tl.dot(tl.trans(scale * q_n * tl.exp(G)), do_n)."),
        ("After the loop, d_state is dS_[0]: store it at dh0 + (i_b·H + i_h)·K·V + c·V + v. G = tl.cumsum(g_n, "
         "axis=0), gamma = tl.sum(g_n, axis=0); masked rows (t >= T) load 0."),
    ),
    reference=state_gradients_reference,
    cases=_cases,
    outputs=(("dh", "[B, H, N, K, V]"), ("dh0", "[B, H, K, V]")),
    tolerance=1e-6,
    state_outputs=("dh", "dh0"),
    forbidden=(*KERNEL_REFUSED, "glalearn.forms.chunk.ChunkGLAFunction.backward", "glalearn.flash.flash_backward"),
    launch=launch_state_gradient_kernel,
    mistakes=(
        Mistake("dh[b, h, n] holds dS_[n], the gradient at the state chunk n reads (after the update); it must be "
                "dS_[n+1], at the state it writes (store before updating)",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, leaving=False)),
        Mistake("the gradient is not decayed on its way back: multiply dS_[n+1] by exp(γ_[n]) first",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, carry=False)),
        Mistake("the queries are not decayed: o_[n] reads S_[n] through q_[n] ⊙ Λ_[n], so its gradient does too",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, q_decay=False)),
        Mistake("the update (q_[n] ⊙ Λ_[n])ᵀ do_[n] is transposed: tl.dot(tl.trans(q_decayed), do_n) is [BK, BV] like "
                "the state; tl.dot(tl.trans(do_n), q_decayed) is [BV, BK]",
                lambda q, g, do, scale, chunk_size=CHUNK:
                state_gradients_reference(q, g, do, scale, chunk_size, transposed_update=True)),
    ),
)

EXERCISES = [STATE_GRADIENTS]
