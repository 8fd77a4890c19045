"""Hypothesis property tests: every pair of forms computes the same function."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glalearn import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla
from glalearn.numerics import random_gla_inputs, relative_rmse

shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.integers(1, 80),
    "H": st.integers(1, 3),
    "K": st.integers(1, 24),
    "V": st.integers(1, 24),
    "gate_normalizer": st.sampled_from([0.05, 0.3, 1.0, 4.0, 16.0, 100.0]),
    "seed": st.integers(0, 2**31 - 1),
    "initial_state": st.booleans(),
})
powers = st.sampled_from([1, 2, 4, 8, 16, 32, 64])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, chunk=powers, sub=powers, diagonal=st.sampled_from(["log_space", "split", "guarded"]))
def test_all_forms_agree(shape, chunk, sub, diagonal):
    inputs = random_gla_inputs(**shape)
    o_ref, s_ref = recurrent_gla(**inputs, output_final_state=True)
    results = {
        "parallel": parallel_gla(**inputs, output_final_state=True),
        "chunk": chunk_gla(**inputs, output_final_state=True, chunk_size=chunk),
        "two_level": two_level_chunk_gla(**inputs, output_final_state=True, chunk_size=max(chunk, sub),
                                         sub_chunk_size=sub, diagonal=diagonal),
    }
    for name, (o, s) in results.items():
        assert relative_rmse(o, o_ref) <= 2e-5, name
        assert relative_rmse(s, s_ref) <= 2e-5, name


@settings(max_examples=30, deadline=None)
@given(shape=shapes, split=st.integers(1, 79))
def test_state_carries_a_split_sequence(shape, split):
    """Running [0, t) then [t, T) from the passed state equals one run: the state is the whole past."""
    inputs = random_gla_inputs(**shape)
    T = inputs["q"].shape[1]
    split = min(split, T)
    o_full, s_full = chunk_gla(**inputs, output_final_state=True)
    first = {n: (t[:, :split] if n != "initial_state" else t) for n, t in inputs.items()}
    o1, s1 = chunk_gla(**first, output_final_state=True)
    second = {n: t[:, split:] for n, t in inputs.items() if n != "initial_state"}
    o2, s2 = chunk_gla(**second, initial_state=s1, output_final_state=True)
    assert relative_rmse(torch.cat([o1, o2], dim=1), o_full) <= 1e-5
    assert relative_rmse(s2, s_full) <= 1e-5
