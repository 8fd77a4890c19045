"""Fresh random inputs for exercise checks, at awkward sizes and gate strengths (DESIGN.md §2).

Sizes that catch the usual slips: T = 1 (no history), 63 and 65 (one off a chunk boundary), 200;
K != V and neither a power of two (a transposed state fails on shape or on values); gate normalizers
τ = 0.1 (about -7 per step: strong), 1 and 16 (the paper's gentle gate). Inputs are float64 so that a
correct answer matches the reference to ~1e-12 and the tolerance can be tight.
"""

from __future__ import annotations

import torch

DTYPE = torch.float64

# (B, T, H, K, V, τ, with initial state) — the standard grid of the sequence-level exercises.
GRID = (
    (1, 1, 1, 16, 16, 1.0, False),
    (2, 63, 2, 20, 36, 0.1, True),
    (1, 65, 3, 60, 100, 16.0, False),
    (1, 200, 1, 12, 20, 1.0, True),
)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Standard normal samples from ``gen`` (drawn in float64, then cast)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def log_gate(gen: torch.Generator, *shape: int, normalizer: float, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """g = logsigmoid(randn) / τ: log forget gates, every entry < 0 (chapter 1's parameterization)."""
    return (torch.nn.functional.logsigmoid(randn(gen, *shape)) / normalizer).to(dtype)


def gla_inputs(gen: torch.Generator, B: int, T: int, H: int, K: int, V: int, normalizer: float,
               initial_state: bool = False, dtype: torch.dtype = DTYPE) -> dict:
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] (and initial_state [B, H, K, V])."""
    out = {"q": randn(gen, B, T, H, K, dtype=dtype), "k": randn(gen, B, T, H, K, dtype=dtype),
           "v": randn(gen, B, T, H, V, dtype=dtype), "g": log_gate(gen, B, T, H, K, normalizer=normalizer, dtype=dtype)}
    if initial_state:
        out["initial_state"] = randn(gen, B, H, K, V, dtype=dtype)
    return out


def label(tau: float | None = None, s0: bool = False, **sizes) -> str:
    """A short case label: 'B=2 T=63 H=2 K=20 V=36 τ=0.1 +S0'."""
    parts = [f"{name}={value}" for name, value in sizes.items()]
    if tau is not None:
        parts.append(f"τ={tau:g}")
    if s0:
        parts.append("+S0")
    return " ".join(parts)
