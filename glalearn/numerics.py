"""Comparing tensors the way the book does: relative RMSE, max error, and where they first diverge.

Introduced in chapter 1 and used by every chapter, exercise check and test afterwards.
"""

from __future__ import annotations

import torch


def relative_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x - ref‖ / ‖ref‖ in float64, for any equal shapes [...] (chapter 1; DESIGN.md §2's error measure)."""
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    x, ref = x.detach().double(), ref.detach().double()
    num, den = (x - ref).norm().item(), ref.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over equal shapes [...] (inf if x holds a NaN) (chapter 1)."""
    diff = (x.detach().double() - ref.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("inf") if bool(diff.isnan().any()) else diff.max().item()


def first_divergence(x: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4):
    """The first index (row-major) where x and ref [...] differ beyond atol + rtol·|ref|, or None (chapter 1)."""
    x, ref = x.detach().double(), ref.detach().double()
    bad = ~((x - ref).abs() <= atol + rtol * ref.abs())  # NaN counts as bad
    if not bool(bad.any()):
        return None
    return tuple(bad.nonzero()[0].tolist())


def random_gla_inputs(
    B: int = 2,
    T: int = 64,
    H: int = 2,
    K: int = 16,
    V: int = 16,
    gate_normalizer: float = 16.0,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    initial_state: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Fresh random GLA inputs with the paper's gate statistics (chapter 1).

    q, k, g: [B, T, H, K];  v: [B, T, H, V];  initial_state (if asked): [B, H, K, V].

    g = logsigmoid(randn) / gate_normalizer: normalizer 16 is the paper's gentle gate, 0.1 a very
    strong one (about -7 per step). Returned as a dict of keyword arguments for any form.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    out = {
        "q": randn(B, T, H, K),
        "k": randn(B, T, H, K),
        "v": randn(B, T, H, V),
        "g": torch.nn.functional.logsigmoid(randn(B, T, H, K)) / gate_normalizer,
    }
    out = {name: x.to(dtype=dtype, device=device) for name, x in out.items()}
    if initial_state:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out["initial_state"] = randn(B, H, K, V).to(dtype=state_dtype, device=device)
    return out
