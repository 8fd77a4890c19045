"""flash_gla compiled on a CUDA GPU in bf16 (DESIGN.md §2): o within 5e-3, gradients within 1e-2 of
float64, no NaN/inf for extreme gates, T = 65,536 and odd head sizes, through both backwards (the
``backward`` fixture: sequential, the default, and segmented). Skipped without CUDA.

The reference is the float64 chunk form (itself checked against the float64 recurrence to 1e-5 in
tests/test_forms.py) on the same bf16-rounded inputs; for small T the recurrence itself.
"""

import os

import pytest
import torch

from glalearn import chunk_gla, recurrent_gla
from glalearn.numerics import random_gla_inputs, relative_rmse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs a CUDA GPU and compiled (not interpreted) Triton",
    ),
]

O_TOL, GRAD_TOL = 5e-3, 1e-2


def _run(inputs, materialize, with_grads=True):
    """flash_gla on bf16 inputs and the float64 reference on the same rounded values."""
    from glalearn import flash_gla

    x = {n: t.detach().clone().requires_grad_(with_grads) for n, t in inputs.items()}
    o, s = flash_gla(**x, output_final_state=True, materialize=materialize)
    x64 = {n: t.detach().double().requires_grad_(with_grads) for n, t in inputs.items()}
    T = inputs["q"].shape[1]
    form = recurrent_gla if T <= 256 else chunk_gla
    o_ref, s_ref = form(**x64, output_final_state=True)
    grads = {}
    if with_grads:
        do = torch.randn_like(o_ref)
        ds = torch.randn_like(s_ref)
        ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
        ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
        grads = {n: (x[n].grad, x64[n].grad) for n in x}
    return (o, o_ref), (s, s_ref), grads


@pytest.fixture(params=["sequential", "segmented"])
def backward(request, flash_config):
    """Each test that takes it runs through both backwards (CONFIG["bwd_segmented"] False and True)."""
    flash_config["bwd_segmented"] = request.param == "segmented"
    return request.param


def _bf16_inputs(B, T, H, K, V, seed, norm=16.0, initial_state=True):
    inputs = random_gla_inputs(B=B, T=T, H=H, K=K, V=V, gate_normalizer=norm, seed=seed,
                               initial_state=initial_state, device="cuda")
    for n in ("q", "k", "v", "g"):
        inputs[n] = inputs[n].to(torch.bfloat16)
    return inputs


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("T,K,V,norm", [(1, 16, 16, 16.0), (63, 64, 64, 1.0), (200, 60, 100, 16.0),
                                        (1000, 128, 128, 16.0), (1000, 100, 60, 0.1), (4100, 64, 64, 16.0),
                                        (300, 32, 32, 1.0)])
def test_bf16_matches_float64(backward, materialize, T, K, V, norm):
    inputs = _bf16_inputs(2, T, 3, K, V, seed=T + K, norm=norm)
    (o, o_ref), (s, s_ref), grads = _run(inputs, materialize)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert relative_rmse(o, o_ref) <= O_TOL
    assert relative_rmse(s, s_ref) <= O_TOL
    for name, (got, ref) in grads.items():
        assert got is not None and torch.isfinite(got).all(), name
        assert relative_rmse(got, ref) <= GRAD_TOL, (name, relative_rmse(got, ref))


@pytest.mark.parametrize("initial_state", [True, False])
@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("K,V", [(60, 60), (100, 100)])
def test_strong_gates_long_sequence_odd_heads(backward, materialize, K, V, initial_state):
    """g = -30 per step, T = 65,536 (B = 1), K = V = 60 and 100, with and without S_0: finite, and right."""
    inputs = _bf16_inputs(1, 65536, 2, K, V, seed=K, initial_state=initial_state)
    inputs["g"][:, : 65536 // 2] = -30.0  # the first half forgets everything at every step
    (o, o_ref), (s, s_ref), grads = _run(inputs, materialize)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relative_rmse(o, o_ref) <= O_TOL and relative_rmse(s, s_ref) <= O_TOL
    for name, (got, ref) in grads.items():
        assert torch.isfinite(got).all(), name
        assert relative_rmse(got, ref) <= GRAD_TOL, (name, relative_rmse(got, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(backward, dtype):
    inputs = random_gla_inputs(B=2, T=300, H=2, K=64, V=64, seed=7, initial_state=True, device="cuda")
    for n in ("q", "k", "v", "g"):
        inputs[n] = inputs[n].to(dtype)
    (o, o_ref), (s, s_ref), grads = _run(inputs, True)
    tol = 1e-4 if dtype == torch.float32 else O_TOL
    assert o.dtype == dtype
    assert relative_rmse(o, o_ref) <= tol and relative_rmse(s, s_ref) <= tol
    for name, (got, ref) in grads.items():
        assert relative_rmse(got, ref) <= (1e-4 if dtype == torch.float32 else GRAD_TOL), name


def test_output_fully_written():
    """Poisoned buffers: every element of o is written (compare two different input sets)."""
    from glalearn import flash_gla

    a = _bf16_inputs(3, 777, 2, 64, 64, seed=1, initial_state=False)
    b = _bf16_inputs(3, 777, 2, 64, 64, seed=2, initial_state=False)
    o1, _ = flash_gla(**a)
    o2, _ = flash_gla(**b)
    o1_again, _ = flash_gla(**a)
    assert torch.isfinite(o1).all() and not torch.equal(o1, o2)
    assert torch.equal(o1, o1_again)  # deterministic: no race between programs


def _mixed_bf16_inputs(T, K, V, seed):
    """Mild gates, a stretch of g = -30 that starts and ends inside chunks, and a stretch where three
    channels decay hard: chunks of every kind for the flagged launches."""
    inputs = _bf16_inputs(2, T, 3, K, V, seed=seed, norm=16.0)
    inputs["g"][:, T // 4 + 10 : T // 2 + 30] = -30.0
    inputs["g"][:, T // 2 + 100 : T // 2 + 300, :, :3] = -2.0
    return inputs


@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (100, 60)])
def test_mixed_gates_bf16(backward, K, V):
    (o, o_ref), (s, s_ref), grads = _run(_mixed_bf16_inputs(1000, K, V, seed=K + V), True)
    assert relative_rmse(o, o_ref) <= O_TOL and relative_rmse(s, s_ref) <= O_TOL
    for name, (got, ref) in grads.items():
        assert torch.isfinite(got).all(), name
        assert relative_rmse(got, ref) <= GRAD_TOL, (name, relative_rmse(got, ref))


@pytest.mark.parametrize("K,V,T,norm", [(64, 64, 2048, 16.0), (128, 128, 1024, 1.0), (60, 100, 777, 0.1)])
def test_segmented_backward_matches_the_sequential_one(flash_config, K, V, T, norm):
    """The segmented backward (CONFIG["bwd_segmented"] = True) and the sequential one (False, the
    default), bf16, same inputs: both within the tolerances of float64, and close to each other."""
    inputs = _bf16_inputs(2, T, 4, K, V, seed=T + K, norm=norm)
    flash_config["bwd_segmented"] = True
    torch.manual_seed(0)
    new = _run(inputs, True)
    flash_config["bwd_segmented"] = False
    torch.manual_seed(0)
    old = _run(inputs, True)
    for name in new[2]:
        (got, ref), (got_old, _) = new[2][name], old[2][name]
        assert relative_rmse(got, ref) <= GRAD_TOL, (name, relative_rmse(got, ref))
        assert relative_rmse(got_old, ref) <= GRAD_TOL, (name, relative_rmse(got_old, ref))
        assert relative_rmse(got, got_old) <= GRAD_TOL, (name, relative_rmse(got, got_old))


def test_benchmark_layout_runs_clean_and_deterministic():
    """The layout of the script that once faulted (kernels/NOTES.md, "Open bug"): the inputs of the three
    benchmark shapes (P1 T=16384, P1 T=4096, P2 T=16384) allocated before the first launch, then forward
    and backward of each, both strategies, today's launches and the v3 ones of that run: every result
    finite, and bitwise the same when repeated. (``python -m glalearn.bench kernels --layout-check`` runs
    the same under compute-sanitizer.)"""
    from glalearn.bench_kernels import LAYOUT_VARIANTS, layout_check

    first = layout_check(shapes="benchmark", repeats=2, variants=LAYOUT_VARIANTS)
    assert first and all(r["finite"] and r["repeatable"] for r in first), first
