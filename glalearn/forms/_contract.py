"""The input contract every GLA form shares (DESIGN.md §2), checked in one place.

Shapes are batch-first, as in flash-linear-attention:

    q, k : [B, T, H, K]      v : [B, T, H, V]      g : [B, T, H, K]  (log forget gate, every entry <= 0)
    initial_state : [B, H, K, V]

Every form calls :func:`validate` first, so a learner who passes a wrong shape gets the same clear
message from the recurrent form as from the Triton kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class GLAInputs:
    """Validated sizes and the dtypes a form computes and returns in."""

    B: int
    T: int
    H: int
    K: int
    V: int
    scale: float
    compute_dtype: torch.dtype  # float64 if the inputs are float64, else float32
    out_dtype: torch.dtype  # the dtype of q (o is returned in it)
    check_values: bool = True  # whether values were scanned (and the float16 output is checked)


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def _check_tensor(name: str, x, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got {_describe(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}"
        )


def _check_finite(name: str, x: torch.Tensor) -> None:
    # One reduction decides the common case; only a non-finite sum (a NaN/inf, or an overflow of
    # legitimately huge values) pays for the element-wise scan.
    if x.numel() == 0 or bool(torch.isfinite(x.sum(dtype=torch.float64))):
        return
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, but {name}[{', '.join(map(str, bad))}] = {x[tuple(bad)].item()}")


def check_power_of_two(name: str, value) -> int:
    """Chunk sizes must be positive powers of two (so blocks tile tensor-core shapes)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int power of two, got {value!r} ({type(value).__name__})")
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two (1, 2, 4, ..., 64, ...), got {value}")
    return value


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    check_values: bool = True,
) -> GLAInputs:
    """Check shapes, dtypes and values of the GLA inputs; return their sizes.

    Raises ``ValueError``/``TypeError`` naming the argument, the expectation and what was given.
    ``check_values`` scans the values (finite, ``g <= 0``); kernels on a GPU may skip it to avoid a sync.
    """
    _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 4, "[B, T, H, K]")
    _check_tensor("v", v, 4, "[B, T, H, V]")
    _check_tensor("g", g, 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g must have the shape of q [B, T, H, K] = {tuple(q.shape)}, got {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])} as in q, got {tuple(v.shape)}"
        )
    V = v.shape[3]
    if K == 0 or V == 0 or B == 0 or H == 0:
        raise ValueError(f"B, H, K and V must be at least 1, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    devices = {x.device for x in (q, k, v, g)}
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4, "[B, H, K, V]")
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(
                f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}"
            )
        devices.add(initial_state.device)
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if scale is None:
        scale = K**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float (default K ** -0.5), got {scale!r}")
    elif not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (default K ** -0.5 = {K ** -0.5:.4g}), got {scale!r}")
    if check_values:
        for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
            _check_finite(name, x)
        if initial_state is not None:
            _check_finite("initial_state", initial_state)
        if T > 0 and bool(g.max() > 0):
            where = (g > 0).nonzero()[0].tolist()
            raise ValueError(
                "g is the log of the forget gate and must be <= 0 everywhere (decay in (0, 1]), "
                f"but g[{', '.join(map(str, where))}] = {g[tuple(where)].item():.4g}"
            )
    float64 = torch.float64 in (q.dtype, g.dtype) or (
        initial_state is not None and initial_state.dtype == torch.float64
    )
    return GLAInputs(
        B=B, T=T, H=H, K=K, V=V, scale=float(scale),
        compute_dtype=torch.float64 if float64 else torch.float32,
        out_dtype=q.dtype, check_values=check_values,
    )


# float16 rounds every value of magnitude 65520 or more to inf (its largest finite value is 65504).
FLOAT16_OVERFLOW = 65520.0


def cast_output(o: torch.Tensor, info: GLAInputs, check: bool = True) -> torch.Tensor:
    """o in the dtype of q. For float16 inputs (with value checks on) first make sure it fits.

    The forms compute in float32, but float16 holds magnitudes up to 65504 only, and with float16
    inputs the two-level form also rounds its products' operands to float16: a large output, or an
    overflow inside the form, would come back as inf or NaN without a word. Raises ValueError that
    says so and names the fix (bfloat16 has float32's range in the same two bytes, or float32).
    """
    if check and info.check_values and info.out_dtype == torch.float16 and o.numel():
        largest = o.detach().abs().amax().item()
        if not largest < FLOAT16_OVERFLOW:  # NaN compares False too
            found = (f"|o| reaches {largest:.4g}" if math.isfinite(largest)
                     else "an intermediate product overflowed inside the form (o came out inf or NaN)")
            raise ValueError(
                "the output o overflows float16: the inputs are float16, so o is returned in float16 (largest "
                f"finite value 65504), but {found}. Pass bfloat16 inputs (float32's range in two bytes) or "
                "float32 inputs instead, e.g. q.bfloat16() or q.float() (and the same for k and v)"
            )
    return o.to(info.out_dtype)


def empty_result(q, v, initial_state, output_final_state: bool, info: GLAInputs):
    """The answer for T == 0: an empty output and the initial state passed through."""
    o = v.new_zeros((info.B, 0, info.H, info.V), dtype=info.out_dtype)
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, q.new_zeros((info.B, info.H, info.K, info.V), dtype=info.compute_dtype)
    return o, initial_state.to(info.compute_dtype).clone()
