import torch

from glalearn import recurrent_gla
from glalearn.bench import bench_forms, direct_chunk_prototype, format_forms_table
from glalearn.numerics import random_gla_inputs, relative_rmse


def test_bench_forms_small_table():
    rows = bench_forms(lengths=(64,), H=1, K=16, V=16, repeats=1)
    forms = {r["form"] for r in rows}
    assert "recurrent" in forms and "chunk (C=64)" in forms and "two_level split diag" in forms
    assert "two_level guarded" in forms
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)
    base = next(r for r in rows if r["form"] == "recurrent")
    assert base["forward_speedup"] == 1.0
    table = format_forms_table(rows)
    assert "recurrent" in table and "x rec" in table


def test_direct_prototype_is_right_with_gentle_gates_and_breaks_with_strong_ones():
    gentle = random_gla_inputs(B=1, T=100, H=2, K=16, V=16, gate_normalizer=16)
    o_ref, _ = recurrent_gla(**{n: t.double() for n, t in gentle.items()})
    assert relative_rmse(direct_chunk_prototype(**gentle)[0], o_ref) <= 1e-5
    strong = random_gla_inputs(B=1, T=100, H=2, K=16, V=16, gate_normalizer=0.1)
    o, _ = direct_chunk_prototype(**strong)
    assert not torch.isfinite(o).all()
