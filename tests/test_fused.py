"""The fused kernels of glalearn.fused (chapter 9), forward and backward, against their PyTorch forms.

Float32 on fresh random inputs at awkward sizes (widths that are not powers of two, rows that do not
fill a block, strided gate slices, ignored targets). In Triton's interpreter on the CPU; on a GPU with
TRITON_INTERPRET=0 the same tests run compiled, plus the bf16 tests at the end.
"""

import os

import pytest
import torch

from glalearn import fused
from glalearn.numerics import relative_rmse

COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if COMPILED else "cpu"
TOL = 1e-5  # float32: the kernels reorder sums and use the GPU's fast exp/log


def _rand(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _grads(fn, inputs, dout):
    """fn(*inputs) and the gradients of <fn(*inputs), dout> for fresh leaf copies of inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.float() * dout).sum().backward()
    return out, [t.grad for t in leaves]


def _assert_close(got, want, tol=TOL, what=""):
    err = relative_rmse(got.float(), want.float())
    assert err <= tol, f"{what}: relative RMSE {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("shape,tau", [((2, 37, 3, 20), 16.0), ((1, 5, 1, 7), 1.0), ((3000,), 0.5)])
def test_log_gate_matches_logsigmoid_over_tau(shape, tau):
    z = _rand(*shape, scale=6.0)
    z.view(-1)[:4] = torch.tensor([40.0, -40.0, 0.0, 1e-4])  # saturated both ways, zero, tiny
    dg = _rand(*shape)
    g, (dz,) = _grads(lambda t: fused.log_gate(t, tau), [z], dg)
    g_ref, (dz_ref,) = _grads(lambda t: fused.log_gate_reference(t, tau), [z], dg)
    assert g.dtype == torch.float32 and g.shape == z.shape and (g <= 0).all()
    _assert_close(g, g_ref, what="g")
    _assert_close(dz, dz_ref, what="dz")
    # logsigmoid(40) = -4.2e-18: the log1p correction keeps it, a plain log(1 + e) would give 0
    assert g.view(-1)[0].item() < 0 and abs(g.view(-1)[0].item() / g_ref.view(-1)[0].item() - 1) < 1e-5


def test_log_gate_rejects_a_bad_normalizer():
    with pytest.raises(ValueError, match="tau .* must be > 0, got 0"):
        fused.log_gate(_rand(4), 0.0)


# ----------------------------------------------------------------------------- RMSNorm (with the gate)
@pytest.mark.parametrize("shape", [(3, 29, 40), (70, 1024), (5, 7)])
def test_rms_norm_forward_and_backward(shape):
    D = shape[-1]
    x, w, dy = _rand(*shape, scale=3.0), _rand(D) + 1.0, _rand(*shape)
    y, (dx, dw) = _grads(lambda a, b: fused.rms_norm(a, b, 1e-5), [x, w], dy)
    y_ref, (dx_ref, dw_ref) = _grads(lambda a, b: fused.rms_norm_reference(a, b, 1e-5), [x, w], dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    _assert_close(y, y_ref, what="y")
    _assert_close(dx, dx_ref, what="dx")
    _assert_close(dw, dw_ref, what="dw")
    # and the module it replaces
    norm = torch.nn.RMSNorm(D, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(w)
    _assert_close(y, norm(x), what="vs nn.RMSNorm")


@pytest.mark.parametrize("programs", [2048, 3])
def test_add_rms_norm_forward_and_backward(programs, monkeypatch):
    """The residual add and the norm: gradients from both outputs (the stream goes on, the norm feeds the FFN)."""
    monkeypatch.setattr(fused, "NORM_BACKWARD_PROGRAMS", programs)
    x, h, w = _rand(4, 250, 24, scale=2.0), _rand(4, 250, 24), _rand(24) + 1.0
    ds, dy = _rand(4, 250, 24), _rand(4, 250, 24)

    def both(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, h, w)]
        s_, y_ = fn(*leaves, 1e-5)
        ((s_ * ds).sum() + (y_.float() * dy).sum()).backward()
        return s_, y_, [t.grad for t in leaves]

    s_, y_, grads = both(fused.add_rms_norm)
    s_ref, y_ref, grads_ref = both(fused.add_rms_norm_reference)
    _assert_close(s_, s_ref, what="x + h")
    _assert_close(y_, y_ref, what="norm")
    for name, g, g_ref in zip(("dx", "dh", "dw"), grads, grads_ref):
        _assert_close(g, g_ref, what=name)


@pytest.mark.parametrize("programs", [2048, 3])
def test_norm_backward_walking_several_row_blocks(programs, monkeypatch):
    """With few programs each walks several blocks of rows (and the last one a partial walk)."""
    monkeypatch.setattr(fused, "NORM_BACKWARD_PROGRAMS", programs)
    x, w, dy = _rand(1000, 24, scale=3.0), _rand(24) + 1.0, _rand(1000, 24)  # 16 blocks of 64 rows
    _, (dx, dw) = _grads(lambda a, b: fused.rms_norm(a, b, 1e-5), [x, w], dy)
    _, (dx_ref, dw_ref) = _grads(lambda a, b: fused.rms_norm_reference(a, b, 1e-5), [x, w], dy)
    _assert_close(dx, dx_ref, what="dx")
    _assert_close(dw, dw_ref, what="dw")


@pytest.mark.parametrize("B,T,H,D", [(2, 33, 3, 24), (1, 9, 4, 256), (1, 70, 1, 8)])
def test_norm_swish_gate_forward_and_backward(B, T, H, D):
    o, w = _rand(B, T, H, D, scale=2.0), _rand(D) + 1.0
    wide = _rand(B, T, H * D + 10, scale=2.0)
    r = wide[..., 3:3 + H * D]  # a column slice, as of a wider projection: strided rows
    dy = _rand(B, T, H * D)
    y, (do, dr, dw) = _grads(lambda a, b, c: fused.norm_swish_gate(a, b[..., 3:3 + H * D], c, 1e-5),
                             [o, wide, w], dy)
    y_ref, (do_ref, dr_ref, dw_ref) = _grads(
        lambda a, b, c: fused.norm_swish_gate_reference(a, b[..., 3:3 + H * D], c, 1e-5), [o, wide, w], dy)
    assert y.shape == r.shape and y.dtype == r.dtype
    _assert_close(y, y_ref, what="y")
    _assert_close(do, do_ref, what="do")
    _assert_close(dr, dr_ref, what="dr (the slice's gradient inside the wide tensor)")
    assert dr[..., :3].abs().max() == 0 and dr[..., 3 + H * D:].abs().max() == 0
    _assert_close(dw, dw_ref, what="dw")


def test_norm_swish_gate_names_bad_shapes():
    with pytest.raises(ValueError, match=r"o \[\.\.\., H, D\], r \[\.\.\., H\*D\]"):
        fused.norm_swish_gate(_rand(2, 5, 3, 8), _rand(2, 5, 20), _rand(8), 1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[D=8\]"):
        fused.rms_norm(_rand(4, 8), _rand(6), 1e-5)


# ----------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("lead,F,d", [((2, 19), 40, 24), ((37,), 300, 16)])
def test_swiglu_down_forward_and_backward(lead, F, d):
    ab, w_down, dout = _rand(*lead, 2 * F, scale=2.0), _rand(d, F) / F ** 0.5, _rand(*lead, d)
    out, (dab, dw) = _grads(fused.swiglu_down, [ab, w_down], dout)
    out_ref, (dab_ref, dw_ref) = _grads(fused.swiglu_down_reference, [ab, w_down], dout)
    assert out.shape == (*lead, d)
    _assert_close(out, out_ref, what="out")
    _assert_close(dab, dab_ref, what="d[a|b]")
    _assert_close(dw, dw_ref, what="dW_down")


# ----------------------------------------------------------------------------- cross-entropy
def _targets(n, V, ignored=5):
    t = torch.randint(0, V, (n,), device=DEVICE)
    t[torch.randperm(n, device=DEVICE)[:ignored]] = fused.IGNORE_INDEX
    return t


@pytest.mark.parametrize("n,V", [(37, 5000), (8, 65), (3, 17)])
def test_cross_entropy_rows_and_their_gradient(n, V):
    logits = _rand(n, V, scale=3.0)
    t = _targets(n, V, ignored=min(5, n - 1))
    losses = fused.cross_entropy_rows(logits, t)
    want = fused.cross_entropy_rows_reference(logits, t)
    _assert_close(losses, want, what="losses")
    assert (losses[t == fused.IGNORE_INDEX] == 0).all()
    scale = 0.37
    losses_g, grad = fused.cross_entropy_rows_with_grad(logits, t, scale)
    leaf = logits.clone().requires_grad_()
    (fused.cross_entropy_rows_reference(leaf, t).sum() * scale).backward()
    _assert_close(losses_g, want, what="losses (with grad)")
    _assert_close(grad, leaf.grad, what="dlogits")


@pytest.mark.parametrize("chunk_rows", [16, None])
def test_linear_cross_entropy_equals_the_head_and_f_cross_entropy(chunk_rows):
    h, W = _rand(3, 21, 32), _rand(300, 32) / 4
    t = _targets(63, 300).reshape(3, 21)
    loss, (dh, dW) = _grads(lambda a, b: fused.linear_cross_entropy(a, b, t, chunk_rows=chunk_rows), [h, W],
                            torch.tensor(1.7, device=DEVICE))
    ref, (dh_ref, dW_ref) = _grads(lambda a, b: fused.linear_cross_entropy_reference(a, b, t), [h, W],
                                   torch.tensor(1.7, device=DEVICE))
    assert loss.dim() == 0
    _assert_close(loss, ref, what="loss")
    _assert_close(dh, dh_ref, what="dh")
    _assert_close(dW, dW_ref, what="dW")
    with torch.no_grad():  # the evaluation path forms no gradients, same number
        _assert_close(fused.linear_cross_entropy(h, W, t, chunk_rows=chunk_rows), ref, what="no-grad loss")


def test_linear_cross_entropy_names_bad_targets():
    h, W = _rand(2, 5, 8), _rand(11, 8)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 11\) or -100 .*got 11"):
        fused.linear_cross_entropy(h, W, torch.full((2, 5), 11, device=DEVICE))
    with pytest.raises(ValueError, match=r"targets must have the shape of the tokens \(2, 5\), got \(10,\)"):
        fused.linear_cross_entropy(h, W, torch.zeros(10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        fused.linear_cross_entropy(h, W, torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"h \[\.\.\., d\] and weight \[V, d\] must share d"):
        fused.linear_cross_entropy(h, _rand(11, 9), torch.zeros(2, 5, dtype=torch.long, device=DEVICE))


def test_fused_setting_is_checked():
    with pytest.raises(TypeError, match="fused must be True, False or None"):
        fused.fused_enabled("yes", torch.zeros(1))
    assert fused.fused_enabled(None, torch.zeros(1)) is False  # CPU tensors: the PyTorch path by default


# ----------------------------------------------------------------------------- bf16, compiled only
@pytest.mark.skipif(not COMPILED, reason="bf16 on a CUDA GPU, compiled (the interpreter's bf16 stores truncate)")
def test_bf16_pieces_match_their_forms_to_bf16_accuracy():
    bf = torch.bfloat16
    z = _rand(4, 300, 512, scale=4.0, dtype=bf)
    _assert_close(fused.log_gate(z, 16.0), fused.log_gate_reference(z, 16.0), what="gate from bf16 z")
    o, r, w = _rand(4, 300, 4, 256, dtype=bf), _rand(4, 300, 1024, dtype=bf), _rand(256) + 1
    _assert_close(fused.norm_swish_gate(o, r, w, 1e-5), fused.norm_swish_gate_reference(o, r, w, 1e-5),
                  tol=1e-2, what="norm gate")
    x = _rand(1200, 1024, scale=3.0)
    y = fused.rms_norm(x, w.repeat(4), 1e-5, out_dtype=bf)
    assert y.dtype == bf
    _assert_close(y, fused.rms_norm_reference(x, w.repeat(4), 1e-5, bf), tol=1e-2, what="rms norm -> bf16")
    logits, t = _rand(100, 32000, scale=3.0, dtype=bf), _targets(100, 32000)
    _assert_close(fused.cross_entropy_rows(logits, t), fused.cross_entropy_rows_reference(logits, t), tol=1e-5,
                  what="loss of bf16 logits")
    h, W = _rand(4, 1000, 256), _rand(32000, 256) / 16
    t = _targets(4000, 32000).reshape(4, 1000)
    with torch.autocast("cuda", dtype=bf):
        loss = fused.linear_cross_entropy(h, W, t, chunk_rows=1024)
        ref = fused.linear_cross_entropy_reference(h, W, t)
    _assert_close(loss, ref, tol=1e-3, what="chunked bf16 head + loss")
