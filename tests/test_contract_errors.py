"""Bad input gets a clear error naming the argument, the expectation and what was given."""

import pytest
import torch

from glalearn import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla
from glalearn.numerics import random_gla_inputs

FORMS = [recurrent_gla, parallel_gla, chunk_gla, two_level_chunk_gla]


@pytest.fixture
def inputs():
    return random_gla_inputs(B=2, T=10, H=3, K=8, V=6, initial_state=True)


def call(form, inputs, **overrides):
    return form(**{**inputs, **overrides})


@pytest.mark.parametrize("form", FORMS)
def test_wrong_rank(form, inputs):
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \[B, T, H, K\], got shape \(2, 10, 24\)"):
        call(form, inputs, q=inputs["q"].reshape(2, 10, 24))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,shape,pattern", [
    ("k", (2, 10, 3, 7), r"k must have the shape of q \[B, T, H, K\] = \(2, 10, 3, 8\), got \(2, 10, 3, 7\)"),
    ("g", (2, 9, 3, 8), r"g must have the shape of q"),
    ("v", (2, 10, 2, 6), r"v must be \[B, T, H, V\] with B, T, H = \(2, 10, 3\)"),
    ("v", (1, 10, 3, 6), r"v must be \[B, T, H, V\]"),
    ("initial_state", (2, 3, 6, 8), r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 8, 6\), got \(2, 3, 6, 8\)"),
])
def test_mismatched_shapes(form, inputs, name, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(form, inputs, **{name: torch.randn(shape)})


@pytest.mark.parametrize("form", FORMS)
def test_positive_gate(form, inputs):
    g = inputs["g"].clone()
    g[1, 4, 2, 5] = 0.25
    with pytest.raises(ValueError, match=r"g .* must be <= 0 .* g\[1, 4, 2, 5\] = 0.25"):
        call(form, inputs, g=g)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["q", "k", "v", "g", "initial_state"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(form, inputs, name, bad):
    x = inputs[name].clone()
    x.view(-1)[7] = bad
    with pytest.raises(ValueError, match=rf"{name} must be finite, but {name}\[.*\] = "):
        call(form, inputs, **{name: x})


@pytest.mark.parametrize("form", [chunk_gla, two_level_chunk_gla])
@pytest.mark.parametrize("size", [0, 3, 48, -16])
def test_chunk_size_power_of_two(form, inputs, size):
    with pytest.raises(ValueError, match=rf"chunk_size must be a positive power of two .* got {size}"):
        call(form, inputs, chunk_size=size)


def test_chunk_size_type(inputs):
    with pytest.raises(TypeError, match=r"chunk_size must be an int power of two, got 64.0"):
        chunk_gla(**inputs, chunk_size=64.0)


def test_sub_chunk_size(inputs):
    with pytest.raises(ValueError, match=r"sub_chunk_size must be a positive power of two .* got 12"):
        two_level_chunk_gla(**inputs, sub_chunk_size=12)
    with pytest.raises(ValueError, match=r"sub_chunk_size must be <= chunk_size = 16, got 32"):
        two_level_chunk_gla(**inputs, chunk_size=16, sub_chunk_size=32)
    with pytest.raises(ValueError, match=r"diagonal must be 'log_space', 'split' or 'guarded', got 'fast'"):
        two_level_chunk_gla(**inputs, diagonal="fast")


@pytest.mark.parametrize("form", FORMS)
def test_dtype_errors(form, inputs):
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype, got q torch.float32, k torch.float64"):
        call(form, inputs, k=inputs["k"].double())
    with pytest.raises(TypeError, match=r"g must be a floating tensor .* got torch.int64"):
        call(form, inputs, g=torch.zeros(2, 10, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor of shape \[B, T, H, K\], got list"):
        call(form, inputs, q=[1.0, 2.0])
    with pytest.raises(TypeError, match=r"scale must be a float"):
        call(form, inputs, scale="0.5")
