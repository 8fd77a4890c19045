"""The SwiGLU feed-forward's elementwise middle, forward and backward (chapters 8-9).

The FFN is W_down (swish(a) ⊙ b) with a = x W_gate and b = x W_up. ``glalearn.fused.swiglu_down``
computes [a | b] as one product of x with the two weights stacked ([tokens, 2F]), then:

    forward    z = a · σ(a) · b                          [tokens, F], stored for W_down only
    backward   da = dz ⊙ b ⊙ σ(a)(1 + a(1 - σ(a)))       written into one [tokens, 2F] gradient
               db = dz ⊙ a · σ(a)                        (the stacked product's input gradient)
               z recomputed (for W_down's gradient), so the forward keeps only [a | b]

Tiles of BLOCK_ROWS tokens by BLOCK_F channels; float32 inside, outputs in their buffers' dtype.
The PyTorch form it must equal is ``glalearn.fused.swiglu_down_reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(n_rows, F, BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    return rows, cols, (rows < n_rows)[:, None] & (cols < F)[None, :]


@triton.jit
def swiglu_forward_kernel(ab, z, n_rows, F, stride_ab, stride_z, BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows, cols, mask = _tile(n_rows, F, BLOCK_ROWS, BLOCK_F)
    a_ptr = ab + rows[:, None] * stride_ab + cols[None, :]
    a = tl.load(a_ptr, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptr + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(z + rows[:, None] * stride_z + cols[None, :], (a * tl.sigmoid(a) * b).to(z.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(ab, dz, dab, z, n_rows, F, stride_ab, stride_dz, stride_dab, stride_z,
                           BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows, cols, mask = _tile(n_rows, F, BLOCK_ROWS, BLOCK_F)
    a_ptr = ab + rows[:, None] * stride_ab + cols[None, :]
    a = tl.load(a_ptr, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptr + F, mask=mask, other=0.0).to(tl.float32)
    dzv = tl.load(dz + rows[:, None] * stride_dz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    swish = a * sig
    da_ptr = dab + rows[:, None] * stride_dab + cols[None, :]
    tl.store(da_ptr, (dzv * b * sig * (1.0 + a * (1.0 - sig))).to(dab.dtype.element_ty), mask=mask)
    tl.store(da_ptr + F, (dzv * swish).to(dab.dtype.element_ty), mask=mask)
    tl.store(z + rows[:, None] * stride_z + cols[None, :], (swish * b).to(z.dtype.element_ty), mask=mask)
