"""The claims of chapters 0-2, each as a test, and the functions they derive inline against the library.

The chapters' inline derivations (code cells tagged "derivation") are executed from the notebooks
themselves, so these tests check exactly the code a learner reads. Inputs are fresh random draws.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import glalearn
from glalearn import costs, gates, parallel_gla, recurrent_gla
from glalearn.forms.parallel import causal_mask
from glalearn.numerics import max_abs_error, random_gla_inputs, relative_rmse

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
CH0 = CHAPTERS / "00_orientation.ipynb"
CH1 = CHAPTERS / "01_linear_attention_and_the_gate.ipynb"
CH2 = CHAPTERS / "02_parallel_form.ipynb"
SIZES = [(1, 2, 2), (7, 3, 5), (33, 16, 6), (65, 5, 16)]  # (T, K, V), awkward on purpose


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def _derivations(path) -> dict:
    """Run a chapter's "derivation" cells in a namespace with the chapter's imports; return it."""
    ns = {"torch": torch, "causal_mask": causal_mask, "math": math}
    cells = [c for c in _cells(path) if "derivation" in c.get("metadata", {}).get("tags", [])]
    assert cells, f"{path.name} has no cells tagged 'derivation'"
    for cell in cells:
        exec(compile(_source(cell), f"{path.name}:derivation", "exec"), ns)  # noqa: S102
    return ns


@pytest.fixture(scope="module")
def ch1():
    return _derivations(CH1)


@pytest.fixture(scope="module")
def ch2():
    return _derivations(CH2)


def _one_head(x, h=0):
    return (x[n][0, :, h] for n in ("q", "k", "v", "g"))


# --- every chapter: structure the book promises -------------------------------------------------------

@pytest.mark.parametrize("path", [CH0, CH1, CH2], ids=lambda p: p.stem)
def test_chapter_structure(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    assert "Learning goals" in _source(cells[0]) and "Prerequisites" in _source(cells[0])
    assert "## Summary" in _source(cells[-1])
    if path != CH0:
        assert f"exercises/{path.stem}.ipynb" in _source(cells[-1])
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert "torch.manual_seed(0)" in _source(first_code)
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell["outputs"] is not None and cell["execution_count"] is not None, "commit executed"
            for out in cell["outputs"]:
                assert out["output_type"] != "error", _source(cell)[:80]
            if "time.perf_counter" in _source(cell):
                assert _source(cell).startswith("# NBVAL_IGNORE_OUTPUT"), "timings only in ignored cells"


@pytest.mark.parametrize("path, equations", [(CH1, ["Eq. 1", "Eq. 3"]), (CH2, ["Eq. 3", "Eq. 4"])],
                         ids=["ch1", "ch2"])
def test_chapters_quote_the_papers_equations(path, equations):
    text = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")
    for eq in equations:
        assert eq in text


def test_hand_sized_examples_are_T4_K2_V2():
    for path in (CH1, CH2):
        code = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
        assert "T, K, V = 4, 2, 2" in code


def test_derivations_do_not_shadow_library_names(ch1, ch2):
    library = set(dir(glalearn)) | set(dir(gates)) | {"causal_mask"}
    for ns in (ch1, ch2):
        defined = {name for name, value in ns.items() if callable(value) and getattr(value, "__module__", "") is None}
        assert not (defined & library)
    assert {"linear_attention_parallel", "linear_attention_recurrent", "gated_recurrence", "gate_by_hand"} <= set(ch1)
    assert {"parallel_form_by_hand", "parallel_form_log_space"} <= set(ch2)


# --- chapter 0 ------------------------------------------------------------------------------------------

def test_ch0_all_forms_agree_with_the_float64_recurrence():
    x = random_gla_inputs(B=2, T=100, H=2, K=16, V=16, gate_normalizer=16.0)
    reference, _ = recurrent_gla(**{n: t.double() for n, t in x.items()})
    for form in (recurrent_gla, parallel_gla, glalearn.chunk_gla, glalearn.two_level_chunk_gla):
        assert relative_rmse(form(**x)[0], reference) <= 1e-5, form.__name__


def test_ch0_positive_gate_is_rejected_by_name():
    x = random_gla_inputs(B=1, T=5, H=1, K=4, V=4)
    with pytest.raises(ValueError, match=r"^g .*<= 0"):
        recurrent_gla(x["q"], x["k"], x["v"], -x["g"])


def test_ch0_doctor_output_cell_is_not_compared():
    cells = [c for c in _cells(CH0) if "glalearn.doctor()" in _source(c) and c["cell_type"] == "code"]
    assert cells and all(_source(c).startswith("# NBVAL_IGNORE_OUTPUT") for c in cells)


# --- chapter 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, K, V", SIZES)
def test_ch1_linear_attention_parallel_equals_recurrent_equals_library(ch1, T, K, V):
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, dtype=torch.float64)
    q, k, v, _ = _one_head(x)
    scale = K ** -0.5
    parallel = ch1["linear_attention_parallel"](q, k, v, scale)
    recurrent, states = ch1["linear_attention_recurrent"](q, k, v, scale)
    lib, S = recurrent_gla(x["q"], x["k"], x["v"], torch.zeros_like(x["g"]), output_final_state=True)
    assert max_abs_error(parallel, recurrent) < 1e-10
    assert max_abs_error(recurrent, lib[0, :, 0]) < 1e-10
    assert max_abs_error(states[-1], S[0, 0]) < 1e-10


def test_ch1_associativity_claim():
    Q, K_, V_ = torch.randn(300, 32, dtype=torch.float64), torch.randn(300, 32, dtype=torch.float64), \
        torch.randn(300, 24, dtype=torch.float64)
    left, right = (Q @ K_.T) @ V_, Q @ (K_.T @ V_)
    assert max_abs_error(left, right) / left.abs().max().item() < 1e-12


@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("T, K, V", SIZES)
def test_ch1_gated_recurrence_matches_library(ch1, T, K, V, normalizer):
    x = random_gla_inputs(B=1, T=T, H=2, K=K, V=V, gate_normalizer=normalizer, dtype=torch.float64)
    lib, S = recurrent_gla(**x, output_final_state=True)
    for h in range(2):
        o, states = ch1["gated_recurrence"](*_one_head(x, h), scale=K ** -0.5)
        assert max_abs_error(o, lib[0, :, h]) < 1e-10
        assert max_abs_error(states[-1], S[0, h]) < 1e-10


def test_ch1_zero_log_gate_is_linear_attention(ch1):
    x = random_gla_inputs(B=1, T=20, H=1, K=4, V=3, dtype=torch.float64)
    q, k, v, g = _one_head(x)
    gated, _ = ch1["gated_recurrence"](q, k, v, torch.zeros_like(g), 0.5)
    assert max_abs_error(gated, ch1["linear_attention_parallel"](q, k, v, 0.5)) < 1e-10


@pytest.mark.parametrize("tau", [1.0, 4.0, 16.0])
def test_ch1_gate_by_hand_matches_gla_gate(ch1, tau):
    x, W1, W2, b = (torch.randn(5, 9, 12, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64),
                    torch.randn(16, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    torch.testing.assert_close(ch1["gate_by_hand"](x, W1, W2, b, tau), gates.gla_gate(x, W1, W2, b, normalizer=tau))


def test_ch1_decay_mask_entry_is_a_product_of_gates():
    g = torch.nn.functional.logsigmoid(torch.randn(9, 3, dtype=torch.float64))
    D = gates.decay_mask(g)
    t, s = 7, 2
    torch.testing.assert_close(D[t, s], g[s + 1 : t + 1].exp().prod(0))
    assert (D[s, t] == 0).all()


@pytest.mark.parametrize("tau", [1.0, 4.0, 16.0, 32.0])
def test_ch1_tau_is_the_half_life_at_logit_zero(tau):
    x = torch.zeros(1, 4, dtype=torch.float64)
    g = gates.gla_gate(x, torch.randn(4, 16, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64),
                       torch.zeros(3, dtype=torch.float64), normalizer=tau)
    torch.testing.assert_close((tau * g).exp(), torch.full_like(g, 0.5))


def test_ch1_larger_tau_keeps_alpha_closer_to_one():
    z = torch.randn(1000, dtype=torch.float64) * 4
    alphas = [torch.sigmoid(z) ** (1 / tau) for tau in (1, 4, 16)]
    assert (alphas[0] < alphas[1]).all() and (alphas[1] < alphas[2]).all()
    # a one-step wipe to α = 0.01 at τ = 16 needs a logit near -74
    z74 = torch.tensor(-74.0, dtype=torch.float64)
    assert math.isclose((torch.sigmoid(z74) ** (1 / 16)).item(), 0.01, rel_tol=0.03)


def test_ch1_low_rank_gate_parameter_count():
    layer_gate = gates.LowRankGate(d_model=1024, key_dim=512)
    assert sum(p.numel() for p in layer_gate.parameters()) == 1024 * 16 + 16 * 512 + 512 == 25_088


def test_ch1_explorer_cell_runs_and_a_compared_cell_calls_update():
    cells = [c for c in _cells(CH1) if c["cell_type"] == "code"]
    explorer = [i for i, c in enumerate(cells) if "gate_decay_explorer(" in _source(c)]
    assert explorer and _source(cells[explorer[0]]).startswith("# NBVAL_IGNORE_OUTPUT")
    later = [c for c in cells[explorer[0] + 1:] if "explorer.update()" in _source(c)]
    assert later and not _source(later[0]).startswith("# NBVAL_IGNORE_OUTPUT")
    assert "channel 0: α_t in" in "".join("".join(o.get("text", "")) for o in later[0]["outputs"])


# --- chapter 2 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, K, V", SIZES)
def test_ch2_parallel_form_by_hand_matches_library_and_recurrence(ch2, T, K, V):
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, gate_normalizer=1.0, dtype=torch.float64)
    scale = K ** -0.5
    o = ch2["parallel_form_by_hand"](*_one_head(x), scale)
    textbook, _ = parallel_gla(**x, log_space=False)
    reference, _ = recurrent_gla(**x)
    assert max_abs_error(o, textbook[0, :, 0]) < 1e-9
    assert relative_rmse(o, reference[0, :, 0]) < 1e-10


@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("T, K, V", SIZES)
def test_ch2_log_space_by_hand_matches_library(ch2, T, K, V, normalizer):
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, gate_normalizer=normalizer, dtype=torch.float64)
    o = ch2["parallel_form_log_space"](*_one_head(x), K ** -0.5)
    lib, _ = parallel_gla(**x, log_space=True)
    reference, _ = recurrent_gla(**x)
    assert max_abs_error(o, lib[0, :, 0]) < 1e-10
    assert relative_rmse(o, reference[0, :, 0]) < 1e-10


def test_ch2_log_space_survives_where_the_textbook_form_overflows_even_in_float64(ch2):
    x = random_gla_inputs(B=1, T=200, H=1, K=8, V=8, gate_normalizer=0.1, dtype=torch.float64)  # G ~ -1600
    q, k, v, g = _one_head(x)
    assert not torch.isfinite(ch2["parallel_form_by_hand"](q, k, v, g, 8 ** -0.5)).all()
    o = ch2["parallel_form_log_space"](q, k, v, g, 8 ** -0.5)
    assert torch.isfinite(o).all()
    assert relative_rmse(o, recurrent_gla(**x)[0][0, :, 0]) < 1e-10


def test_ch2_decay_mask_view_of_the_scores():
    q, k = torch.randn(11, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(11, 4, dtype=torch.float64))
    B = g.cumsum(0).exp()
    P = ((q * B) @ (k / B).T).masked_fill(~causal_mask(11), 0.0)
    assert max_abs_error(torch.einsum("tk,sk,tsk->ts", q, k, gates.decay_mask(g)), P) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ch2_textbook_form_fails_where_exp_minus_G_leaves_the_dtype(dtype):
    """Rows whose keys k_s·exp(-G_s) stay well inside the dtype are finite and accurate; rows where
    they exceed it by a margin are NaN/inf — the chapter's plot of the point of failure."""
    normalizer = 16.0 if dtype == torch.float32 else 4.0
    x = random_gla_inputs(B=1, T=2048 if dtype == torch.float32 else 512, H=1, K=16, V=16,
                          gate_normalizer=normalizer, dtype=torch.float64)
    inputs = {n: t.to(dtype) for n, t in x.items()}
    o, _ = parallel_gla(**inputs, log_space=False)
    reference, _ = recurrent_gla(**{n: t.double() for n, t in inputs.items()})
    o, reference = o[0, :, 0].double(), reference[0, :, 0]
    k, G = inputs["k"][0, :, 0].double(), inputs["g"][0, :, 0].double().cumsum(0)
    log_key = (k.abs().clamp_min(1e-30).log() - G).max(dim=-1).values.cummax(0).values  # max_{s<=t,k}
    limit = math.log(torch.finfo(dtype).max)
    safe, doomed = log_key < limit - 7, log_key > limit + 7
    assert safe.any() and doomed.any()
    assert torch.isfinite(o[safe]).all()
    assert not torch.isfinite(o[doomed]).all(dim=-1).any()
    row_error = (o[safe] - reference[safe]).norm(dim=-1) / reference[safe].norm(dim=-1)
    assert row_error.max() < 1e-2
    # and the log-space form is finite and accurate on every row of the same input
    o_log, _ = parallel_gla(**inputs, log_space=True)
    assert torch.isfinite(o_log).all()
    assert relative_rmse(o_log[0, :, 0], reference) < (1e-5 if dtype == torch.float32 else 1e-3)


def test_ch2_masking_after_the_exp_gives_nan():
    G = torch.full((4, 2), -40.0, dtype=torch.float64).cumsum(0)
    exponent = G[:, None, :] - G[None, :, :]
    late = exponent.float().exp() * causal_mask(4)[:, :, None]
    early = exponent.masked_fill(~causal_mask(4)[:, :, None], float("-inf")).float().exp()
    assert late.isnan().any() and torch.isfinite(early).all()


def test_ch2_parallel_cost_is_quadratic_recurrence_linear():
    for T in (512, 4096):
        assert round(costs.parallel_cost(2 * T, 64, 64).exps / costs.parallel_cost(T, 64, 64).exps, 2) == 4.0
        assert costs.recurrent_cost(2 * T, 64, 64).flops == 2 * costs.recurrent_cost(T, 64, 64).flops
    textbook = costs.parallel_cost(1024, 64, 64, log_space=False)
    assert textbook.matmul_flops == 2 * 1024 * 1024 * 64 * 2
