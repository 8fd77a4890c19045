"""Every GLA form against the float64 recurrent reference (DESIGN.md §2), values and gradients."""

import functools
import itertools

import pytest
import torch

from glalearn import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla
from glalearn.forms.chunk import log_space_scores, to_chunks
from glalearn.forms.two_level import GUARD_MAGNITUDE, GUARD_SPAN, guarded_scores
from glalearn.numerics import random_gla_inputs, relative_rmse

FORMS = {
    "recurrent": recurrent_gla,
    "parallel_log_space": lambda *a, **kw: parallel_gla(*a, log_space=True, **kw),
    "chunk": chunk_gla,
    "chunk_16": lambda *a, **kw: chunk_gla(*a, chunk_size=16, **kw),
    "two_level": two_level_chunk_gla,
    "two_level_split": lambda *a, **kw: two_level_chunk_gla(*a, diagonal="split", **kw),
    "two_level_guarded": lambda *a, **kw: two_level_chunk_gla(*a, diagonal="guarded", **kw),
    "two_level_32_8": lambda *a, **kw: two_level_chunk_gla(*a, chunk_size=32, sub_chunk_size=8, **kw),
}
SIZES_T = [1, 63, 65, 200]
SIZES_KV = [(16, 16), (60, 100), (64, 64), (100, 60), (128, 16)]
NORMALIZERS = [0.1, 1.0, 16.0]
CASES = [
    (T, SIZES_KV[i % len(SIZES_KV)], norm, bool(i % 2))
    for i, (T, norm) in enumerate(itertools.product(SIZES_T, NORMALIZERS))
]


def reference(inputs, final=True):
    x64 = {n: t.double() for n, t in inputs.items()}
    return recurrent_gla(**x64, output_final_state=final)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T,KV,norm,with_state", CASES, ids=lambda c: str(c))
def test_form_matches_float64_recurrence(form, T, KV, norm, with_state):
    K, V = KV
    inputs = random_gla_inputs(B=2, T=T, H=2, K=K, V=V, gate_normalizer=norm, initial_state=with_state)
    o_ref, s_ref = reference(inputs)
    o, s = FORMS[form](**inputs, output_final_state=True)
    assert o.dtype == torch.float32 and o.shape == (2, T, 2, V)
    assert s.dtype == torch.float32 and s.shape == (2, 2, K, V)
    assert relative_rmse(o, o_ref) <= 1e-5
    assert relative_rmse(s, s_ref) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("g_value", [-30.0, -1e-6])
def test_extreme_gates(form, g_value):
    """g = -30 per step (everything forgotten at once) and g -> 0 (nothing forgotten)."""
    inputs = random_gla_inputs(B=1, T=130, H=2, K=16, V=60, initial_state=True)
    inputs["g"] = torch.full_like(inputs["g"], g_value)
    o_ref, s_ref = reference(inputs)
    o, s = FORMS[form](**inputs, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relative_rmse(o, o_ref) <= 1e-5
    assert relative_rmse(s, s_ref) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_mixed_extreme_gates_per_channel(form):
    """Some channels forget at -30 per step while others barely decay: one exponent range per channel."""
    inputs = random_gla_inputs(B=1, T=97, H=1, K=16, V=16)
    g = inputs["g"]
    g[..., ::2] = -30.0 * torch.rand_like(g[..., ::2])
    g[..., 1::2] = -1e-4 * torch.rand_like(g[..., 1::2])
    o_ref, s_ref = reference(inputs)
    o, s = FORMS[form](**inputs, output_final_state=True)
    assert relative_rmse(o, o_ref) <= 1e-5 and relative_rmse(s, s_ref) <= 1e-5


GRAD_FORMS = ["chunk", "chunk_16", "two_level", "two_level_split", "two_level_guarded", "parallel_log_space",
              "recurrent"]


def gradients_vs_float64(form, inputs):
    """[(name, gradient of form in float32, gradient of recurrent_gla in float64)] for a random loss
    on o and S_T."""
    names = list(inputs)
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    o, s = recurrent_gla(**x64, output_final_state=True)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    ref = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [x64[n] for n in names])
    x32 = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    o, s = form(**x32, output_final_state=True)
    got = torch.autograd.grad((o * do.float()).sum() + (s * ds.float()).sum(), [x32[n] for n in names])
    return list(zip(names, got, ref))


@pytest.mark.parametrize("form", GRAD_FORMS)
@pytest.mark.parametrize("T,norm,KV", [(1, 1.0, (16, 16)), (63, 0.1, (16, 60)), (130, 16.0, (60, 16)), (200, 0.1, (64, 100)),
                                       (65, 1.0, (64, 64))])
def test_gradients_match_float64_autograd(form, T, norm, KV):
    K, V = KV
    inputs = random_gla_inputs(B=2, T=T, H=2, K=K, V=V, gate_normalizer=norm, initial_state=True)
    for name, a, b in gradients_vs_float64(FORMS[form], inputs):
        assert relative_rmse(a, b) <= 1e-5, f"d{name}: {relative_rmse(a, b):.2e}"


def test_chunk_backward_without_final_state_and_initial_state():
    inputs = random_gla_inputs(B=1, T=70, H=2, K=16, V=16, gate_normalizer=1.0)
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    o, _ = recurrent_gla(**x64)
    do = torch.randn_like(o)
    ref = torch.autograd.grad((o * do).sum(), list(x64.values()))
    x32 = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    o, s = chunk_gla(**x32)
    assert s is None
    got = torch.autograd.grad((o * do.float()).sum(), list(x32.values()))
    for a, b in zip(got, ref):
        assert relative_rmse(a, b) <= 1e-5


def test_chunk_backward_matches_gradcheck_in_float64():
    inputs = random_gla_inputs(B=1, T=9, H=1, K=3, V=2, gate_normalizer=1.0, dtype=torch.float64, initial_state=True)
    args = [inputs[n].requires_grad_() for n in ("q", "k", "v", "g", "initial_state")]

    def f(q, k, v, g, s0):
        o, s = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=4)
        return o, s

    assert torch.autograd.gradcheck(f, args)


def test_two_level_bfloat16_matmuls_within_5e_3():
    for norm in NORMALIZERS:
        inputs = random_gla_inputs(B=2, T=200, H=2, K=64, V=64, gate_normalizer=norm, initial_state=True)
        o_ref, s_ref = reference(inputs)
        for diagonal in ("log_space", "split", "guarded"):
            o, s = two_level_chunk_gla(**inputs, output_final_state=True, matmul_dtype=torch.bfloat16,
                                       diagonal=diagonal)
            assert relative_rmse(o, o_ref) <= 5e-3
            assert relative_rmse(s, s_ref) <= 5e-3
            assert relative_rmse(o, o_ref) > 1e-5  # the bf16 rounding really happened


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["recurrent", "chunk", "two_level", "two_level_guarded"])
def test_half_inputs_accumulate_in_float32(form, dtype):
    inputs = random_gla_inputs(B=1, T=65, H=2, K=16, V=16, gate_normalizer=1.0, dtype=dtype)
    o_ref, _ = reference(inputs)
    o, s = FORMS[form](**inputs, output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert relative_rmse(o, o_ref) <= 5e-3


def test_float64_inputs_stay_float64():
    inputs = random_gla_inputs(B=1, T=40, H=1, K=8, V=8, dtype=torch.float64, initial_state=True)
    o_ref, s_ref = reference(inputs)
    for form in FORMS.values():
        o, s = form(**inputs, output_final_state=True)
        assert o.dtype == torch.float64 and s.dtype == torch.float64
        assert relative_rmse(o, o_ref) <= 1e-12 and relative_rmse(s, s_ref) <= 1e-12


def test_naive_parallel_form_overflows_where_log_space_does_not():
    """Chapter 2's claim: K/B = k·exp(-G) passes float32's e^88 ceiling; the log-space form is exact."""
    inputs = random_gla_inputs(B=1, T=512, H=2, K=16, V=16, gate_normalizer=1.0)  # about -0.8 per step
    assert inputs["g"].sum(1).max() < -88  # the cumulative decay really leaves float32's range
    o_ref, _ = reference(inputs)
    o_naive, _ = parallel_gla(**inputs, log_space=False)
    assert not torch.isfinite(o_naive).all()
    o_log, _ = parallel_gla(**inputs, log_space=True)
    assert relative_rmse(o_log, o_ref) <= 1e-5


def test_naive_parallel_form_fails_sooner_in_float16():
    inputs = random_gla_inputs(B=1, T=64, H=1, K=16, V=16, gate_normalizer=1.0, dtype=torch.float16)
    assert inputs["g"].float().sum(1).min() < -11  # past float16's e^11 ceiling
    o, _ = parallel_gla(**inputs, log_space=False)
    o_ref, _ = reference(inputs)
    assert not torch.isfinite(o).all() or relative_rmse(o, o_ref) > 0.1
    o32, _ = parallel_gla(**{n: t.float() for n, t in inputs.items()}, log_space=False)
    assert relative_rmse(o32, o_ref) <= 1e-4  # the same input in float32 is still fine


def test_naive_parallel_form_is_exact_while_in_range():
    inputs = random_gla_inputs(B=1, T=32, H=2, K=16, V=16, gate_normalizer=16.0, initial_state=True)
    o_ref, s_ref = reference(inputs)
    o, s = parallel_gla(**inputs, log_space=False, output_final_state=True)
    assert relative_rmse(o, o_ref) <= 1e-5 and relative_rmse(s, s_ref) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_empty_sequence_passes_state_through(form):
    inputs = random_gla_inputs(B=2, T=0, H=3, K=8, V=5, initial_state=True)
    o, s = FORMS[form](**inputs, output_final_state=True)
    assert o.shape == (2, 0, 3, 5)
    assert torch.equal(s, inputs["initial_state"])
    o, s = FORMS[form](**{n: t for n, t in inputs.items() if n != "initial_state"}, output_final_state=True)
    assert s.shape == (2, 3, 8, 5) and not s.any()


@pytest.mark.parametrize("form", FORMS)
def test_scale_is_applied_to_q(form):
    inputs = random_gla_inputs(B=1, T=20, H=1, K=8, V=8, initial_state=True)
    o1, _ = FORMS[form](**inputs, scale=0.37)
    o_ref, _ = recurrent_gla(**{n: t.double() for n, t in inputs.items()}, scale=0.37)
    assert relative_rmse(o1, o_ref) <= 1e-5
    o2, _ = FORMS[form](**inputs)
    assert relative_rmse(o2 * 0.37 / 8**-0.5, o_ref) <= 1e-5


@pytest.mark.parametrize("norm", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("with_output_loss", [False, True])
def test_chunk_gate_gradient_when_the_loss_reads_the_final_state(norm, with_output_loss):
    """Regression: with strong gates and a loss on S_T, dg must not be the small difference of two large
    sums (it was 2e-5 to 2e-4 from float64 before the terms were grouped by the pairs spanning t)."""
    inputs = random_gla_inputs(B=1, T=128, H=2, K=32, V=32, gate_normalizer=norm, initial_state=True)
    w_s, w_o = torch.randn(1, 2, 32, 32), torch.randn(1, 128, 2, 32)

    def dg(form, dtype):
        leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in inputs.items()}
        o, s = form(**leaves, output_final_state=True)
        loss = (s * w_s.to(dtype)).sum() + (with_output_loss * (o * w_o.to(dtype))).sum()
        loss.backward()
        return leaves["g"].grad

    ref = dg(recurrent_gla, torch.float64)
    for chunk_size in (16, 64):
        got = dg(lambda chunk_size=chunk_size, **kw: chunk_gla(**kw, chunk_size=chunk_size), torch.float32)
        assert relative_rmse(got, ref) <= 1e-5


# ----------------------------------------------------------------------------- the guarded single product
def gates_with_spans(spans, C=64, H=2, K=16, seed=0, mild_channels=False):
    """g [1, len(spans)·C, H, K] whose chunk n has decay span spans[n] (max over channels of G_first - G_last).

    Random positive shapes per channel; the steepest channel of each chunk and head is scaled to the span.
    With ``mild_channels`` every other channel barely decays, so one chunk holds extreme and mild channels.
    """
    gen = torch.Generator().manual_seed(seed)
    N = len(spans)
    w = torch.rand(1, N, C, H, K, generator=gen, dtype=torch.float64) + 0.05
    if mild_channels:
        w[..., ::2] *= 1e-4
    tail = w[:, :, 1:]  # the first gate of a chunk is not inside its span: leave it random in [-5, 0]
    target = torch.tensor(spans, dtype=torch.float64).view(1, N, 1, 1, 1)
    tail *= target / tail.sum(2, keepdim=True).amax(-1, keepdim=True)
    w[:, :, 0] *= 5
    return (-w).reshape(1, N * C, H, K).float()


def guarded_inputs(spans, seed=0, K=16, V=24, scale_qk=1.0, **kw):
    inputs = random_gla_inputs(B=1, T=64 * len(spans), H=2, K=K, V=V, initial_state=True, seed=seed)
    inputs["g"] = gates_with_spans(spans, H=2, K=K, seed=seed, **kw)
    inputs["q"] = inputs["q"] / scale_qk
    inputs["k"] = inputs["k"] * scale_qk
    return inputs


def chunked(inputs, C=64):
    return [to_chunks(inputs[n], C) for n in ("q", "k", "g")]


@pytest.mark.parametrize("mild_channels", [False, True])
def test_guarded_takes_the_product_under_the_bound_and_falls_back_over_it(mild_channels):
    spans = [0.5, 30.0, 63.0, 65.0, 120.0, 300.0, 10.0, 1000.0]
    inputs = guarded_inputs(spans, mild_channels=mild_channels)
    q, k, g = chunked(inputs)
    P, fast = guarded_scores(q, k, g)
    expect = torch.tensor([s <= GUARD_SPAN[torch.float32] for s in spans])
    assert torch.equal(fast, expect.expand(1, 2, -1))  # per chunk, in both heads
    ref = log_space_scores(q.double(), k.double(), g.double().cumsum(-2))
    assert relative_rmse(P[fast], ref[fast]) <= 1e-6 and relative_rmse(P[~fast], ref[~fast]) <= 1e-6
    o_ref, s_ref = reference(inputs)
    o, s = two_level_chunk_gla(**inputs, diagonal="guarded", output_final_state=True)
    assert relative_rmse(o, o_ref) <= 1e-5 and relative_rmse(s, s_ref) <= 1e-5


def test_guarded_gradients_with_chunks_on_both_paths():
    inputs = guarded_inputs([5.0, 200.0, 60.0, 70.0], K=24, V=16, mild_channels=True, seed=3)
    guarded = functools.partial(two_level_chunk_gla, diagonal="guarded")
    for name, a, b in gradients_vs_float64(guarded, inputs):
        assert torch.isfinite(a).all() and relative_rmse(a, b) <= 1e-5, f"d{name}: {relative_rmse(a, b):.2e}"


def test_forcing_the_product_past_the_bound_breaks_it(monkeypatch):
    """Without the guard a chunk decaying by e^300 gives inf/NaN (factors e^±150); the guarded form is exact."""
    inputs = guarded_inputs([300.0, 2.0])
    q, k, g = chunked(inputs)
    ref = log_space_scores(q.double(), k.double(), g.double().cumsum(-2))
    P, fast = guarded_scores(q, k, g)
    assert fast[0].tolist() == [[False, True]] * 2 and relative_rmse(P, ref) <= 1e-6
    monkeypatch.setitem(GUARD_SPAN, torch.float32, float("inf"))
    P_forced, fast_forced = guarded_scores(q, k, g)
    assert fast_forced.all()
    assert not torch.isfinite(P_forced[..., 0, :, :]).all()  # the over-bound chunk
    assert relative_rmse(P_forced[..., 1, :, :], ref[..., 1, :, :]) <= 1e-6  # the other chunk is unaffected


def test_guard_on_the_size_of_q_and_k(monkeypatch):
    """|k| = 1e30 with |q| = 1e-30 is legal (q·k ~ 1) but k·e^30 overflows float32: that chunk falls back."""
    inputs = guarded_inputs([60.0, 60.0], scale_qk=1e30)
    inputs["k"][:, 64:] /= 1e30  # the second chunk has ordinary keys (and tiny queries)
    q, k, g = chunked(inputs)
    _, fast = guarded_scores(q, k, g)
    assert fast[0].tolist() == [[False, True]] * 2
    o_ref, s_ref = reference(inputs)
    o, s = two_level_chunk_gla(**inputs, diagonal="guarded", output_final_state=True)
    assert relative_rmse(o, o_ref) <= 1e-5 and relative_rmse(s, s_ref) <= 1e-5
    monkeypatch.setitem(GUARD_MAGNITUDE, torch.float32, float("inf"))
    o, _ = two_level_chunk_gla(**inputs, diagonal="guarded")
    assert not torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_guarded_half_precision_products(dtype, monkeypatch):
    """float16 has e^11 of range: its bound is 8 nats; bfloat16 keeps float32's exponent range."""
    spans = [4.0, 12.0, 50.0, 100.0]
    inputs = guarded_inputs(spans, K=64, V=64, seed=5)
    q, k, g = chunked(inputs)
    _, fast = guarded_scores(q, k, g, matmul_dtype=dtype)
    assert fast[0].tolist() == [[s <= GUARD_SPAN[dtype] for s in spans]] * 2
    o_ref, s_ref = reference(inputs)
    o, s = two_level_chunk_gla(**inputs, diagonal="guarded", matmul_dtype=dtype, output_final_state=True)
    assert 1e-5 < relative_rmse(o, o_ref) <= 5e-3 and relative_rmse(s, s_ref) <= 5e-3
    if dtype == torch.float16:  # forced past its bound, the 50-nat chunk (factors e^±25 · |k|) overflows
        monkeypatch.setitem(GUARD_SPAN, dtype, float("inf"))
        P, _ = guarded_scores(q, k, g, matmul_dtype=dtype)
        assert not torch.isfinite(P[..., 2, :, :]).all()
