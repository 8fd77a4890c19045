"""Chapter 2 exercises: the naive parallel form and the stable log-space parallel form."""

from __future__ import annotations

import torch

from glalearn.checks.core import FORMS, Case, Exercise, Mistake
from glalearn.checks.inputs import gla_inputs, label
from glalearn.forms.parallel import parallel_gla

NOTEBOOK = "02_parallel_form"
REFUSED = (*FORMS, "glalearn.forms.parallel._log_space_output", "glalearn.gates.decay_mask")


def _reference(q, k, v, g, scale=None):
    return parallel_gla(q, k, v, g, scale=scale)[0]


def _cases(grid):
    def make(gen: torch.Generator) -> list[Case]:
        cases = []
        for B, T, H, K, V, tau in grid:
            x = gla_inputs(gen, B, T, H, K, V, tau)
            cases.append(Case(label(B=B, T=T, H=H, K=K, V=V, tau=tau), (x["q"], x["k"], x["v"], x["g"])))
        return cases
    return make


def _naive(q, k, v, g, scale=None, diagonal=0, causal=True, cumulative="inclusive", log_space=False):
    """The parallel form with switches for the usual slips ([B, T, H, *] in, [B, T, H, V] out)."""
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))  # [B, H, T, *]
    if cumulative == "inclusive":
        G = g.cumsum(2)
    elif cumulative == "exclusive":
        G = g.cumsum(2) - g
    else:  # one step's gate, no product over time
        G = g
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril(diagonal) if causal else torch.ones(T, T, dtype=torch.bool)
    if log_space:
        diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~mask[:, :, None], float("-inf"))
        A = (q[:, :, :, None, :] * k[:, :, None, :, :] * diff.exp()).sum(-1)
    else:
        A = ((q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)).masked_fill(~mask, 0.0)
    return (scale * A @ v).transpose(1, 2)


NAIVE = Exercise(
    id="2.1",
    title="the naive parallel form",
    points=2,
    signature="parallel_gla_naive(q, k, v, g, scale=None) -> o",
    statement=(
        "Unroll the recurrence into one attention-like product (paper Eq. 4, first form). With the "
        "cumulative log decay $G_t = g_0 + \\dots + g_t$ and the cumulative decay $b_t = \\exp(G_t)$ (row t of "
        "$b$):\n\n$o = \\text{scale}\\cdot\\big(((q \\odot b)(k / b)^\\top) \\odot M\\big)\\, v$, $M$ the causal mask "
        "($M[t, s] = 1$ for $s \\le t$, else 0).\n\nInputs (every tensor float64): `q`, `k`, `g` `[B, T, H, "
        "K]`, `v` `[B, T, H, V]`; `scale` a Python float, default `K ** -0.5`. Return `o` `[B, T, H, V]` "
        "float64. The check uses gentle gates (τ = 1, 16), where $k / b$ stays finite; exercise 2.2 shows "
        "what strong gates do to it."
    ),
    hints=(
        "Put heads next to batch first: q.transpose(1, 2) is [B, H, T, K]; every product is then per (b, h).",
        "G = g.cumsum(dim=time); q ⊙ b = q * G.exp(); k / b = k * (-G).exp(); A = (q ⊙ b) @ (k / b)ᵀ is [B, H, T, T].",
        ("A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0) keeps s ≤ t (the diagonal too); "
         "o = scale * A @ v, then transpose back to [B, T, H, V]."),
    ),
    reference=_reference,
    cases=_cases(((1, 1, 1, 16, 16, 1.0), (2, 63, 2, 20, 36, 16.0), (1, 65, 3, 60, 100, 1.0), (1, 40, 1, 12, 20, 1.0))),
    outputs=(("o", "[B, T, H, V]"),),
    forbidden=REFUSED,
    mistakes=(
        Mistake("the diagonal is masked out: token t attends to itself too (s ≤ t, tril() not tril(-1))",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, diagonal=-1)),
        Mistake("the causal mask is missing: o_t may only see s ≤ t",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, causal=False)),
        Mistake("b_t uses one step's gate exp(g_t); it is the product of all gates so far, exp(g_0 + ... + g_t)",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, cumulative="none")),
        Mistake("the cumulative sum is off by one: G_t = g_0 + ... + g_t includes g_t (an inclusive cumsum)",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, cumulative="exclusive")),
        Mistake("scale is missing: its default is K ** -0.5",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, 1.0)),
    ),
)

LOG_SPACE = Exercise(
    id="2.2",
    title="the log-space parallel form",
    points=3,
    signature="parallel_gla_log_space(q, k, v, g, scale=None) -> o",
    statement=(
        "Make the parallel form stable for every legal gate. Compute each decayed score as one sum with one "
        "exponent per (t, s, c):\n\n$A[t, s] = \\sum_c q_{tc}\\, k_{sc} \\exp(G_{tc} - G_{sc})$ for $s \\le t$ "
        "(else 0), $\\quad o = \\text{scale}\\cdot A v$.\n\nEvery exponent is ≤ 0, so nothing overflows. Inputs "
        "as in 2.1 (every tensor float64): `q`, `k`, `g` `[B, T, H, K]`, `v` `[B, T, H, V]`, `scale` a "
        "Python float, default `K ** -0.5`. Return `o` `[B, T, H, V]` float64. The check includes strong "
        "gates (τ = 0.1) and T = 200, where $G$ reaches about −1400 and the naive form gives inf/NaN."
    ),
    hints=(
        "exp(G_t) · exp(-G_s) = exp(G_t - G_s): take the difference of the logs first, exponentiate after.",
        ("With G [B, H, T, K], the exponents E = G[:, :, :, None, :] - G[:, :, None, :, :] are [B, H, T, T, K]; mask s > t "
         "with -inf BEFORE exp so those entries become exactly 0."),
        ("A = (q[:, :, :, None, :] * k[:, :, None, :, :] * E.masked_fill(~mask[..., None], "
         "float('-inf')).exp()).sum(-1); o = scale * A @ v."),
    ),
    reference=_reference,
    cases=_cases(((1, 1, 1, 16, 16, 1.0), (2, 63, 2, 20, 36, 0.1), (1, 65, 3, 24, 40, 16.0), (1, 200, 1, 12, 20, 0.1))),
    outputs=(("o", "[B, T, H, V]"),),
    forbidden=REFUSED,
    mistakes=(
        Mistake("the naive form: exp(-G_s) overflows under strong gates (inf, then NaN); take exp(G_t - G_s) "
                "as one exponent", lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale)),
        Mistake("the exponent has the wrong sign: exp(G_t - G_s) ≤ 1 for s ≤ t (query's G minus key's G)",
                lambda q, k, v, g, scale=None: _naive(q, k, v, -g, scale, log_space=True)),
        Mistake("the diagonal is masked out: token t attends to itself too (s ≤ t)",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, diagonal=-1, log_space=True)),
        Mistake("the cumulative sum is off by one: G_t = g_0 + ... + g_t includes g_t",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, cumulative="exclusive", log_space=True)),
        Mistake("the causal mask is missing (or applied after exp, where it must be -inf before)",
                lambda q, k, v, g, scale=None: _naive(q, k, v, g, scale, causal=False, log_space=True)),
    ),
)

EXERCISES = [NAIVE, LOG_SPACE]
