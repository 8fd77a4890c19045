"""RMSNorm, alone, after a residual add, or fused with GLA's Swish output gate, forward and backward
(chapter 9).

Rows of D channels: a row is one token of the residual stream (the blocks' RMSNorm, D = d_model) or
one (token, head) of the GLA layer's output (D = d_v, the per-head norm). For a row x with weight w:

    x     = x + h                           with the residual add: also written out (the new stream)
    ρ     = 1 / sqrt(mean(x²) + ε)          one number per row (saved for the backward)
    n     = x · ρ                           the normalized row
    y     = n ⊙ w                           RMSNorm
    y     = (n ⊙ w) ⊙ r · σ(r)              with the gate: r the output-gate projection, swish(r) = r·σ(r)

Backward, for dy (a := n ⊙ w, s := swish(r)):

    dr = dy ⊙ a ⊙ σ(r)(1 + r(1 - σ(r)))     (gate only; else s = 1)
    dw = Σ_rows dy ⊙ s ⊙ n                  partial sums per program, added up outside
    dn = dy ⊙ s ⊙ w
    dx = ρ · (dn - n · mean(dn ⊙ n))
    dx = dx + dx_out,  dh = dx              with the residual add (dx_out: the new stream's gradient)

One program takes BLOCK_ROWS whole rows (BLOCK_D >= D, the rest masked); in the backward it walks
several such blocks, so the partial sums of dw are few. Everything is float32 inside; each output is
stored in its buffer's dtype (bf16 under autocast, so the next matrix product reads it without a
cast; the residual stream and its gradient stay float32). The PyTorch forms these kernels must equal are
``glalearn.fused.rms_norm_reference`` (``add_rms_norm_reference``) and
``glalearn.fused.norm_swish_gate_reference``.

Addressing: x, y, dy, dx are [rows, D] with row strides (h and x_out as x, dx_out and dh as dx);
the gate r of row i = (token t, head h), t = i // HEADS and h = i % HEADS, sits at
r + t·stride_r + h·D ([tokens, HEADS·D], e.g. a column slice of a wider projection); its gradient
dr likewise with stride_dr.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_offsets(BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, n_rows, D):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _gate_offsets(rows, cols, stride_r, HEADS, D):
    return (rows // HEADS)[:, None] * stride_r + (rows % HEADS)[:, None] * D + cols[None, :]


@triton.jit
def _norm_forward(x, h, x_out, r, w, y, rstd, n_rows, D, eps, stride_x, stride_r, stride_y, HEADS,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr):
    rows, cols, row_ok, col_ok, mask = _row_offsets(BLOCK_ROWS, BLOCK_D, n_rows, D)
    x_offsets = rows[:, None] * stride_x + cols[None, :]
    xv = tl.load(x + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        xv += tl.load(h + x_offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_out + x_offsets, xv.to(x_out.dtype.element_ty), mask=mask)
    rho = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / D + eps)
    wv = tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = xv * rho[:, None] * wv[None, :]
    if HAS_GATE:
        rv = tl.load(r + _gate_offsets(rows, cols, stride_r, HEADS, D), mask=mask, other=0.0).to(tl.float32)
        out = out * rv * tl.sigmoid(rv)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, rho, mask=row_ok)


@triton.jit
def _norm_backward(x, r, w, rstd, dy, dx, dr, dx_out, dh, dw_partial, n_rows, D, stride_x, stride_r, stride_dr,
                   stride_dy, stride_dx, HEADS, row_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Each program walks ``row_blocks`` consecutive blocks of rows, summing its share of dw on the chip.
    With the residual add, x is the sum x + h the forward wrote."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    wv = tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(row_blocks):
        rows = ((tl.program_id(0) * row_blocks + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        xv = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rho = tl.load(rstd + rows, mask=row_ok, other=0.0)
        dyv = tl.load(dy + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        n = xv * rho[:, None]
        if HAS_GATE:
            rv = tl.load(r + _gate_offsets(rows, cols, stride_r, HEADS, D), mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(rv)
            drv = dyv * n * wv[None, :] * sig * (1.0 + rv * (1.0 - sig))
            tl.store(dr + _gate_offsets(rows, cols, stride_dr, HEADS, D), drv.to(dr.dtype.element_ty), mask=mask)
            dyv = dyv * rv * sig  # the gradient reaching the normalized, weighted row
        dw_acc += tl.sum(dyv * n, axis=0)
        dn = dyv * wv[None, :]
        dxv = rho[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        dx_offsets = rows[:, None] * stride_dx + cols[None, :]
        if HAS_RESIDUAL:
            dxv += tl.load(dx_out + dx_offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh + dx_offsets, dxv.to(dh.dtype.element_ty), mask=mask)
        tl.store(dx + dx_offsets, dxv.to(dx.dtype.element_ty), mask=mask)
    tl.store(dw_partial + tl.program_id(0) * BLOCK_D + cols, dw_acc)


# Separate names, so a profile tells the blocks' norms from the GLA layer's norm + gate.
@triton.jit
def rms_norm_forward_kernel(x, w, y, rstd, n_rows, D, eps, stride_x, stride_y,
                            BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _norm_forward(x, x, x, x, w, y, rstd, n_rows, D, eps, stride_x, 0, stride_y, 1, BLOCK_ROWS, BLOCK_D, False, False)


@triton.jit
def rms_norm_backward_kernel(x, w, rstd, dy, dx, dw_partial, n_rows, D, stride_x, stride_dy, stride_dx, row_blocks,
                             BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _norm_backward(x, x, w, rstd, dy, dx, dx, dx, dx, dw_partial, n_rows, D, stride_x, 0, 0, stride_dy, stride_dx, 1,
                   row_blocks, BLOCK_ROWS, BLOCK_D, False, False)


@triton.jit
def add_rms_norm_forward_kernel(x, h, x_out, w, y, rstd, n_rows, D, eps, stride_x, stride_y,
                                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _norm_forward(x, h, x_out, x, w, y, rstd, n_rows, D, eps, stride_x, 0, stride_y, 1, BLOCK_ROWS, BLOCK_D, False,
                  True)


@triton.jit
def add_rms_norm_backward_kernel(x_out, w, rstd, dy, dx_out, dx, dh, dw_partial, n_rows, D, stride_x, stride_dy,
                                 stride_dx, row_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _norm_backward(x_out, x_out, w, rstd, dy, dx, dx, dx_out, dh, dw_partial, n_rows, D, stride_x, 0, 0, stride_dy,
                   stride_dx, 1, row_blocks, BLOCK_ROWS, BLOCK_D, False, True)


@triton.jit
def norm_gate_forward_kernel(x, r, w, y, rstd, n_rows, D, eps, stride_x, stride_r, stride_y, HEADS,
                             BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _norm_forward(x, x, x, r, w, y, rstd, n_rows, D, eps, stride_x, stride_r, stride_y, HEADS, BLOCK_ROWS, BLOCK_D,
                  True, False)


@triton.jit
def norm_gate_backward_kernel(x, r, w, rstd, dy, dx, dr, dw_partial, n_rows, D, stride_x, stride_r, stride_dr,
                              stride_dy, stride_dx, HEADS, row_blocks, BLOCK_ROWS: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    _norm_backward(x, r, w, rstd, dy, dx, dr, dx, dx, dw_partial, n_rows, D, stride_x, stride_r, stride_dr,
                   stride_dy, stride_dx, HEADS, row_blocks, BLOCK_ROWS, BLOCK_D, True, False)
