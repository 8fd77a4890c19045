"""Every claim of chapters 3-5 as a test, and every function they derive inline checked against the library.

The inline functions are the chapters' own code, executed from their notebook cells tagged "derivation";
the notebooks assert the same equalities in a cell.
"""

import json
from pathlib import Path

import pytest
import torch

from glalearn import chunk_gla, costs, recurrent_gla, two_level_chunk_gla
from glalearn.forms.chunk import (
    chunk_local_cumsum,
    chunk_states,
    from_chunks,
    log_space_scores,
    log_space_scores_backward,
    reverse_cumsum,
    to_chunks,
)
from glalearn.forms.two_level import GUARD_SPAN, guarded_scores, split_scores, sub_chunk_scores
from glalearn.gates import decay_mask
from glalearn.numerics import random_gla_inputs, relative_rmse


def f64(inputs):
    return {n: t.double() for n, t in inputs.items()}


CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def _derivations(stem) -> dict:
    """Run a chapter's cells tagged "derivation" (its inline functions, nothing else) in a namespace
    holding the chapter's imports; return the namespace. So these tests check the code a learner reads."""
    import math

    from glalearn.forms import chunk as chunk_module
    from glalearn.forms import two_level as two_level_module

    ns = {"torch": torch, "math": math, **{n: getattr(chunk_module, n) for n in dir(chunk_module) if not n.startswith("__")},
          **{n: getattr(two_level_module, n) for n in dir(two_level_module) if not n.startswith("__")}}
    nb = json.loads((CHAPTERS / f"{stem}.ipynb").read_text())
    cells = [c for c in nb["cells"] if "derivation" in c.get("metadata", {}).get("tags", [])]
    assert cells, f"{stem} has no cells tagged 'derivation'"
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{stem}:derivation", "exec"), ns)  # noqa: S102
    return ns


# ----------------------------------------------------------------------------- chapter 3 (its inline code)
_CH3 = _derivations("03_chunkwise")
chunk_states_by_hand = _CH3["chunk_states_by_hand"]
intra_scores_by_hand = _CH3["intra_scores_by_hand"]


CHUNK_CASES = [(4, 2, 2, 2, 2), (7, 4, 3, 5, 1.0), (33, 8, 4, 2, 0.1), (64, 16, 8, 8, 16.0)]


@pytest.mark.parametrize("T,C,K,V,norm", CHUNK_CASES)
def test_ch3_chunk_states_by_hand_is_the_library(T, C, K, V, norm):
    x = random_gla_inputs(B=2, T=T, H=2, K=K, V=V, gate_normalizer=norm, dtype=torch.float64)
    kc, vc, gc = (to_chunks(x[n], C) for n in ("k", "v", "g"))
    G = chunk_local_cumsum(gc)
    states, final = chunk_states_by_hand(kc, vc, G)
    lib_states, lib_final = chunk_states(kc, vc, G)
    assert torch.allclose(states, lib_states, rtol=0, atol=1e-12)
    assert torch.allclose(final, lib_final, rtol=0, atol=1e-12)
    # the state entering chunk n is the recurrence's state after n·C tokens
    for n in range(1, kc.shape[2]):
        _, S = recurrent_gla(*(x[m][:, : n * C] for m in ("q", "k", "v", "g")), output_final_state=True)
        assert torch.allclose(states[:, :, n], S, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,C,K,V,norm", CHUNK_CASES)
def test_ch3_intra_scores_by_hand_is_log_space_scores(T, C, K, V, norm):
    x = random_gla_inputs(B=1, T=T, H=2, K=K, V=V, gate_normalizer=norm, dtype=torch.float64)
    qc, kc, gc = (to_chunks(x[n], C) for n in ("q", "k", "g"))
    G = chunk_local_cumsum(gc)
    assert torch.allclose(intra_scores_by_hand(qc, kc, G), log_space_scores(qc, kc, G), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,C,K,V,norm", CHUNK_CASES)
def test_ch3_inter_plus_intra_is_the_recurrence(T, C, K, V, norm):
    x = random_gla_inputs(B=1, T=T, H=2, K=K, V=V, gate_normalizer=norm, dtype=torch.float64)
    qc, kc, vc, gc = (to_chunks(x[n], C) for n in ("q", "k", "v", "g"))
    G = chunk_local_cumsum(gc)
    states, _ = chunk_states_by_hand(kc, vc, G)
    scale = K ** -0.5
    o = from_chunks(scale * (qc * G.exp()) @ states + scale * intra_scores_by_hand(qc, kc, G) @ vc, T)
    o_rec, _ = recurrent_gla(**x)
    assert torch.allclose(o, o_rec, rtol=0, atol=1e-12)
    assert torch.allclose(chunk_gla(**x, chunk_size=C)[0], o_rec, rtol=0, atol=1e-12)


def test_ch3_attention_matrix_splits_into_inter_and_intra():
    """(A ⊙ intra mask) V is the intra-chunk output and (A ⊙ inter mask) V the inter-chunk output."""
    T, C, K, V = 16, 4, 8, 8
    y = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, gate_normalizer=1.0, dtype=torch.float64)
    scale = K ** -0.5
    A = scale * torch.einsum("tk,sk,tsk->ts", y["q"][0, :, 0], y["k"][0, :, 0], decay_mask(y["g"][0, :, 0]))
    chunk_of = torch.arange(T) // C
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    intra_mask = causal & (chunk_of[:, None] == chunk_of[None, :])
    inter_mask = causal & (chunk_of[:, None] > chunk_of[None, :])
    yc = {n: to_chunks(t, C) for n, t in y.items()}
    G = chunk_local_cumsum(yc["g"])
    S, _ = chunk_states(yc["k"], yc["v"], G)
    inter = from_chunks(scale * (yc["q"] * G.exp()) @ S, T)[0, :, 0]
    intra = from_chunks(scale * log_space_scores(yc["q"], yc["k"], G) @ yc["v"], T)[0, :, 0]
    v = y["v"][0, :, 0]
    assert torch.allclose((A * intra_mask) @ v, intra, rtol=0, atol=1e-12)
    assert torch.allclose((A * inter_mask) @ v, inter, rtol=0, atol=1e-12)
    assert int(intra_mask.sum()) == (T // C) * C * (C + 1) // 2


@pytest.mark.parametrize("norm", [16.0, 1.0, 0.1])
@pytest.mark.parametrize("C", [16, 64])
def test_ch3_float32_chunk_form_matches_float64_recurrence(norm, C):
    z = random_gla_inputs(B=1, T=300, H=2, K=32, V=32, gate_normalizer=norm, initial_state=True)
    o_ref, s_ref = recurrent_gla(**f64(z), output_final_state=True)
    o, s = chunk_gla(**z, chunk_size=C, output_final_state=True)
    assert relative_rmse(o, o_ref) <= 1e-6 and relative_rmse(s, s_ref) <= 1e-6


def test_ch3_cost_sweep_claims():
    """Up to C = 64 the steps fall 64-fold for about a third more work; beyond, the C-terms dominate."""
    T, K, V = 4096, 64, 64
    c1, c64, c256 = (costs.chunk_cost(T, K, V, C) for C in (1, 64, 256))
    assert c1.sequential_steps == 64 * c64.sequential_steps
    assert 1.0 < c64.flops / c1.flops < 1.4
    assert 8 < c64.exps / c1.exps < 10  # the exps feel C first: ~1 M at C = 1, ~9 M at C = 64
    assert c256.flops > 2 * c64.flops and c256.exps > 3 * c64.exps
    # the exps of the log-space scores at C = 64: about C/2·K per token
    assert abs(costs.log_space_scores_cost(64, K).exps / 64 - 64 / 2 * K) / (32 * K) < 0.05


# ----------------------------------------------------------------------------- chapter 4 (its inline code)
_CH4 = _derivations("04_secondary_chunking")
sub_chunk_scores_by_hand = _CH4["sub_chunk_scores_by_hand"]
naive_scores = _CH4["naive_scores"]
guarded_scores_by_hand = _CH4["guarded_scores_by_hand"]


def _chunk_inputs(T, C, K, norm, dtype=torch.float32, H=2):
    z = random_gla_inputs(B=1, T=T, H=H, K=K, V=K, gate_normalizer=norm, dtype=dtype)
    qc, kc, gc = (to_chunks(z[n], C) for n in ("q", "k", "g"))
    return qc, kc, gc, chunk_local_cumsum(gc)


@pytest.mark.parametrize("C,L", [(2, 1), (8, 2), (16, 4), (64, 16), (64, 64)])
@pytest.mark.parametrize("norm", [16.0, 0.1])
def test_ch4_sub_chunk_scores_by_hand_is_the_library(C, L, norm):
    qc, kc, gc, G = _chunk_inputs(2 * C, C, 8, norm, torch.float64)
    mine = sub_chunk_scores_by_hand(qc, kc, G, L)
    assert torch.allclose(mine, sub_chunk_scores(qc, kc, gc, L), rtol=0, atol=1e-12)
    assert torch.allclose(mine, log_space_scores(qc, kc, G), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(None, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)])
def test_ch4_by_hand_and_library_agree_in_low_precision(dtype, tol):
    qc, kc, gc, G = _chunk_inputs(256, 64, 32, 1.0)
    ref = log_space_scores(qc.double(), kc.double(), G)
    mine, lib = sub_chunk_scores_by_hand(qc, kc, G, 16, dtype), sub_chunk_scores(qc, kc, gc, 16, dtype)
    assert relative_rmse(mine, ref) <= tol and relative_rmse(lib, ref) <= tol
    assert relative_rmse(mine, lib) <= 1e-5


def test_ch4_reference_point_bounds_both_factors():
    """With r the first row of the query sub-chunk, every factor exp(G_i - G_r), exp(G_r - G_j) is <= 1."""
    C, L = 64, 16
    _, _, _, G = _chunk_inputs(64, C, 16, 0.1)
    for a in range(C // L):
        ref = G[..., a * L : a * L + 1, :]
        assert ((G[..., a * L : (a + 1) * L, :] - ref) <= 0).all()  # queries of sub-chunk a
        assert ((ref - G[..., : a * L, :]) <= 0).all()  # keys of earlier sub-chunks


def test_ch4_naive_reference_overflows_where_bounded_does_not():
    # float16 overflows past e^11: a 64-token chunk at normalizer 4 decays by about e^15
    qc, kc, gc, G = _chunk_inputs(64, 64, 16, 4.0, H=4)
    assert not torch.isfinite(naive_scores(qc, kc, G, torch.float16)).all()
    # every dtype breaks at normalizer 0.5 (G ~ -120: exp(-G) > float32's e^88.7)
    qc2, kc2, _, G2 = _chunk_inputs(64, 64, 16, 0.5, H=4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert not torch.isfinite(naive_scores(qc2, kc2, G2, dtype)).all()
    for norm in (32.0, 4.0, 0.5, 0.1):
        qc, kc, gc, G = _chunk_inputs(64, 64, 16, norm, H=4)
        ref = log_space_scores(qc.double(), kc.double(), G)
        for dtype, tol in ((torch.float16, 5e-4), (torch.bfloat16, 4e-3), (torch.float32, 1e-6)):
            P = sub_chunk_scores(qc, kc, gc, 16, dtype)
            assert torch.isfinite(P).all() and relative_rmse(P, ref) <= tol
    # while the gates are gentle, the naive product is as accurate as the bounded one
    qc, kc, gc, G = _chunk_inputs(64, 64, 16, 32.0, H=4)
    ref = log_space_scores(qc.double(), kc.double(), G)
    assert relative_rmse(naive_scores(qc, kc, G, torch.float32), ref) <= 1e-6


@pytest.mark.parametrize("L", [1, 4, 16, 64])
def test_ch4_error_vs_matmul_dtype_and_sub_chunk_size(L):
    w = random_gla_inputs(B=1, T=128, H=1, K=64, V=64, gate_normalizer=1.0)
    o_ref, _ = recurrent_gla(**f64(w))
    for dtype, tol in ((None, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)):
        o, _ = two_level_chunk_gla(**w, chunk_size=64, sub_chunk_size=L, matmul_dtype=dtype)
        assert relative_rmse(o, o_ref) <= tol


def test_ch4_scores_error_grows_as_sub_chunks_shrink():
    """At L = C the scores are all float32 log space; smaller L puts more of P into bf16 products."""
    qc, kc, gc, G = _chunk_inputs(128, 64, 64, 1.0, H=1)
    ref = log_space_scores(qc.double(), kc.double(), G)
    errs = [relative_rmse(sub_chunk_scores(qc, kc, gc, L, torch.bfloat16), ref) for L in (1, 4, 16, 64)]
    assert errs[-1] <= 1e-6 and errs[0] > errs[1] > errs[2] > errs[3] and errs[0] <= 4e-3


def test_ch4_split_and_cost_claims():
    qc, kc, _, G = _chunk_inputs(64, 16, 16, 0.5, torch.float64)
    assert torch.allclose(split_scores(qc, kc, G), log_space_scores(qc, kc, G), rtol=0, atol=1e-12)
    base = costs.chunk_cost(4096, 64, 64, 64)
    two = {L: costs.two_level_cost(4096, 64, 64, 64, L) for L in (1, 4, 8, 16, 32, 64)}
    assert 2.5 < base.exps / two[16].exps < 3.0 and two[16].matmul_flops / two[16].flops > 0.9
    assert min(two, key=lambda L: two[L].exps) in (4, 8) and two[1].exps > base.exps


def _mixed_gate_chunks(dtype=torch.float32, seed=11):
    # the chapter's eight chunks: gates from gentle to very strong, spans under and far over the bound
    gates = torch.cat([random_gla_inputs(B=1, T=64, H=2, K=16, V=16, gate_normalizer=n, seed=seed)["g"]
                       for n in (16.0, 4.0, 1.0, 1.5, 0.5, 2.0, 0.1, 0.03)], dim=1)
    z = random_gla_inputs(B=1, T=512, H=2, K=16, V=16, seed=seed + 1)
    qc, kc, gc = (to_chunks(t.to(dtype), 64) for t in (z["q"], z["k"], gates))
    return qc, kc, gc, chunk_local_cumsum(gc)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_ch4_guarded_scores_by_hand_is_the_library(dtype, tol):
    qc, kc, gc, G = _mixed_gate_chunks(dtype)
    mine, fast = guarded_scores_by_hand(qc, kc, G)
    lib, lib_fast = guarded_scores(qc, kc, gc)
    assert torch.equal(fast, lib_fast) and fast.any() and not fast.all()  # both paths are exercised
    assert torch.equal(sub_chunk_scores(qc, kc, gc, 16, diagonal="guarded"), lib)
    ref = log_space_scores(qc.double(), kc.double(), G)
    assert relative_rmse(mine, lib) <= tol and relative_rmse(mine, ref) <= tol and relative_rmse(lib, ref) <= tol


def test_ch4_guard_claims():
    qc, kc, gc, G = _mixed_gate_chunks()
    span = (G[..., 0, :] - G[..., -1, :]).amax(-1)
    _, fast = guarded_scores(qc, kc, gc)
    assert torch.equal(fast, span <= GUARD_SPAN[torch.float32])
    # |G_i - c| <= s/2 with c the midpoint: every factor of an under-bound chunk lies in [e^-32, e^32]
    e = G - (G[..., :1, :] + G[..., -1:, :]) / 2
    assert (e.abs().amax((-2, -1)) <= span / 2 + 1e-9).all()
    # forced past the bound the single product is NaN for the strongest chunks, and only for those
    forced, _ = guarded_scores_by_hand(qc, kc, G, bound=float("inf"))
    broken = ~torch.isfinite(forced).all(-1).all(-1)
    assert broken.any() and (span[broken] > 300).all()


# ----------------------------------------------------------------------------- chapter 5 (its inline code)
_CH5 = _derivations("05_backward")
reverse_cumsum_by_hand = _CH5["reverse_cumsum_by_hand"]
saved_numbers = _CH5["saved_numbers"]


def test_ch5_reverse_cumsum_by_hand_is_the_library():
    x = torch.randn(9, 3, dtype=torch.float64)
    assert torch.allclose(reverse_cumsum_by_hand(x), reverse_cumsum(x, dim=0), rtol=0, atol=1e-12)
    y = torch.randn(2, 7, 4)
    assert torch.allclose(reverse_cumsum(y, dim=1), y.flip(1).cumsum(1).flip(1))


@pytest.mark.parametrize("T,K,V,norm", [(4, 2, 2, 1.0), (37, 5, 3, 0.1), (64, 8, 8, 16.0)])
def test_ch5_gate_gradient_trick_is_autograd(T, K, V, norm):
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, gate_normalizer=norm, dtype=torch.float64)
    w = torch.randn(1, T, 1, V, dtype=torch.float64)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    (recurrent_gla(**leaves)[0] * w).sum().backward()
    q, k = x["q"][0, :, 0], x["k"][0, :, 0]
    dq, dk, dg = (leaves[n].grad[0, :, 0] for n in ("q", "k", "g"))
    d_log_b = q * dq - k * dk
    assert torch.allclose(reverse_cumsum_by_hand(d_log_b), dg, rtol=0, atol=1e-10)
    assert (reverse_cumsum(-d_log_b, 0) - dg).abs().max() > 1e-3  # the appendix's sign is wrong
    # the middle step alone: ∂ℓ/∂G from the log-space parallel form
    G = x["g"][0, :, 0].cumsum(0).clone().requires_grad_()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    decay = (G[:, None, :] - G[None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()
    A = K ** -0.5 * torch.einsum("tk,sk,tsk->ts", q, k, decay)
    (A @ x["v"][0, :, 0] * w[0, :, 0]).sum().backward()
    assert torch.allclose(G.grad, d_log_b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("T,C,with_state", [(7, 4, True), (8, 2, False), (5, 8, True)])
def test_ch5_gradcheck_chunk_gla(T, C, with_state):
    x = random_gla_inputs(B=1, T=T, H=2, K=3, V=2, gate_normalizer=1.0, dtype=torch.float64, initial_state=with_state)
    names = ["q", "k", "v", "g"] + (["initial_state"] if with_state else [])
    args = tuple(x[n].clone().requires_grad_() for n in names)

    def form(*a):
        kw = dict(zip(names, a))
        return chunk_gla(**kw, output_final_state=True, chunk_size=C)

    assert torch.autograd.gradcheck(form, args)


@pytest.mark.parametrize("norm", [16.0, 0.1])
def test_ch5_float32_gradients_match_float64_recurrence(norm):
    z = random_gla_inputs(B=1, T=200, H=2, K=32, V=32, gate_normalizer=norm, initial_state=True)
    w_o, w_s = torch.randn(1, 200, 2, 32), torch.randn(1, 2, 32, 32)
    grads = {}
    for name, form, dtype in (("ref", recurrent_gla, torch.float64), ("chunk", chunk_gla, torch.float32)):
        leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in z.items()}
        o, s = form(**leaves, output_final_state=True)
        ((o * w_o.to(dtype)).sum() + (s * w_s.to(dtype)).sum()).backward()
        grads[name] = {n: t.grad for n, t in leaves.items()}
    for n in ("q", "k", "v", "g", "initial_state"):
        assert relative_rmse(grads["chunk"][n], grads["ref"][n]) <= 1e-5


@pytest.mark.parametrize("T", [64, 256])
def test_ch5_memory_accounting(T):
    K = V = 32
    m = random_gla_inputs(B=1, T=T, H=1, K=K, V=V)
    inputs = T * (3 * K + V)
    assert saved_numbers(recurrent_gla, m) >= costs.state_memory(T, K, V)
    assert inputs <= saved_numbers(chunk_gla, m) <= inputs + 16
    assert costs.state_memory(T, K, V, chunk_size=64) == -(-T // 64) * K * V


def test_ch5_diagonal_pairs_kept_apart_help_strong_gates():
    C, K = 64, 32
    q, k, dP = torch.randn(C, K), torch.randn(C, K), torch.randn(C, C)
    G = (torch.nn.functional.logsigmoid(torch.randn(C, K)) / 0.1).double().cumsum(0)
    G_ref, G_lib = G.clone().requires_grad_(), G.clone().requires_grad_()
    (log_space_scores(q.double(), k.double(), G_ref) * dP.double()).sum().backward()
    (log_space_scores(q, k, G_lib) * dP).sum().backward()
    dq, dk = log_space_scores_backward(dP.tril(), q, k, G)
    lib, textbook = relative_rmse(G_lib.grad, G_ref.grad), relative_rmse(q * dq - k * dk, G_ref.grad)
    assert lib <= 3e-7 and textbook > 3 * lib


def test_ch5_per_chunk_sum_beats_one_long_reverse_sum():
    T, K, V = 1024, 32, 32
    z = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, gate_normalizer=0.1)
    w = torch.randn(1, T, 1, V)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in z.items()}
        (chunk_gla(**leaves)[0] * w.to(dtype)).sum().backward()
        grads[dtype] = {n: t.grad for n, t in leaves.items()}
    g32, ref = grads[torch.float32], grads[torch.float64]["g"]
    textbook = reverse_cumsum(z["q"] * g32["q"] - z["k"] * g32["k"], dim=1)
    lib = relative_rmse(g32["g"], ref)
    assert lib <= 2e-6 and relative_rmse(textbook, ref) > 5 * lib
