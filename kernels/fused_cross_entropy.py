"""Cross-entropy of a block of logit rows, and its gradient written over the logits (chapter 9).

The language model's head turns each token's hidden state into V = 32,000 logits. Held whole in
float32, a batch of 32,768 tokens is 4.2 GB of logits, and eager PyTorch passes over them about ten
times (cast, log-softmax, its gradient, the cast back). ``glalearn.fused.linear_cross_entropy``
instead takes the tokens a chunk at a time: one product for the chunk's logits (bf16), then this
kernel, BLOCK_ROWS rows per program (one for a large vocabulary, several for a small one):

    pass 1   m, s = running max and Σ exp(x - m) over the row     lse = m + log s
             loss = lse - x[target]                               (0 for target = IGNORE)
    pass 2   x ← (softmax(x) - onehot(target)) · scale            only WITH_GRAD, in place

scale is 1 / (number of counted targets), read from memory so the mean needs no host sync. A target
outside [0, V) that is not IGNORE gives a NaN loss (the caller checks targets when asked to). The
PyTorch form it must equal is ``glalearn.fused.cross_entropy_rows_reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cross_entropy_kernel(logits, targets, loss, scale, n_rows, V, stride, IGNORE: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr, WITH_GRAD: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_ok = rows < n_rows
    base = logits + rows[:, None] * stride
    target = tl.load(targets + rows, mask=row_ok, other=IGNORE).to(tl.int64)
    ignored = target == IGNORE
    cols = tl.arange(0, BLOCK_V)
    mask = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=1)
    m = tl.where(row_ok, m, 0.0)  # rows past the end: keep their arithmetic finite
    s = tl.sum(tl.exp(x - m[:, None]), axis=1)
    for start in range(BLOCK_V, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(row_ok, s, 1.0))
    in_range = row_ok & (target >= 0) & (target < V)
    x_target = tl.load(logits + rows * stride + target, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(loss + rows, tl.where(ignored, 0.0, lse - x_target), mask=row_ok)
    if WITH_GRAD:
        row_scale = tl.where(ignored, 0.0, tl.load(scale).to(tl.float32))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            p = tl.where(cols[None, :] == target[:, None], p - 1.0, p) * row_scale[:, None]
            tl.store(base + cols[None, :], p.to(logits.dtype.element_ty), mask=mask)
