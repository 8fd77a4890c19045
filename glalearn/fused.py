"""The fused pieces of a GPU training step (chapter 9): each a Triton kernel with autograd, beside the
PyTorch form it must equal.

Chapter 7's kernel made GLA's token mixing cheap; what a training step then spends goes to everything
around it: passes over [tokens, channels] tensors that do little arithmetic each. These pieces take
one pass where eager PyTorch takes several (kernels in ``kernels/fused_*.py``):

    log_gate(z, τ)                  logsigmoid(z) / τ in float32, from the gate's low-rank projection
    norm_swish_gate(o, r, w)        per-head RMSNorm of the GLA output times swish(r), the output gate
    rms_norm(x, w)                  the blocks' RMSNorm, written in the autocast dtype the next product reads
    add_rms_norm(x, h, w)           a block's residual add and the norm after it, in one pass
    swiglu_down(ab, W_down)         W_down(swish(a) ⊙ b) for [a | b] from one stacked product
    linear_cross_entropy(h, W, t)   the head and the loss a chunk of tokens at a time: the whole
                                    [tokens, vocab] logits are never held (4.2 GB in float32 at 32k tokens)

Each ``*_reference`` function is the PyTorch form (what the model computes without the fusions);
``tests/test_fused.py`` checks forward and backward of every kernel against it in Triton's
interpreter. The models use the fused pieces where ``fused_enabled`` says so: on CUDA by default
(``fused=None``), never with ``fused=False``, and with ``fused=True`` also on the CPU under
``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets are not counted
# Logit elements one chunk of linear_cross_entropy may hold: 2^28 (512 MB in bf16; 8,192 tokens of a
# 32,000-word vocabulary, a quarter of the benchmark's batch).
LOSS_CHUNK_ELEMENTS = 1 << 28
# The norms' backward: at least this many programs, each walking up to 16 blocks of rows.
NORM_BACKWARD_PROGRAMS = 2048


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels():
    """The kernel modules, imported on first use (Triton decides at import whether to interpret)."""
    from glalearn.kernels import fused_cross_entropy, fused_gate, fused_norm_gate, fused_swiglu

    return fused_gate, fused_norm_gate, fused_swiglu, fused_cross_entropy


def fused_enabled(setting: bool | None, x: torch.Tensor) -> bool:
    """Whether a module with ``fused = setting`` takes the fused path for input x: None means on CUDA."""
    if setting is None:
        return x.is_cuda
    if not isinstance(setting, bool):
        raise TypeError(f"fused must be True, False or None (on CUDA only), got {setting!r}")
    return setting


def _check_device(x: torch.Tensor) -> None:
    if x.is_cuda:
        return
    fused_gate, *_ = _kernels()
    if type(fused_gate.gate_forward_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"the fused kernels (glalearn.fused) run on a CUDA GPU, but the input is on {x.device}. Use "
            "fused=False (or None, the default: fused on CUDA only), or run Triton's interpreter on the CPU: "
            "set TRITON_INTERPRET=1 before Triton is first imported."
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matrix product computes in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _rows_config(D: int) -> tuple[int, int, int]:
    """BLOCK_D (whole rows), BLOCK_ROWS (rows per program: about 4096 elements a tile) and warps."""
    block_d = max(16, _next_power_of_two(D))
    block_rows = max(1, min(64, 4096 // block_d))
    return block_d, block_rows, 4 if block_rows * block_d <= 2048 else 8


# ----------------------------------------------------------------------------- the gate
def log_gate_reference(z: torch.Tensor, tau: float) -> torch.Tensor:
    """g = logsigmoid(z) / τ in float32 (glalearn.gates.LowRankGate after its projection)."""
    return F.logsigmoid(z.float()) / tau


class _LogGate(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, z, tau):
        fused_gate, *_ = _kernels()
        z = z.contiguous()
        g = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        n = z.numel()
        fused_gate.gate_forward_kernel[(triton_cdiv(n, _LogGate.BLOCK),)](z, g, n, tau, BLOCK=_LogGate.BLOCK,
                                                                           num_warps=4)
        ctx.save_for_backward(z)
        ctx.tau = tau
        return g

    @staticmethod
    def backward(ctx, dg):
        fused_gate, *_ = _kernels()
        (z,) = ctx.saved_tensors
        dz = torch.empty_like(z)
        n = z.numel()
        fused_gate.gate_backward_kernel[(triton_cdiv(n, _LogGate.BLOCK),)](z, dg.contiguous(), dz, n, ctx.tau,
                                                                            BLOCK=_LogGate.BLOCK, num_warps=4)
        return dz, None


def log_gate(z: torch.Tensor, tau: float) -> torch.Tensor:
    """logsigmoid(z) / τ, float32, any shape (z: the gate projection's output, any float dtype)."""
    if not tau > 0:
        raise ValueError(f"tau (the gate normalizer τ) must be > 0, got {tau}")
    _check_device(z)
    return _LogGate.apply(z, float(tau))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- RMSNorm (with the gate)
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype=None) -> torch.Tensor:
    """x / sqrt(mean(x², last dim) + ε) ⊙ w, computed in float32, returned in ``out_dtype`` (x's)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(out_dtype or x.dtype)


def norm_swish_gate_reference(o: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm_head(o) ⊙ swish(r): o [..., H, D], r [..., H·D] -> [..., H·D] in r's dtype (float32 inside)."""
    n = rms_norm_reference(o, weight, eps, torch.float32).reshape(r.shape)
    return (n * F.silu(r.float())).to(r.dtype)


class _Norm(torch.autograd.Function):
    """RMSNorm of the rows of x [rows, D], times swish(r) when r is given ([tokens, heads·D] with
    rows = tokens·heads)."""

    @staticmethod
    def forward(ctx, x, r, weight, eps, heads, out_dtype):
        _, norm, *_ = _kernels()
        rows, D = x.shape
        block_d, block_rows, warps = _rows_config(D)
        y = torch.empty(rows, D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        grid = (triton_cdiv(rows, block_rows),)
        if r is None:
            norm.rms_norm_forward_kernel[grid](x, weight, y, rstd, rows, D, eps, x.stride(0), y.stride(0),
                                               BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
        else:
            norm.norm_gate_forward_kernel[grid](x, r, weight, y, rstd, rows, D, eps, x.stride(0), r.stride(0),
                                                y.stride(0), heads, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
                                                num_warps=warps)
        ctx.save_for_backward(x, r, weight, rstd)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, dy):
        _, norm, *_ = _kernels()
        x, r, weight, rstd = ctx.saved_tensors
        rows, D = x.shape
        block_d, block_rows, warps = _rows_config(D)
        blocks = triton_cdiv(rows, block_rows)
        row_blocks = max(1, min(16, blocks // NORM_BACKWARD_PROGRAMS))  # few partial sums of dw
        grid = (triton_cdiv(blocks, row_blocks),)
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw_partial = torch.empty(grid[0], block_d, dtype=torch.float32, device=x.device)
        dr = None
        if r is None:
            norm.rms_norm_backward_kernel[grid](x, weight, rstd, dy, dx, dw_partial, rows, D, x.stride(0),
                                                dy.stride(0), dx.stride(0), row_blocks, BLOCK_ROWS=block_rows,
                                                BLOCK_D=block_d, num_warps=warps)
        else:
            dr = torch.empty(r.shape, dtype=r.dtype, device=r.device)
            norm.norm_gate_backward_kernel[grid](x, r, weight, rstd, dy, dx, dr, dw_partial, rows, D, x.stride(0),
                                                 r.stride(0), dr.stride(0), dy.stride(0), dx.stride(0), ctx.heads,
                                                 row_blocks, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
        dw = dw_partial.sum(0)[:D].to(weight.dtype)
        return dx, dr, dw, None, None, None


def _rows_2d(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as a [rows, width] matrix with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., D] with weight [D], written in ``out_dtype`` (default: the
    autocast dtype when autocast is on, else x's). Gradients for x (in x's dtype) and weight."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D={D}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    _check_device(x)
    out_dtype = out_dtype or compute_dtype(x)
    y = _Norm.apply(_rows_2d(x, D), None, weight, float(eps), 1, out_dtype)
    return y.reshape(x.shape)


def add_rms_norm_reference(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                           out_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, RMSNorm(x + h)): a block's residual add and the norm after it (model.Block)."""
    s = x + h
    return s, rms_norm_reference(s, weight, eps, out_dtype or s.dtype)


class _AddNorm(torch.autograd.Function):
    """(x + h, RMSNorm(x + h)) for contiguous x, h [rows, D]: one pass each way."""

    @staticmethod
    def forward(ctx, x, h, weight, eps, out_dtype):
        _, norm, *_ = _kernels()
        rows, D = x.shape
        block_d, block_rows, warps = _rows_config(D)
        x_out = torch.empty(rows, D, dtype=torch.promote_types(x.dtype, h.dtype), device=x.device)
        y = torch.empty(rows, D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        norm.add_rms_norm_forward_kernel[(triton_cdiv(rows, block_rows),)](
            x, h, x_out, weight, y, rstd, rows, D, eps, D, D, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=warps)
        ctx.save_for_backward(x_out, weight, rstd)
        ctx.x_dtype, ctx.h_dtype = x.dtype, h.dtype
        return x_out, y

    @staticmethod
    def backward(ctx, dx_out, dy):
        _, norm, *_ = _kernels()
        x_out, weight, rstd = ctx.saved_tensors
        rows, D = x_out.shape
        dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.contiguous()
        dy = torch.zeros_like(x_out) if dy is None else dy.contiguous()
        block_d, block_rows, warps = _rows_config(D)
        blocks = triton_cdiv(rows, block_rows)
        row_blocks = max(1, min(16, blocks // NORM_BACKWARD_PROGRAMS))
        grid = (triton_cdiv(blocks, row_blocks),)
        dx = torch.empty(rows, D, dtype=ctx.x_dtype, device=x_out.device)
        dh = torch.empty(rows, D, dtype=ctx.h_dtype, device=x_out.device)
        dw_partial = torch.empty(grid[0], block_d, dtype=torch.float32, device=x_out.device)
        norm.add_rms_norm_backward_kernel[grid](x_out, weight, rstd, dy, dx_out, dx, dh, dw_partial, rows, D, D, D, D,
                                                row_blocks, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
        return dx, dh, dw_partial.sum(0)[:D].to(weight.dtype), None, None


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, RMSNorm(x + h)) for x, h [..., D]: a block's residual add and the norm that follows it in
    one pass. The sum keeps the promoted dtype of x and h (the float32 residual stream); the norm is
    written in ``out_dtype`` (default: the autocast dtype when autocast is on, else the sum's)."""
    D = x.shape[-1]
    if h.shape != x.shape or weight.shape != (D,):
        raise ValueError(f"add_rms_norm takes x and h of one shape [..., D] and weight [D]; got x {tuple(x.shape)}, "
                         f"h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    _check_device(x)
    out_dtype = out_dtype or (compute_dtype(x) if torch.is_autocast_enabled(x.device.type)
                              else torch.promote_types(x.dtype, h.dtype))
    s, y = _AddNorm.apply(x.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous(), weight, float(eps),
                          out_dtype)
    return s.reshape(x.shape), y.reshape(x.shape)


def norm_swish_gate(o: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm_head(o) ⊙ swish(r) (chapter 8's output of the GLA layer, before W_O).

    o: [..., H, D] (the GLA output);  r: [..., H·D] (the output-gate projection; may be a column slice);
    weight: [D]. Returns [..., H·D] in r's dtype."""
    *lead, H, D = o.shape
    if tuple(r.shape) != (*lead, H * D) or weight.shape != (D,):
        raise ValueError(f"norm_swish_gate takes o [..., H, D], r [..., H*D] and weight [D]; got o "
                         f"{tuple(o.shape)}, r {tuple(r.shape)}, weight {tuple(weight.shape)}")
    _check_device(o)
    y = _Norm.apply(_rows_2d(o, D), _rows_2d(r, H * D), weight, float(eps), H, r.dtype)
    return y.reshape(r.shape)


# ----------------------------------------------------------------------------- SwiGLU
def swiglu_down_reference(ab: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """W_down(swish(a) ⊙ b) for ab = [a | b] [..., 2F] and w_down [d, F] (model.SwiGLU's form)."""
    a, b = ab.chunk(2, dim=-1)
    return F.linear(F.silu(a) * b, w_down.to(ab.dtype))


class _SwiGLUDown(torch.autograd.Function):
    BLOCK_ROWS, BLOCK_F = 16, 128

    @staticmethod
    def forward(ctx, ab, w_down):
        *_, swiglu, _ = _kernels()
        n, F2 = ab.shape
        Fh = F2 // 2
        z = torch.empty(n, Fh, dtype=ab.dtype, device=ab.device)
        grid = (triton_cdiv(n, _SwiGLUDown.BLOCK_ROWS), triton_cdiv(Fh, _SwiGLUDown.BLOCK_F))
        swiglu.swiglu_forward_kernel[grid](ab, z, n, Fh, ab.stride(0), z.stride(0),
                                           BLOCK_ROWS=_SwiGLUDown.BLOCK_ROWS, BLOCK_F=_SwiGLUDown.BLOCK_F,
                                           num_warps=4)
        w = w_down.to(ab.dtype)
        with torch.autocast(ab.device.type, enabled=False):
            out = z @ w.t()
        ctx.save_for_backward(ab, w_down)
        return out

    @staticmethod
    def backward(ctx, dout):
        *_, swiglu, _ = _kernels()
        ab, w_down = ctx.saved_tensors
        n, F2 = ab.shape
        Fh = F2 // 2
        w = w_down.to(ab.dtype)
        dout = dout.to(ab.dtype).contiguous()
        dz = dout @ w
        dab = torch.empty_like(ab)
        z = torch.empty(n, Fh, dtype=ab.dtype, device=ab.device)
        grid = (triton_cdiv(n, _SwiGLUDown.BLOCK_ROWS), triton_cdiv(Fh, _SwiGLUDown.BLOCK_F))
        swiglu.swiglu_backward_kernel[grid](ab, dz, dab, z, n, Fh, ab.stride(0), dz.stride(0), dab.stride(0),
                                            z.stride(0), BLOCK_ROWS=_SwiGLUDown.BLOCK_ROWS,
                                            BLOCK_F=_SwiGLUDown.BLOCK_F, num_warps=4)
        dw = (dout.t() @ z).to(w_down.dtype) if ctx.needs_input_grad[1] else None
        return dab, dw


def swiglu_down(ab: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """W_down(swish(a) ⊙ b) for ab = [a | b] [..., 2F] (one product of x with W_gate and W_up stacked)
    and w_down [d, F]: [..., d] in ab's dtype. The backward recomputes swish(a) ⊙ b instead of keeping it."""
    if ab.shape[-1] % 2 or w_down.dim() != 2 or w_down.shape[1] != ab.shape[-1] // 2:
        raise ValueError(f"swiglu_down takes ab [..., 2F] and w_down [d, F]; got ab {tuple(ab.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    _check_device(ab)
    out = _SwiGLUDown.apply(_rows_2d(ab, ab.shape[-1]), w_down)
    return out.reshape(*ab.shape[:-1], w_down.shape[0])


# ----------------------------------------------------------------------------- head + loss
def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of logits [n, V] (float32 inside); 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none", ignore_index=IGNORE_INDEX)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits = h W^T (float32) against targets: what CausalLM.loss computes unfused."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def _cross_entropy_launch(logits, targets, losses, scale, with_grad):
    *_, ce = _kernels()
    n, V = logits.shape
    block_v = min(4096, max(16, _next_power_of_two(V)))
    block_rows = max(1, min(64, 2048 // block_v))  # one row per program for a large vocabulary
    ce.cross_entropy_kernel[(triton_cdiv(n, block_rows),)](
        logits, targets, losses, scale, n, V, logits.stride(0), IGNORE=IGNORE_INDEX, BLOCK_ROWS=block_rows,
        BLOCK_V=block_v, WITH_GRAD=with_grad, num_warps=8 if block_rows * block_v >= 2048 else 4)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row losses [n] (float32) of logits [n, V] by the kernel, no gradient (for tests and evaluation)."""
    _check_device(logits)
    logits = logits.contiguous()
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    scale = torch.ones((), dtype=torch.float32, device=logits.device)
    _cross_entropy_launch(logits, targets.reshape(-1).contiguous(), losses, scale, False)
    return losses


def cross_entropy_rows_with_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple:
    """(per-row losses [n], scale · d(Σ losses)/d logits [n, V] in logits' dtype) by the kernel."""
    _check_device(logits)
    grad = logits.contiguous().clone()
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    s = torch.full((), scale, dtype=torch.float32, device=logits.device)
    _cross_entropy_launch(grad, targets.reshape(-1).contiguous(), losses, s, True)
    return losses, grad


def loss_chunk_rows(vocab: int) -> int:
    """Tokens per chunk of linear_cross_entropy: LOSS_CHUNK_ELEMENTS logits, a multiple of 256 tokens."""
    rows = LOSS_CHUNK_ELEMENTS // vocab
    return rows // 256 * 256 if rows >= 256 else max(1, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h W^T, its gradients formed chunk by chunk during the forward (the logit
    gradient overwrites the chunk's logits), so the backward only scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk):
        N, d = h.shape
        V = weight.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            hc, w = h.to(dtype), weight.to(dtype)
            scale = 1.0 / (targets != IGNORE_INDEX).sum().to(torch.float32)
            losses = torch.empty(N, dtype=torch.float32, device=h.device)
            dh = torch.empty_like(hc)
            dw = torch.zeros(V, d, dtype=torch.float32, device=h.device)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                logits = hc[s:e] @ w.t()
                _cross_entropy_launch(logits, targets[s:e], losses[s:e], scale, True)  # logits := dlogits
                torch.mm(logits, w, out=dh[s:e])
                dw.add_(logits.t() @ hc[s:e])
            ctx.save_for_backward(dh, dw)
            ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
            return losses.sum() * scale

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        return (dh * dloss).to(ctx.h_dtype), (dw * dloss).to(ctx.w_dtype), None, None, None


def _check_targets(targets: torch.Tensor, lead: tuple, vocab: int, check_values: bool) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of class indices, got {got}")
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"targets must have the shape of the tokens {tuple(lead)}, got {tuple(targets.shape)}")
    if check_values:
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(f"targets must be class indices in [0, {vocab}) or {IGNORE_INDEX} (not counted), "
                             f"got {first}")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, check_targets: bool = True,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats per counted token) of the logits h W^T against targets, never holding them
    all: ``chunk_rows`` tokens at a time (default ``loss_chunk_rows(V)``), in the autocast dtype when
    autocast is on. h: [..., d]; weight: [V, d]; targets: [...] (IGNORE_INDEX = -100 is not counted).

    With gradients needed, each chunk's logit gradient (softmax - onehot) is formed right away and turned
    into its share of dh and dW, so nothing of the chunk outlives it. ``check_targets`` checks the values
    (a host sync on a GPU); unchecked, a target outside [0, V) makes the loss NaN.
    """
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"h [..., d] and weight [V, d] must share d; got h {tuple(h.shape)}, weight "
                         f"{tuple(weight.shape)}")
    _check_targets(targets, h.shape[:-1], weight.shape[0], check_targets)
    _check_device(h)
    V, d = weight.shape
    dtype = compute_dtype(h)
    chunk = chunk_rows or loss_chunk_rows(V)
    h2, t = h.reshape(-1, d), targets.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, t, dtype, chunk)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        hc, w = h2.to(dtype), weight.to(dtype)
        losses = torch.empty(h2.shape[0], dtype=torch.float32, device=h.device)
        one = torch.ones((), dtype=torch.float32, device=h.device)
        for s in range(0, h2.shape[0], chunk):
            _cross_entropy_launch(hc[s:s + chunk] @ w.t(), t[s:s + chunk], losses[s:s + chunk], one, False)
        return losses.sum() / (t != IGNORE_INDEX).sum()
