"""The data-dependent forget gate of GLA and helpers to look at it (chapter 1).

The paper (§4.4) makes the gate α_t = sigmoid(x_t W_α1 W_α2 + b_α)^(1/τ): a low-rank (16) projection
of the token, squashed to (0, 1) and softened by the normalizer τ = 16 so it stays close to 1. In log
space, which is what every form takes:

    g_t = log α_t = logsigmoid(x_t W1 W2 + b) / τ          every entry in (-inf, 0)

τ divides the log, so it raises α to the power 1/τ: a larger τ means slower forgetting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GATE_LOW_RANK_DIM = 16
GATE_LOGIT_NORMALIZER = 16.0


def gla_gate(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, b: torch.Tensor, normalizer: float = 16.0) -> torch.Tensor:
    """g = logsigmoid(x W1 W2 + b) / τ (chapter 1).

    Args:
        x: [..., d];  W1: [d, r];  W2: [r, K];  b: [K];  normalizer: τ > 0.
    Returns:
        g: [..., K], log forget gates, every entry < 0.
    """
    if normalizer <= 0:
        raise ValueError(f"normalizer (τ) must be > 0, got {normalizer}")
    if x.shape[-1] != W1.shape[0] or W1.shape[1] != W2.shape[0] or W2.shape[1] != b.shape[-1]:
        raise ValueError(
            f"shapes must chain as x [..., d] @ W1 [d, r] @ W2 [r, K] + b [K], got x {tuple(x.shape)}, "
            f"W1 {tuple(W1.shape)}, W2 {tuple(W2.shape)}, b {tuple(b.shape)}"
        )
    return nn.functional.logsigmoid(x @ W1 @ W2 + b) / normalizer


class LowRankGate(nn.Module):
    """The paper's gate as a module: d_model -> r -> key_dim, then logsigmoid / τ (chapters 1 and 8).

    Input x [B, T, d_model]; output g [B, T, key_dim] (reshape to heads outside).
    """

    def __init__(self, d_model: int, key_dim: int, low_rank_dim: int = GATE_LOW_RANK_DIM,
                 normalizer: float = GATE_LOGIT_NORMALIZER):
        super().__init__()
        if normalizer <= 0:
            raise ValueError(f"normalizer (τ) must be > 0, got {normalizer}")
        self.down = nn.Linear(d_model, low_rank_dim, bias=False)
        self.up = nn.Linear(low_rank_dim, key_dim, bias=True)
        self.normalizer = float(normalizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.logsigmoid(self.up(self.down(x))) / self.normalizer


def cumulative_log_decay(g: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """G_t = g_0 + ... + g_t along ``dim`` (time, tokens counted from 0), so b_t = exp(G_t) (chapters 1-2)."""
    return g.cumsum(dim=dim)


def chunk_cumulative_log_decay(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Cumulative log decay restarted at every chunk boundary (chapter 3).

    Args: g: [T, ...] with time first;  chunk_size: C.  Returns: [T, ...], G restarted every C steps.
    """
    T = g.shape[0]
    out = torch.empty_like(g)
    for start in range(0, T, chunk_size):
        out[start:start + chunk_size] = g[start:start + chunk_size].cumsum(0)
    return out


def decay_mask(g: torch.Tensor) -> torch.Tensor:
    """D[t, s] = prod_{s < i <= t} α_i = exp(G_t - G_s) for s <= t, else 0 (chapters 1-2).

    How much of token s is still in the state at time t. Computed as a difference of log decays,
    so it never overflows.

    Args: g: [T] (one channel) or [T, K].  Returns: [T, T] or [T, T, K].
    """
    if g.dim() not in (1, 2):
        raise ValueError(f"g must be [T] or [T, K], got shape {tuple(g.shape)}")
    G = g.to(torch.float64).cumsum(0)
    T = g.shape[0]
    diff = G[:, None] - G[None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
    if g.dim() == 2:
        causal = causal[..., None]
    return diff.masked_fill(~causal, float("-inf")).exp().to(g.dtype)


def retnet_log_decay(num_heads: int) -> torch.Tensor:
    """RetNet's fixed per-head decays ρ_h = 1 - 2^(-5-h), h = 0 ... H-1, as log gates log ρ_h [H] (chapters 1, 10)."""
    return torch.tensor([math.log1p(-(2.0 ** (-5 - h))) for h in range(num_heads)])
