"""Chapter 5 exercises: the reverse cumulative sum, and the gate gradient from dq and dk."""

from __future__ import annotations

import torch

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import GRID, gla_inputs, label, randn
from glalearn.forms.chunk import reverse_cumsum
from glalearn.forms.parallel import parallel_gla

NOTEBOOK = "05_backward"


# ----------------------------------------------------------------------------- 5.1 reverse cumsum
def _rcs_cases(gen: torch.Generator) -> list[Case]:
    return [Case(f"shape {list(shape)} dim={dim}", (randn(gen, *shape), dim))
            for shape, dim in (((1,), 0), ((2, 63, 3, 20), 1), ((65, 7), 0), ((3, 200, 5), -2), ((4, 17), -1))]


REVERSE_CUMSUM = Exercise(
    id="5.1",
    title="the reverse cumulative sum",
    points=1,
    signature="reverse_cumsum(x, dim) -> y",
    statement=(
        "The gate gradient needs sums over the **future**: $y_t = \\sum_{t' \\ge t} x_{t'}$ along "
        "`dim`.\n\nInputs: `x` float64 of any shape, e.g. `[B, T, H, K]` with `dim=1`; `dim` a Python int "
        "(negative allowed). Return `y` float64 with the shape of `x`."
    ),
    hints=(
        "A reverse cumulative sum is a forward cumulative sum of the reversed sequence, reversed back.",
        "x.flip(dim) reverses along dim; .cumsum(dim) then sums x_T, x_T + x_{T-1}, ...",
        "return x.flip(dim).cumsum(dim).flip(dim)",
    ),
    reference=reverse_cumsum,
    cases=_rcs_cases,
    outputs=(("y", "[...]"),),
    forbidden=("glalearn.forms.chunk.reverse_cumsum",),
    mistakes=(
        Mistake("the sum is exclusive (i > t); it must include x_t itself (i ≥ t) — off by one",
                lambda x, dim: reverse_cumsum(x, dim) - x),
        Mistake("a forward cumulative sum (i ≤ t); the gradient sums the FUTURE, i ≥ t",
                lambda x, dim: x.cumsum(dim)),
        Mistake("the result is not flipped back: flip, cumsum, then flip again",
                lambda x, dim: x.flip(dim).cumsum(dim)),
    ),
)


# ----------------------------------------------------------------------------- 5.2 the gate gradient
def _gate_grad_cases(gen: torch.Generator) -> list[Case]:
    """dq, dk and the true dg from autograd through the float64 log-space parallel form (the recurrence's
    numbers, without a Python loop; tests/test_checks.py checks it against autograd through the loop),
    for a random loss Σ o ⊙ w."""
    cases = []
    for B, T, H, K, V, tau, s0 in GRID:
        x = gla_inputs(gen, B, T, H, K, V, tau, initial_state=s0)
        w = randn(gen, B, T, H, V)
        q, k, g = (x[n].clone().requires_grad_(True) for n in ("q", "k", "g"))
        with torch.enable_grad():
            o, _ = parallel_gla(q, k, x["v"], g, initial_state=x.get("initial_state"))
            dq, dk, dg = torch.autograd.grad((o * w).sum(), (q, k, g))
        cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau, s0=s0),
                          (q.detach(), k.detach(), dq, dk), expected=dg))
    return cases


def _gate_gradient(q, k, dq, dk):
    return reverse_cumsum(q * dq - k * dk, dim=1)


GATE_GRADIENT = Exercise(
    id="5.2",
    title="the gate gradient",
    points=3,
    signature="gate_gradient(q, k, dq, dk) -> dg",
    statement=(
        "The paper's trick (§4.3, *memory-efficient dα computation*): the loss ℓ depends on the gates only "
        "through $\\tilde q_t = q_t \\odot b_t$ and $\\tilde k_t = k_t / b_t$ with $\\log b_t = G_t = g_0 + "
        "\\dots + g_t$, so\n\n$d \\log b_t = q_t \\odot dq_t - k_t \\odot dk_t, \\qquad dg_t = \\sum_{t' \\ge t} d "
        "\\log b_{t'}$\n\n— no T×T matrix needed. Inputs (every tensor float64): `q`, `k` `[B, T, H, K]` and "
        "their gradients `dq`, `dk` `[B, T, H, K]` (holding g fixed). Return `dg` `[B, T, H, K]` float64. "
        "The check compares with autograd through the GLA forward, for a random loss, with and without an "
        "initial state."
    ),
    hints=(
        "Two steps: the gradient with respect to the cumulative log decay G_t, then a sum over the future because G_i includes g_t for every i ≥ t.",
        ("d log b = q * dq - k * dk (the q-side term grows with b_t, the k-side shrinks); time is dim 1 of "
         "[B, T, H, K]."),
        "return reverse_cumsum(q * dq - k * dk, dim=1)   # exercise 5.1",
    ),
    reference=_gate_gradient,
    cases=_gate_grad_cases,
    outputs=(("dg", "[B, T, H, K]"),),
    mistakes=(
        Mistake("a forward cumulative sum: g_t enters G_i for every LATER i ≥ t, so sum over the future",
                lambda q, k, dq, dk: (q * dq - k * dk).cumsum(1)),
        Mistake("the k ⊙ dk term is missing: d log b_t = q_t ⊙ dq_t − k_t ⊙ dk_t",
                lambda q, k, dq, dk: reverse_cumsum(q * dq, 1)),
        Mistake("the sign is flipped: d log b_t = q_t ⊙ dq_t − k_t ⊙ dk_t (q grows with b_t, k̃ = k / b_t shrinks)",
                lambda q, k, dq, dk: reverse_cumsum(k * dk - q * dq, 1)),
        Mistake("no cumulative sum: q ⊙ dq − k ⊙ dk is d log b_t (the gradient of G_t), not of g_t",
                lambda q, k, dq, dk: q * dq - k * dk),
        Mistake("the reverse sum is exclusive (i > t): off by one, it must include i = t",
                lambda q, k, dq, dk: reverse_cumsum(q * dq - k * dk, 1) - (q * dq - k * dk)),
    ),
)

EXERCISES = [REVERSE_CUMSUM, GATE_GRADIENT]
