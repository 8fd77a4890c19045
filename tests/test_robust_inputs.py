"""Validation where the user touches it (issue 20): the forms' scale and float16 range, the layer's x."""

import math

import pytest
import torch

from glalearn import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla
from glalearn.layers import GatedLinearAttention
from glalearn.numerics import random_gla_inputs

FORMS = [recurrent_gla, parallel_gla, chunk_gla, two_level_chunk_gla]
CHECKED_FP16 = [recurrent_gla, chunk_gla, two_level_chunk_gla,
                lambda **kw: parallel_gla(**kw, log_space=True)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.25])
def test_scale_must_be_finite_and_positive(form, scale):
    inputs = random_gla_inputs(B=1, T=5, H=2, K=8, V=4)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 \(default K \*\* -0.5 = 0.3536\), got "
                                         + (r"nan" if math.isnan(scale) else r"-?(inf|0\.0|0\.25)")):
        form(**inputs, scale=scale)
    o, _ = form(**inputs, scale=0.5)  # a legal scale still works
    assert torch.isfinite(o).all()


def _large_fp16_inputs():
    inputs = random_gla_inputs(B=1, T=64, H=2, K=16, V=8, dtype=torch.float16)
    inputs["v"] = (torch.randn(inputs["v"].shape) * 2e4).clamp(-6e4, 6e4).half()  # legal float16 values
    return inputs


@pytest.mark.parametrize("form", CHECKED_FP16)
def test_float16_overflow_is_reported_with_the_fix(form):
    inputs = _large_fp16_inputs()
    assert all(torch.isfinite(t).all() for t in inputs.values())
    o32, _ = form(**{n: t.float() for n, t in inputs.items()})
    assert o32.abs().max() > 65520  # the true output does not fit float16
    with pytest.raises(ValueError, match=r"the output o overflows float16: .* Pass bfloat16 inputs .* or float32"):
        form(**inputs)
    o_bf16, _ = form(**{n: t.bfloat16() for n, t in inputs.items()})  # the fix it names works
    assert o_bf16.dtype == torch.bfloat16 and torch.isfinite(o_bf16).all()
    small = {**inputs, "v": (inputs["v"].float() / 1e4).half()}  # float16 inputs whose output fits: no error
    o16, _ = form(**small)
    assert o16.dtype == torch.float16 and torch.isfinite(o16).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"d_model": 0}, "d_model must be a positive int, got 0"),
    ({"d_model": 64.0}, "d_model must be a positive int, got 64.0"),
    ({"d_model": 64, "num_heads": 0}, "num_heads must be a positive int, got 0"),
    ({"d_model": 64, "expand_k": 0.0}, "expand_k must be a finite number > 0, got 0.0"),
    ({"d_model": 4, "num_heads": 4}, r"the key width d_model\*expand_k = 2 .* at least num_heads = 4"),
])
def test_layer_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedLinearAttention(**kwargs)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_layer_checks_x_in_its_own_words():
    layer = GatedLinearAttention(d_model=32, num_heads=2, backend="chunk", chunk_size=16)
    x = torch.randn(2, 7, 32)
    assert layer(x).shape == x.shape
    with pytest.raises(TypeError, match=r"x must be a floating tensor .* got torch.int64; token ids go through an "
                                        "embedding first"):
        layer(torch.randint(0, 100, (2, 7, 32)))
    with pytest.raises(TypeError, match=r"x is torch.float64 but the layer's weights are torch.float32: cast x"):
        layer(x.double())
    assert layer.double()(x.double()).dtype == torch.float64  # a float64 layer takes float64 x
    layer.float()
    with pytest.raises(TypeError, match=r"x is torch.float16 but the layer's weights are torch.float32: cast x"):
        layer(x.half())
    bad = x.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"x must be finite, but x\[1, 3, 5\] = nan \(the input of the GLA layer"):
        layer(bad)
    with pytest.raises(ValueError, match=r"x_t must be finite, but x_t\[1, 5\] = nan"):
        layer.step(bad[:, 3])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(x.tolist())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 hidden states under autocast are fine
        y = layer(x.bfloat16())
    assert torch.isfinite(y).all()
