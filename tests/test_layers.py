"""The GLA layer (chapter 8): every gate on every backend gives the same numbers; recurrent step = parallel."""

import pytest
import torch

from glalearn.layers import BACKENDS, GATES, GatedLinearAttention, flash_available, resolve_backend
from glalearn.numerics import relative_rmse

EXACT_BACKENDS = ["recurrent", "chunk", "two_level"]


def _layer(gate="vector", d_model=32, heads=4, **kw):
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    layer = GatedLinearAttention(d_model, heads, gate=gate, **kw)
    # Stronger, more varied gates than the tiny default init, so the decay really matters.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 37, 70])
def test_backends_agree_for_every_gate(gate, T):
    # In float64 the forms are the same function up to rounding at 1e-16 (worst of 120 draws here:
    # ~1e-14); in float32 the per-head RMSNorm of a near-zero output amplifies rounding now and then
    # past 1e-5, which says nothing about the backends.
    layer = _layer(gate).double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    layer.backend = "recurrent"
    ref = layer(x)
    for backend in ["chunk", "two_level", "auto"]:
        layer.backend = backend
        y = layer(x)
        assert y.shape == (2, T, 32) and y.dtype == torch.float64
        assert (y - ref).abs().max() < 1e-10 * max(1.0, ref.abs().max().item()), backend


@pytest.mark.parametrize("gate", GATES)
def test_gradients_agree_across_backends(gate):
    # float64 (see above): worst relative error of 30 draws per gate here ~2e-13; float32 reached 7e-5.
    layer = _layer(gate).double()
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    grads = {}
    for backend in EXACT_BACKENDS:
        layer.backend = backend
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        (layer(xb) * torch.linspace(-1, 1, 32, dtype=torch.float64)).sum().backward()
        grads[backend] = torch.cat([xb.grad.flatten()] + [p.grad.flatten() for p in layer.parameters()])
    for backend in ["chunk", "two_level"]:
        err = (grads[backend] - grads["recurrent"]).norm() / grads["recurrent"].norm()
        assert err < 1e-10, (backend, err)


def test_unchecked_chunk_path_matches_checked():
    layer = _layer(chunk_size=16)
    layer.backend = "chunk"
    x = torch.randn(3, 50, 32)
    ref = layer(x)
    layer.check_inputs = False
    assert (layer(x) - ref).abs().max() < 1e-6


@pytest.mark.parametrize("gate", GATES)
def test_step_equals_forward_and_state_continues(gate):
    layer = _layer(gate)
    x = torch.randn(2, 30, 32)
    layer.backend = "chunk"
    ref, final = layer(x, output_final_state=True)
    state = None
    ys = []
    for t in range(30):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    assert (torch.stack(ys, 1) - ref).abs().max() < 1e-5
    assert relative_rmse(state, final) < 1e-5  # the state grows to ~20 without decay: compare relatively
    # A prompt in parallel, the rest recurrently.
    _, s = layer(x[:, :12], output_final_state=True)
    y_rest = layer(x[:, 12:], state=s)
    assert (y_rest - ref[:, 12:]).abs().max() < 1e-5


def test_gate_variants_have_their_shapes_and_ranges():
    x = torch.randn(2, 5, 32)
    g_vec = _layer("vector").log_gate(x)
    assert g_vec.shape == (2, 5, 4, 4) and (g_vec < 0).all()
    g_sc = _layer("scalar").log_gate(x)
    assert (g_sc == g_sc[..., :1]).all() and (g_sc < 0).all()
    g_fix = _layer("fixed").log_gate(x)
    expected = torch.log1p(-(2.0 ** (-5 - torch.arange(4.0))))
    assert torch.allclose(g_fix[0, 0, :, 0], expected)
    assert (g_fix == g_fix[:1, :1]).all()
    assert (_layer("none").log_gate(x) == 0).all()


def test_paper_shapes():
    layer = GatedLinearAttention(256, 4)
    assert (layer.key_dim, layer.value_dim, layer.head_k_dim, layer.head_v_dim) == (128, 256, 32, 64)
    assert layer.gate_proj.down.weight.shape == (16, 256) and layer.gate_proj.normalizer == 16.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="gate must be one of"):
        GatedLinearAttention(32, 4, gate="sigmoid")
    with pytest.raises(ValueError, match="backend must be one of"):
        GatedLinearAttention(32, 4, backend="fast")
    with pytest.raises(ValueError, match="num_heads must divide"):
        GatedLinearAttention(30, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=32\]"):
        GatedLinearAttention(32, 4)(torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"x_t must be \[B, d_model=32\]"):
        GatedLinearAttention(32, 4).step(torch.randn(2, 3, 32))


def test_auto_backend_on_cpu_needs_no_kernel():
    assert resolve_backend("auto", torch.device("cpu")) in BACKENDS
    assert resolve_backend("auto", torch.device("cpu")) != "flash"
    y = GatedLinearAttention(32, 4, backend="auto")(torch.randn(1, 9, 32))
    assert torch.isfinite(y).all()


@pytest.mark.skipif(flash_available(), reason="only meaningful while glalearn.flash_gla is missing")
def test_flash_backend_without_kernel_says_so():
    with pytest.raises(RuntimeError, match="glalearn.flash_gla"):
        GatedLinearAttention(32, 4, backend="flash")(torch.randn(1, 4, 32))


@pytest.mark.skipif(not flash_available(), reason="glalearn.flash_gla not importable")
@pytest.mark.parametrize("gate", GATES)
def test_flash_backend_agrees_with_chunk(gate):
    layer = _layer(gate)
    x = torch.randn(1, 20, 32)
    layer.backend = "chunk"
    ref = layer(x)
    layer.backend = "flash"
    assert relative_rmse(layer(x), ref) < 1e-4  # DESIGN.md: Triton interpreter in float32 <= 1e-4


@pytest.mark.skipif(not flash_available(), reason="glalearn.flash_gla not importable")
def test_flash_backend_takes_autocast_dtype(monkeypatch):
    """Under bf16 autocast the kernels get bf16 q, k, v (tensor-core products) and a float32 gate;
    the PyTorch forms still get float32. The output agrees with the float32 chunk form to bf16 accuracy."""
    from glalearn import layers

    seen = {}
    real = layers._flash_form()

    def spy(q, k, v, g, **kwargs):
        seen.update(q=q.dtype, k=k.dtype, v=v.dtype, g=g.dtype)
        return real(q, k, v, g, **kwargs)

    monkeypatch.setattr(layers, "_flash_form", lambda: spy)
    layer = _layer("vector")
    x = torch.randn(2, 37, 32)
    ref = layer(x)  # auto on CPU: a float32 PyTorch form
    layer.backend = "flash"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == {"q": torch.bfloat16, "k": torch.bfloat16, "v": torch.bfloat16, "g": torch.float32}
    assert relative_rmse(y.float(), ref) < 2e-2
    qf, *_ = layer.project(x)
    assert qf.dtype == torch.float32
