"""The Triton kernels (glalearn.flash_gla) in Triton's interpreter on the CPU, float32, against the
float64 recurrence (relative RMSE <= 1e-4, DESIGN.md §2): forward and backward, both strategies,
awkward T, K, V, initial and final state, extreme gates, clear errors. Small sizes: the interpreter
runs every program in Python.
"""

import os

import pytest
import torch

from glalearn import recurrent_gla
from glalearn.numerics import random_gla_inputs, relative_rmse

TOL = 1e-4

# (B, T, H, K, V, materialize, initial_state, gate normalizer, chunk_size)
CASES = [
    (2, 1, 1, 16, 16, True, True, 16.0, 64),
    (1, 1, 2, 60, 60, False, False, 1.0, 64),
    (1, 63, 1, 16, 60, True, False, 0.1, 64),
    (1, 63, 1, 60, 16, False, True, 16.0, 64),
    (1, 130, 1, 16, 16, False, True, 1.0, 64),
    (1, 130, 1, 60, 16, True, True, 16.0, 64),
    (1, 130, 1, 16, 60, True, False, 1.0, 16),
]


def _check_against_reference(B, T, H, K, V, materialize, initial_state, norm, chunk_size, seed):
    from glalearn import flash_gla

    inputs = random_gla_inputs(B=B, T=T, H=H, K=K, V=V, gate_normalizer=norm, seed=seed,
                               initial_state=initial_state)
    x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, s = flash_gla(**x, output_final_state=True, materialize=materialize, chunk_size=chunk_size)
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    o_ref, s_ref = recurrent_gla(**x64, output_final_state=True)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert relative_rmse(o, o_ref) <= TOL
    assert relative_rmse(s, s_ref) <= TOL
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    for name, leaf in x.items():
        got, ref = leaf.grad, x64[name].grad
        assert got is not None and torch.isfinite(got).all(), name
        if ref.norm() > 0:
            assert relative_rmse(got, ref) <= TOL, (name, relative_rmse(got, ref))
        else:  # T = 1 without a state: g cannot matter; what is left is rounding of cancelling terms
            assert got.abs().max() <= TOL * x["k"].grad.abs().max(), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-K{}-V{}-mat{}-h0{}-n{}-C{}".format(*c))
def test_matches_float64_recurrence(case):
    _check_against_reference(*case, seed=sum(case[:5]))


@pytest.mark.parametrize("materialize", [True, False])
def test_extreme_gates_stay_finite_and_exact(materialize):
    """g = -30 per step: every exp(G_i - G_j) underflows to 0 off the diagonal; no NaN from 0 * inf."""
    from glalearn import flash_gla

    inputs = random_gla_inputs(B=1, T=70, H=1, K=16, V=16, seed=3, initial_state=True)
    inputs["g"] = torch.full_like(inputs["g"], -30.0)
    x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, s = flash_gla(**x, output_final_state=True, materialize=materialize)
    o_ref, s_ref = recurrent_gla(**{n: t.double() for n, t in inputs.items()}, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relative_rmse(o, o_ref) <= TOL and relative_rmse(s, s_ref) <= TOL
    (o.sum() + s.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in x.values())


def test_empty_sequence_passes_state_through():
    from glalearn import flash_gla

    inputs = random_gla_inputs(B=1, T=0, H=1, K=16, V=16, seed=1, initial_state=True)
    o, s = flash_gla(**inputs, output_final_state=True)
    assert o.shape == (1, 0, 1, 16) and torch.equal(s, inputs["initial_state"])


def test_bad_input_gets_clear_errors():
    from glalearn import flash_gla

    x = random_gla_inputs(B=1, T=8, H=1, K=16, V=16, seed=2)
    with pytest.raises(ValueError, match="chunk_size"):
        flash_gla(**x, chunk_size=24)
    with pytest.raises(ValueError, match="chunk_size"):
        flash_gla(**x, chunk_size=256)
    with pytest.raises(TypeError, match="float64"):
        flash_gla(**{n: t.double() for n, t in x.items()})
    with pytest.raises(ValueError, match="g is the log"):
        flash_gla(x["q"], x["k"], x["v"], -x["g"] + 0.5)
    with pytest.raises(ValueError, match="v must be"):
        flash_gla(x["q"], x["k"], x["v"][:, :4], x["g"])
    with pytest.raises(TypeError, match="materialize"):
        flash_gla(**x, materialize="yes")


def test_cpu_without_interpreter_says_how_to_run(monkeypatch):
    from glalearn import flash

    monkeypatch.setattr(flash, "interpreter_active", lambda: False)
    x = random_gla_inputs(B=1, T=8, H=1, K=16, V=16, seed=4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        flash.flash_gla(**x)
    assert "CUDA" in str(info.value)


def test_interpreter_is_on_in_ci():
    from glalearn import flash

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert flash.interpreter_active()


@pytest.mark.parametrize("materialize", [True, False])
def test_secondary_path_alone_is_exact(flash_config, materialize):
    """span_max = -1 sends every chunk down the secondary-level path: still exact, mild gates too."""
    flash_config["span_max"] = -1.0
    _check_against_reference(1, 130, 1, 16, 60, materialize, True, 16.0, 64, seed=11)
    _check_against_reference(1, 63, 2, 60, 16, materialize, False, 1.0, 32, seed=12)


def test_non_materialized_forward_in_narrower_value_blocks(flash_config, monkeypatch):
    """CONFIG["fused_bv"] splits the value width of the non-materialized forward over more programs,
    each holding a [K, fused_bv] state: exact for V not a multiple of the block, with and without S_0."""
    from glalearn.kernels import fused_forward

    grids, kernel = [], fused_forward.fused_forward_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fused_forward, "fused_forward_kernel", Spy())
    flash_config["fused_bv"] = 16
    _check_against_reference(1, 130, 1, 16, 60, False, True, 1.0, 64, seed=21)
    _check_against_reference(2, 63, 1, 60, 20, False, False, 16.0, 32, seed=22)
    assert grids == [(4, 1), (2, 2)]  # ceil(V / 16) value blocks per head


def _mixed_gates(seed):
    """Chunks of mild gates (span << 40), chunks of g = -30 (span >> 40), and a chunk where a few
    channels decay hard while the rest barely decay."""
    inputs = random_gla_inputs(B=1, T=200, H=1, K=16, V=16, gate_normalizer=16.0, seed=seed, initial_state=True)
    g = inputs["g"]
    g[:, 64:128] = -30.0
    g[:, 128:192, :, :3] = -2.0
    return inputs


@pytest.mark.parametrize("materialize", [True, False])
def test_guard_takes_the_product_only_where_it_is_safe(flash_config, materialize):
    """The guarded kernel is exact on mixed chunks; forcing the single product everywhere is not
    (the key factors exp(-G) overflow in the strongly decaying chunks), which shows the guard at work."""
    from glalearn import flash_gla

    inputs = _mixed_gates(seed=5)
    ref, _ = recurrent_gla(**{n: t.double() for n, t in inputs.items()})
    o, _ = flash_gla(**inputs, materialize=materialize)
    assert relative_rmse(o, ref) <= TOL
    flash_config["span_max"] = 1e30  # no guard: every chunk takes the product
    o_unguarded, _ = flash_gla(**inputs, materialize=materialize)
    assert not torch.isfinite(o_unguarded).all() or relative_rmse(o_unguarded, ref) > 1e-2
    # and the product alone is right where the span is small: the first chunk only has mild gates
    assert relative_rmse(o_unguarded[:, :64], ref[:, :64]) <= TOL


def test_mixed_gates_gradients():
    _inputs = _mixed_gates(seed=6)
    from glalearn import flash_gla

    x = {n: t.clone().requires_grad_() for n, t in _inputs.items()}
    o, s = flash_gla(**x, output_final_state=True)
    x64 = {n: t.double().requires_grad_() for n, t in _inputs.items()}
    o_ref, s_ref = recurrent_gla(**x64, output_final_state=True)
    assert relative_rmse(o, o_ref) <= TOL and relative_rmse(s, s_ref) <= TOL
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    for name, leaf in x.items():
        err = relative_rmse(leaf.grad, x64[name].grad)
        assert err <= TOL, (name, err)


@pytest.mark.parametrize("segmented", [False, True])
def test_bf16_operands_in_the_interpreter(flash_config, segmented):
    """precision="bf16" rounds the products' operands to bfloat16: bf16 inputs stay within the
    GPU tolerances of DESIGN.md §2 (o 5e-3, gradients 1e-2), through both backwards."""
    from glalearn import flash_gla

    flash_config.update(precision="bf16", bwd_precision="bf16", bwd_state_precision="bf16", bwd_segmented=segmented)
    inputs = random_gla_inputs(B=1, T=130, H=2, K=32, V=32, seed=9, initial_state=True)
    for n in ("q", "k", "v", "g"):
        inputs[n] = inputs[n].to(torch.bfloat16)
    x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, _ = flash_gla(**x)
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    o_ref, _ = recurrent_gla(**x64)
    assert o.dtype == torch.bfloat16 and relative_rmse(o, o_ref) <= 5e-3
    do = torch.randn_like(o_ref)
    (o.double() * do).sum().backward()
    (o_ref * do).sum().backward()
    for name, leaf in x.items():
        assert relative_rmse(leaf.grad, x64[name].grad) <= 1e-2, name


@pytest.mark.parametrize("programs, seg, forward_cumsum", [(0, None, True), (1, 9, False), (20, 2, True),
                                                           (20, 2, False), (10**6, 1, False)])
def test_segmented_state_pass(flash_config, programs, seg, forward_cumsum):
    """CONFIG["segment_programs"] cuts the materialized forward's sequential state pass into segments
    walked at once from a zero state and joined by a walk over the segments (kernels/chunk_state.py):
    exact for one segment (the whole sequence), for segments of two chunks with a shorter last one, and
    for one chunk per segment; with and without S_0; gates scanned inside the kernels or by the cumsum
    kernel first. 0 selects the single sequential pass (chunk_state_kernel)."""
    from glalearn import flash

    flash_config.update(segment_programs=programs, forward_cumsum=forward_cumsum, segment_bk=32, segment_bv=32)
    # T = 130, C = 16: N = 9 chunks; B = 1, H = 2, K = 60, V = 20 in 32 x 32 state blocks: 4 blocks
    if programs:
        assert flash.segment_length(1, 2, 60, 20, 9, 32, 32) == seg
    _check_against_reference(1, 130, 2, 60, 20, True, True, 1.0, 16, seed=31)
    _check_against_reference(1, 130, 2, 60, 20, True, False, 16.0, 16, seed=32)


def _check_gradients(B, T, H, K, V, h0, norm, C, seed, final_grad=True, inputs=None):
    """flash_gla's gradients (and o, S_T) against the float64 recurrence; final_grad=False leaves the
    final state out of the loss (no gradient reaches it)."""
    from glalearn import flash_gla

    if inputs is None:
        inputs = random_gla_inputs(B=B, T=T, H=H, K=K, V=V, gate_normalizer=norm, seed=seed, initial_state=h0)
    x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, s = flash_gla(**x, output_final_state=True, chunk_size=C)
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    o_ref, s_ref = recurrent_gla(**x64, output_final_state=True)
    assert relative_rmse(o, o_ref) <= TOL and relative_rmse(s, s_ref) <= TOL
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    loss, loss_ref = (o.double() * do).sum(), (o_ref * do).sum()
    if final_grad:
        loss, loss_ref = loss + (s.double() * ds).sum(), loss_ref + (s_ref * ds).sum()
    loss.backward()
    loss_ref.backward()
    for name, leaf in x.items():
        err = relative_rmse(leaf.grad, x64[name].grad)
        assert torch.isfinite(leaf.grad).all() and err <= TOL, (name, err)


@pytest.mark.parametrize("programs, seg", [(1, 9), (20, 2), (10**6, 1)])
@pytest.mark.parametrize("dqk_bk", [64, 32])
def test_segmented_backward(flash_config, programs, seg, dqk_bk):
    """The segmented backward (kernels/backward.py): chunk states and state gradients by segments walked
    at once from zero and joined by walks over the segments, then every chunk's gradients in one kernel.
    Exact for one segment (the whole sequence), segments of two chunks with a shorter last one, and one
    chunk per segment; with and without S_0, with and without a gradient on the final state; the whole
    key width in one block (dv inside chunk_bwd_kernel) and in two (dv by chunk_bwd_dv_kernel). Selected
    explicitly: the library's default is the sequential backward."""
    from glalearn import flash

    flash_config.update(bwd_segmented=True, segment_programs=programs, segment_bk=32, segment_bv=32, dqk_bk=dqk_bk)
    # T = 130, C = 16: N = 9 chunks; B = 1, H = 2, K = 60, V = 20 in 32 x 32 state blocks: 4 blocks
    assert flash.segment_length(1, 2, 60, 20, 9, 32, 32) == seg
    assert flash.launch_blocks(60, 20)["fuse_dv"] == (dqk_bk == 64)
    _check_gradients(1, 130, 2, 60, 20, True, 1.0, 16, seed=41)
    _check_gradients(1, 130, 2, 60, 20, False, 16.0, 16, seed=42, final_grad=False)
    assert "chunk_bwd_kernel (defer)" in flash.LAST_COMPILED and "segment_dstate_kernel" in flash.LAST_COMPILED
    assert ("chunk_bwd_dv_kernel (defer)" in flash.LAST_COMPILED) == (dqk_bk == 32)


@pytest.mark.parametrize("variant", [{}, {"dqk_bk": 16}, {"bwd_fallback": "inline"}, {"bwd_dg_scan": "product"},
                                     {"bwd_segmented": False}])
def test_backward_on_mixed_gates(flash_config, variant):
    """Chunks of mild gates, of g = -30 (span far past SPAN_MAX: the flagged launch redoes them exactly)
    and of a few hard-decaying channels, K = 32: every variant of the segmented backward, and the
    sequential one, stays exact."""
    flash_config.update({"segment_programs": 4, "bwd_segmented": True, **variant})
    inputs = random_gla_inputs(B=1, T=200, H=1, K=32, V=16, gate_normalizer=16.0, seed=8, initial_state=True)
    inputs["g"][:, 64:128] = -30.0
    inputs["g"][:, 128:192, :, :3] = -2.0
    _check_gradients(None, None, None, None, None, None, None, 64, seed=None, inputs=inputs)


def test_backward_guard_is_needed(flash_config):
    """Without the guard (every chunk forced onto the single product) the backward of g = -30 chunks is
    not finite or far off: the flagged launch is what makes test_backward_on_mixed_gates pass."""
    from glalearn import flash_gla

    inputs = random_gla_inputs(B=1, T=128, H=1, K=16, V=16, seed=9)
    inputs["g"][:, 64:] = -30.0
    x64 = {n: t.double().requires_grad_() for n, t in inputs.items()}
    recurrent_gla(**x64)[0].sum().backward()
    flash_config["span_max"] = 1e30
    x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    flash_gla(**x)[0].sum().backward()
    dk = x["k"].grad
    assert not torch.isfinite(dk).all() or relative_rmse(dk, x64["k"].grad) > 1e-2
    assert relative_rmse(dk[:, :64], x64["k"].grad[:, :64]) <= TOL  # the mild first chunk is right


class _ReadKeys(dict):
    """A CONFIG that records every key read from it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_only_the_segmented_backward_reads_its_launch_keys(monkeypatch):
    """flash.SEGMENTED_BACKWARD_KEYS are read by the segmented backward and by nothing else: the forward
    (segmented and sequential state pass, both strategies) and the sequential backward never look at them,
    so a run of the sequential backward (the default, and what the committed benchmark timed) does not
    depend on them. Every key flash_gla reads, forward and backward, is recorded."""
    from glalearn import flash, flash_gla

    inputs = random_gla_inputs(B=1, T=70, H=1, K=32, V=16, seed=4, initial_state=True)
    segmented_only = set(flash.SEGMENTED_BACKWARD_KEYS)
    assert segmented_only <= set(flash.CONFIG) and "bwd_segmented" not in segmented_only
    for segmented, programs, materialize in [(False, 256, True), (False, 0, True), (False, 256, False), (True, 256, True)]:
        config = _ReadKeys({**flash.CONFIG, "bwd_segmented": segmented, "segment_programs": programs})
        monkeypatch.setattr(flash, "CONFIG", config)
        x = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        o, s = flash_gla(**x, output_final_state=True, materialize=materialize)
        (o.sum() + s.sum()).backward()
        assert torch.isfinite(x["g"].grad).all()
        assert "bwd_segmented" in config.read and "span_max" in config.read
        if segmented:
            assert segmented_only <= config.read, segmented_only - config.read
        else:
            assert not config.read & segmented_only, (programs, materialize, config.read & segmented_only)


def test_cost_model_names_the_launches_and_counts_the_floor(flash_config):
    """kernel_costs (glalearn.bench_kernels) counts one entry per kernel that flash_gla launches, forward
    and backward, for both backward designs; its floors are the bytes of the inputs and outputs."""
    from glalearn import flash, flash_gla
    from glalearn.bench_kernels import kernel_costs

    def launched():
        return {name.split(" (")[0] + (" (reverse)" if name.endswith("(reverse)") else "") for name in flash.LAST_COMPILED}

    for segmented in (True, False):
        flash_config.update(bwd_segmented=segmented, dqk_bk=16)
        flash.LAST_COMPILED.clear()
        x = {n: t.requires_grad_() for n, t in random_gla_inputs(B=1, T=70, H=1, K=32, V=16, seed=3).items()}
        flash_gla(**x)[0].sum().backward()
        costs = kernel_costs(1, 70, 1, 32, 16, e=4)
        assert launched() == set(costs["forward"]) | set(costs["backward"])
        assert costs["design"]["backward"] == ("segmented" if segmented else "sequential")
    flash_config.update(bwd_segmented=True, dqk_bk=64)
    c = kernel_costs(4, 16384, 16, 64, 64, e=2)  # P1: read q, k, v, g, dO, write dq, dk, dv, dg (bf16)
    assert c["backward_floor_bytes"] == 4 * 16384 * 16 * 2 * (6 * 64 + 3 * 64)
    assert c["forward_floor_bytes"] == 4 * 16384 * 16 * 2 * (3 * 64 + 2 * 64)
    old = kernel_costs(4, 16384, 16, 64, 64, e=2, config={**flash.CONFIG, "bwd_segmented": False})
    assert c["backward_bytes"] < old["backward_bytes"] / 1.5
    assert c["backward_floor_bytes"] < c["backward_bytes"]


def test_grid_limits_get_a_clear_error():
    from glalearn import flash_gla

    x = random_gla_inputs(B=65536, T=1, H=1, K=16, V=16, seed=5)
    with pytest.raises(ValueError, match="B \\* H = 65536"):
        flash_gla(**x)


def test_layout_check_runs_every_strategy():
    """The layout check of glalearn.bench_kernels (run on a GPU under compute-sanitizer) on a tiny shape
    here: inputs allocated first, forward and backward of both strategies, finite and repeatable."""
    from glalearn.bench_kernels import layout_check

    shapes = [("tiny", 1, 130, 2, 20, 16, True, True), ("tiny, no S_0", 2, 70, 1, 16, 20, False, False)]
    results = layout_check(shapes, repeats=2, device="cpu", variants=({"bwd_segmented": True}, {"bwd_segmented": False}),
                           log=lambda *_: None)
    assert [(r["shape"], r["materialize"]) for r in results] == 2 * [
        ("tiny", True), ("tiny", False), ("tiny, no S_0", True), ("tiny, no S_0", False)]
    assert all(r["finite"] and r["repeatable"] for r in results)


@pytest.mark.slow
def test_every_launch_compiles_for_sm90_without_spilling_the_fast_kernels(tmp_path):
    """Triton compiles for an sm_90 GPU on this CPU machine (no GPU needed): every launch flash_gla makes
    (forward and both backwards, P1 and P2 shapes) must compile — the interpreter accepts code the compiler
    rejects — and the product-only kernels must spill at most 64 bytes (the forward's output kernel under
    its 128-register cap: 48; the segmented backward's: 0; kernels/NOTES.md, v5). The sequential
    backward's chunk-parallel kernels hold both score paths inline, as the flagged launches do, and may
    spill (its dq/dk/dg kernel does on the GPU too)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "registers.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "glalearn.bench", "kernels", "--offline-registers", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(out.read_text())["offline_registers"]
    assert set(reports) == {"P1 T=4096", "P2 T=4096"}
    for shape, launches in reports.items():
        assert "chunk_bwd_kernel (defer)" in launches and "segment_dstate_kernel" in launches, shape
        assert {"chunk_state_backward_kernel", "chunk_dv_kernel", "chunk_dqkg_kernel"} <= set(launches), shape
        for name, r in launches.items():
            assert "error" not in r, (shape, name, r)
            if "flagged" not in name and name not in ("chunk_dv_kernel", "chunk_dqkg_kernel"):  # the exact path's launches may spill: they run only for flagged chunks
                assert r["spill_store_bytes"] <= 64, (shape, name, r)


def test_sweep_records_each_variant_and_restores_the_config():
    """bench kernels --sweep on tiny inputs here (a counting timer instead of do_bench): one record per
    variant with its gradient errors (bf16 inputs with mixed gates, against float64), a failing variant
    recorded with its error, CONFIG as it was afterwards; given a bandwidth, each backward's floor in ms.
    The default backward (sequential) and the segmented one are both among the variants."""
    from glalearn import flash
    from glalearn.bench_kernels import sweep

    before = dict(flash.CONFIG)
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return float(len(calls))

    variants = [{}, {"bwd_segmented": True, "bwd_dg_scan": "product"}, {"span_max": "not a number"}]
    out = sweep(variants, cases=[("tiny", 1, 70, 2, 16, 16)], log=lambda *_: None, device="cpu", timer=timer, check_T=150,
                bandwidth_gbs=100.0)
    assert flash.CONFIG == before
    assert [r["variant"] for r in out] == variants
    for r in out[:2]:
        assert set(r["tiny"]) == {"forward_ms", "backward_ms", "backward_bytes", "backward_floor_bytes", "backward_floor_ms"}
        assert r["tiny"]["backward_floor_ms"] == pytest.approx(r["tiny"]["backward_floor_bytes"] / 1e11 * 1e3)
        assert max(r["grad_errors"].values()) <= 1e-2, r["grad_errors"]  # bf16 tolerance (DESIGN.md §2)
    assert "error" in out[2] and "tiny" not in out[2]
