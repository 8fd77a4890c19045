"""Chapter 8 exercise: the GLA layer's forward pass from its weights."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from glalearn.checks.core import Case, Exercise, Mistake
from glalearn.checks.inputs import label, randn
from glalearn.forms.chunk import chunk_gla
from glalearn.layers import GatedLinearAttention

NOTEBOOK = "08_gla_transformer"
TAU = 16.0
EPS = 1e-5


def layer_from_weights(W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads) -> GatedLinearAttention:
    """A float64 GatedLinearAttention holding the given weights (matrices are [in, out], as in x @ W)."""
    d = W_q.shape[0]
    layer = GatedLinearAttention(d, num_heads, expand_k=W_q.shape[1] / d, expand_v=W_v.shape[1] / d,
                                 gate_low_rank_dim=W_1.shape[1], backend="chunk").double()
    with torch.no_grad():
        for lin, W in ((layer.q_proj, W_q), (layer.k_proj, W_k), (layer.v_proj, W_v), (layer.gate_proj.down, W_1),
                       (layer.gate_proj.up, W_2), (layer.output_gate, W_r), (layer.o_proj, W_o)):
            lin.weight.copy_(W.T)
        layer.gate_proj.up.bias.copy_(b)
        layer.head_norm.weight.copy_(w_norm)
    return layer


def gla_layer_forward(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    """The library's layer with these weights (the reference of exercise 8.1)."""
    return layer_from_weights(W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads)(x)


def layer_weights(gen: torch.Generator, d: int, H: int, rank: int = 16) -> tuple:
    """Random weights of a GLA layer of width d with H heads, expand_k 0.5, expand_v 1 ([in, out] matrices)."""
    dk, dv = d // 2, d
    s = d ** -0.5
    return (s * randn(gen, d, dk), s * randn(gen, d, dk), s * randn(gen, d, dv), s * randn(gen, d, rank),
            rank ** -0.5 * randn(gen, rank, dk), randn(gen, dk), s * randn(gen, d, dv),
            1 + 0.1 * randn(gen, dv // H), s * randn(gen, dv, d))


def _cases(gen: torch.Generator) -> list[Case]:
    cases = []
    for B, T, d, H in ((1, 1, 16, 2), (2, 63, 24, 4), (1, 65, 32, 4), (2, 20, 40, 1)):
        cases.append(Case(label(B=B, T=T, d=d, H=H), (randn(gen, B, T, d), *layer_weights(gen, d, H), H)))
    return cases


def _pieces(x, W_q, W_k, W_v, W_1, W_2, b, W_r, num_heads, tau=TAU):
    B, T, _ = x.shape
    H = num_heads
    q = (x @ W_q).view(B, T, H, -1)
    k = (x @ W_k).view(B, T, H, -1)
    v = (x @ W_v).view(B, T, H, -1)
    g = (F.logsigmoid(x @ W_1 @ W_2 + b) / tau).view(B, T, H, -1)
    return q, k, v, g


def _no_tau(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    q, k, v, g = _pieces(x, W_q, W_k, W_v, W_1, W_2, b, W_r, num_heads, tau=1.0)
    o, _ = chunk_gla(q, k, v, g)
    o = F.rms_norm(o, (o.shape[-1],), w_norm, EPS).flatten(2)
    return (o * F.silu(x @ W_r)) @ W_o


def _norm_over_all_heads(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    q, k, v, g = _pieces(x, W_q, W_k, W_v, W_1, W_2, b, W_r, num_heads)
    o, _ = chunk_gla(q, k, v, g)
    o = o.flatten(2)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS) * w_norm.repeat(num_heads)
    return (o * F.silu(x @ W_r)) @ W_o


def _sigmoid_output_gate(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    q, k, v, g = _pieces(x, W_q, W_k, W_v, W_1, W_2, b, W_r, num_heads)
    o, _ = chunk_gla(q, k, v, g)
    o = F.rms_norm(o, (o.shape[-1],), w_norm, EPS).flatten(2)
    return (o * torch.sigmoid(x @ W_r)) @ W_o


def _no_norm(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    q, k, v, g = _pieces(x, W_q, W_k, W_v, W_1, W_2, b, W_r, num_heads)
    o, _ = chunk_gla(q, k, v, g)
    return ((o * w_norm).flatten(2) * F.silu(x @ W_r)) @ W_o


LAYER_FORWARD = Exercise(
    id="8.1",
    title="the GLA layer's forward",
    points=2,
    signature="gla_layer(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads) -> y",
    statement=(
        "Compute the paper's GLA layer (§4.4) from its weights (every matrix is `[in, out]`, applied as `x @ "
        "W`):\n\n$q = x W_Q,\\ k = x W_K,\\ v = x W_V$, each split into `num_heads` heads;\n$g = "
        "\\mathrm{logsigmoid}(x W_\\alpha^1 W_\\alpha^2 + b_\\alpha) / 16$, the log forget gate (τ = 16);\n$o = "
        "\\mathrm{GLA}(q, k, v, g)$ with scale $K^{-1/2}$ (the forms' default);\n$y = "
        "\\big(\\mathrm{RMSNorm}_{\\text{head}}(o; w_{norm}) \\odot r\\big)\\, W_O$ with the output gate $r = "
        "\\mathrm{Swish}(x W_r)$ — the RMSNorm runs over each head's V channels (eps 1e-5), with one weight "
        "vector `w_norm` shared by the heads.\n\nInputs (every tensor float64): `x` `[B, T, d]`; `W_q` $= W_Q$ "
        "and `W_k` $= W_K$ `[d, H·K]`; `W_v` $= W_V$ and `W_r` `[d, H·V]`; `W_1` $= W_\\alpha^1$ `[d, 16]`; "
        "`W_2` $= W_\\alpha^2$ `[16, H·K]`; `b` $= b_\\alpha$ `[H·K]`; `w_norm` `[V]`; `W_o` $= W_O$ `[H·V, "
        "d]`; `num_heads` H a Python int. Return `y` `[B, T, d]` float64. Use any GLA form of the library, "
        "e.g. `chunk_gla(q, k, v, g)` with q, k, g `[B, T, H, K]` and v `[B, T, H, V]`; the library's layer "
        "(`glalearn.layers.GatedLinearAttention`) is the answer itself, so it raises while your function is "
        "checked."
    ),
    hints=(
        "Reshape each projection to [B, T, H, K] (v to [B, T, H, V]) with .view(B, T, num_heads, -1); the forms take that layout.",
        "The gate is logsigmoid(...) divided by τ = 16, and it is a log gate: pass it to the form as g.",
        ("o, _ = chunk_gla(q, k, v, g); o = F.rms_norm(o, (o.shape[-1],), w_norm, 1e-5).flatten(2); "
         "y = (o * F.silu(x @ W_r)) @ W_o"),
    ),
    reference=gla_layer_forward,
    cases=_cases,
    outputs=(("y", "[B, T, d]"),),
    tolerance=1e-5,  # the layer computes in float32
    forbidden=("glalearn.layers.GatedLinearAttention.forward", layer_from_weights),
    mistakes=(
        Mistake("the gate is not divided by τ = 16: g = logsigmoid(x W_1 W_2 + b) / 16", _no_tau),
        Mistake("the RMSNorm runs over all heads at once; it must normalize each head's V channels",
                _norm_over_all_heads),
        Mistake("the output gate uses sigmoid; the paper's is Swish: silu(z) = z · sigmoid(z)", _sigmoid_output_gate),
        Mistake("the per-head RMSNorm is missing (only its weight is applied)", _no_norm),
    ),
)

EXERCISES = [LAYER_FORWARD]
