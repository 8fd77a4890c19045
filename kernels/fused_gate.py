"""GLA's log forget gate g = logsigmoid(z) / τ in one pass, forward and backward (chapters 1 and 9).

z is the output of the gate's low-rank projection (bf16 under autocast); g is written in float32,
the precision every GLA kernel wants its gates in (a chunk's decay is a sum of 64 of them). Computing
logsigmoid in float32 from the bf16 z, instead of in bf16 and then converting, also gives g its full
float32 precision. Eager PyTorch needs three passes over [tokens, K] for the forward (logsigmoid,
division, cast) and three for the backward; these kernels need one each.

    logsigmoid(z) = min(z, 0) - log1p(exp(-|z|))         never overflows
    d g / d z     = σ(-z) / τ

Flat over all elements: the gate has no structure the kernel needs. The PyTorch form it must equal is
``glalearn.fused.log_gate_reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log1p(u):
    """log(1 + u) for 0 <= u <= 1, accurate where 1 + u rounds to 1 (Goldberg's correction)."""
    one_plus = 1.0 + u
    step = one_plus - 1.0
    return tl.where(step == 0.0, u, tl.log(one_plus) * (u / tl.where(step == 0.0, 1.0, step)))


@triton.jit
def gate_forward_kernel(z, g, n, tau, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    zv = tl.load(z + offsets, mask=mask, other=0.0).to(tl.float32)
    log_sigmoid = tl.minimum(zv, 0.0) - _log1p(tl.exp(-tl.abs(zv)))
    tl.store(g + offsets, (log_sigmoid / tau).to(g.dtype.element_ty), mask=mask)


@triton.jit
def gate_backward_kernel(z, dg, dz, n, tau, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    zv = tl.load(z + offsets, mask=mask, other=0.0).to(tl.float32)
    dgv = tl.load(dg + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz + offsets, (dgv * tl.sigmoid(-zv) / tau).to(dz.dtype.element_ty), mask=mask)
