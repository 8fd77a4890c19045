"""Chapter 10 exercises: lay out an MQAR batch; RetNet's fixed-decay gate."""

from __future__ import annotations

import torch

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import label, randn
from glalearn.tasks.mqar import FILLER, IGNORE, mqar_layout

NOTEBOOK = "10_recall_and_the_gate"


# ----------------------------------------------------------------------------- 10.1 an MQAR batch
def _mqar_cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, n, q, vocab in ((1, 8, 2, 1, 16), (3, 64, 8, 8, 64), (2, 65, 5, 3, 40), (4, 256, 16, 16, 8192)):
        keys = torch.stack([torch.randperm(vocab // 2 - 1, generator=gen)[:n] + 1 for _ in range(B)])
        values = torch.randint(vocab // 2, vocab, (B, n), generator=gen)
        asked = torch.stack([torch.randperm(n, generator=gen)[:q] for _ in range(B)])
        free = (T - 2 * n) // 2
        slots = torch.stack([torch.randperm(free, generator=gen)[:q].sort().values for _ in range(B)])
        cases.append(Case(label(B=B, T=T, pairs=n, queries=q, vocab=vocab), (keys, values, asked, slots, T)))
    return cases


def _layout_with(keys, values, asked, slots, seq_len, *, value_first=False, target_shift=0, fill_targets=False,
                 slot_stride=2, query_value=True):
    B, n = keys.shape
    inputs = torch.full((B, seq_len), FILLER, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    first, second = (values, keys) if value_first else (keys, values)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = first, second
    rows = torch.arange(B)[:, None]
    pos = 2 * n + slot_stride * slots
    inputs[rows, pos] = keys[rows, asked]
    if query_value:
        inputs[rows, (pos + 1).clamp(max=seq_len - 1)] = values[rows, asked]
    targets[rows, (pos + target_shift).clamp(max=seq_len - 1)] = values[rows, asked]
    if fill_targets:
        targets = torch.cat([inputs[:, 1:], torch.full((B, 1), IGNORE, dtype=torch.long)], dim=1)
    return inputs, targets


MQAR_BATCH = Exercise(
    id="10.1",
    title="an MQAR batch",
    points=1,
    signature="mqar_layout(keys, values, asked, slots, seq_len) -> (inputs, targets)",
    statement=(
        "Lay out a batch of multi-query associative recall sequences from their random choices. Every "
        "sequence first shows its key-value pairs, `keys[0] values[0] keys[1] values[1] …` (positions 0 … "
        "2·n_pairs−1, with n_pairs = `keys.shape[1]`); after them, query j puts the key of pair `asked[j]` "
        "at position $p_j = 2\\,n_{\\text{pairs}} + 2\\,\\text{slots}[j]$ and its value at $p_j + 1$; every "
        "other position is the filler 0. The model must predict the value when it sees the query key, so "
        "`targets[p_j]` is that value and every other target is `IGNORE = -100` (cross-entropy's "
        "`ignore_index`).\n\nInputs: `keys`, `values` `[B, n_pairs]` int64; `asked`, `slots` `[B, n_queries]` "
        "int64 (`slots` increasing); `seq_len` T a Python int. Return `(inputs [B, T], targets [B, T])`, "
        "both int64."
    ),
    hints=(
        ("Start from torch.full((B, T), 0) for inputs and torch.full((B, T), -100) for targets, then write "
         "the pairs with strided slices."),
        ("With n = keys.shape[1] pairs: inputs[:, 0:2*n:2] = keys and inputs[:, 1:2*n:2] = values; for the "
         "queries gather "
         "keys[rows, asked] with rows = torch.arange(B)[:, None]."),
        ("pos = 2*n + 2*slots; inputs[rows, pos] = keys[rows, asked]; inputs[rows, pos + 1] = "
         "values[rows, asked]; targets[rows, pos] = values[rows, asked]."),
    ),
    reference=mqar_layout,
    cases=_mqar_cases,
    outputs=(("inputs", "[B, T]"), ("targets", "[B, T]")),
    tolerance=0.0,
    forbidden=("glalearn.tasks.mqar.mqar_layout", "glalearn.tasks.mqar.mqar_batch"),
    mistakes=(
        Mistake("the target sits on the query's value token; it belongs on the query KEY's position p "
                "(the model predicts the value when it reads the key)",
                lambda *a: _layout_with(*a, target_shift=1)),
        Mistake("every position has a next-token target; only the query positions may (IGNORE = -100 elsewhere)",
                lambda *a: _layout_with(*a, fill_targets=True)),
        Mistake("the pairs are written value first; each pair is key, then value", lambda *a: _layout_with(
            *a, value_first=True)),
        Mistake("queries are placed at 2n + slots; a slot is two tokens wide: 2n + 2·slots",
                lambda *a: _layout_with(*a, slot_stride=1)),
        Mistake("the query's value token is missing after the query key (position p + 1)",
                lambda *a: _layout_with(*a, query_value=False)),
    ),
)


# ----------------------------------------------------------------------------- 10.2 the fixed-decay gate
def fixed_log_gate(x: torch.Tensor) -> torch.Tensor:
    """RetNet's decays as GLA log gates: g[b, t, h, :] = log(1 − 2^(−5−h)), shape and dtype of x [B, T, H, K]."""
    H = x.shape[2]
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    return torch.log(gamma).to(x.dtype)[None, None, :, None].expand(x.shape).clone()


def _gate_cases(gen: torch.Generator) -> list[Case]:
    return [Case(label(B=B, T=T, H=H, K=K), (randn(gen, B, T, H, K),))
            for B, T, H, K in ((1, 1, 1, 16), (2, 63, 4, 20), (1, 65, 8, 7), (3, 200, 3, 60))]


def _gate_gamma(x):
    return fixed_log_gate(x).exp()


def _gate_no_one_minus(x):
    H = x.shape[2]
    g = (-5.0 - torch.arange(H, dtype=torch.float64)) * torch.log(torch.tensor(2.0, dtype=torch.float64))
    return g.to(x.dtype)[None, None, :, None].expand(x.shape).clone()


def _gate_heads_from_one(x):
    H = x.shape[2]
    gamma = 1.0 - 2.0 ** (-6.0 - torch.arange(H, dtype=torch.float64))
    return torch.log(gamma).to(x.dtype)[None, None, :, None].expand(x.shape).clone()


def _gate_same_for_all_heads(x):
    return torch.full_like(x, torch.log(torch.tensor(1.0 - 2.0 ** -5)).item())


def _gate_on_channels(x):
    K = x.shape[3]
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(K, dtype=torch.float64))
    return torch.log(gamma).to(x.dtype)[None, None, None, :].expand(x.shape).clone()


def _gate_from_data(x):
    return torch.nn.functional.logsigmoid(x) / 16.0


FIXED_GATE = Exercise(
    id="10.2",
    title="the fixed-decay gate",
    points=1,
    signature="fixed_log_gate(x) -> g",
    statement=(
        "RetNet decays the state of head h by a constant $\\rho_h = 1 - 2^{-5-h}$ ($h = 0, 1, \\dots, H-1$) at "
        "every step, whatever the token. As a GLA gate that is the log gate $g_t = \\log\\rho_h$ on every key "
        "channel of head h and every token: GLA with the data dependence taken out.\n\nInputs: `x` `[B, T, H, "
        "K]` float64 (any tensor of the layout; only its shape and dtype matter — that is what "
        "*data-independent* means). Return `g` `[B, T, H, K]` in x's dtype (float64), every entry < 0."
    ),
    hints=(
        "Compute the H numbers log(1 − 2^(−5−h)) once, then broadcast them over batch, time and key channels.",
        "torch.arange(H, dtype=torch.float64) gives h; torch.log1p(-2.0 ** (-5.0 - h)) is log(1 − 2^(−5−h)).",
        ("g = torch.log1p(-2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))); "
         "return g.to(x.dtype)[None, None, :, None].expand(x.shape).clone()"),
    ),
    reference=fixed_log_gate,
    cases=_gate_cases,
    outputs=(("g", "[B, T, H, K]"),),
    forbidden=("glalearn.gates.retnet_log_decay", "glalearn.layers.GatedLinearAttention.log_gate"),
    mistakes=(
        Mistake("that is ρ_h itself; the forms take the LOG of the gate: g = log ρ_h", _gate_gamma),
        Mistake("that is log(2^(−5−h)); the decay is ρ_h = 1 − 2^(−5−h), so g = log(1 − 2^(−5−h))",
                _gate_no_one_minus),
        Mistake("the heads are numbered from 1; h runs 0, 1, ..., H − 1 so head 0 decays by 1 − 2^(−5)",
                _gate_heads_from_one),
        Mistake("every head has the same decay; head h decays by 1 − 2^(−5−h)", _gate_same_for_all_heads),
        Mistake("the decay varies over the key channels; it is one number per HEAD (axis 2), the same for "
                "all K channels", _gate_on_channels),
        Mistake("the gate reads the data; the fixed decay ignores x's values", _gate_from_data),
    ),
)

EXERCISES = [MQAR_BATCH, FIXED_GATE]
