"""The cost model of glalearn.costs (chapter 3), checked against what the library actually computes."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from glalearn import costs, recurrent_gla
from glalearn.forms.chunk import chunk_local_cumsum, chunk_states, log_space_scores, to_chunks
from glalearn.numerics import random_gla_inputs


class CountExps(TorchDispatchMode):
    """Counts the exp results that are nonzero (masked entries exp(-inf) = 0 are work thrown away)."""

    def __init__(self):
        super().__init__()
        self.nonzero = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.exp, torch.ops.aten.exp_):
            self.nonzero += int((out != 0).sum())
        return out


@pytest.mark.parametrize("C,K", [(1, 3), (4, 2), (16, 8), (64, 5)])
def test_log_space_scores_exps_match_the_library(C, K):
    """One exp per needed (i, j, k) triple: C(C+1)/2 · K of them per chunk."""
    q, k = torch.randn(3, C, K), torch.randn(3, C, K)
    G = (torch.nn.functional.logsigmoid(torch.randn(3, C, K)) / 16).double().cumsum(-2)
    with CountExps() as counter:
        log_space_scores(q, k, G)
    assert counter.nonzero == 3 * costs.log_space_scores_cost(C, K).exps


@pytest.mark.parametrize("T,C,K,V", [(64, 16, 8, 4), (50, 8, 3, 7), (5, 8, 2, 2)])
def test_chunk_state_matmul_flops_match_flop_counter(T, C, K, V):
    """(K⊙Γ)^T V over all chunks: 2·N·C·K·V matmul FLOPs — a third of the matmul FLOPs is this."""
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V, seed=None)
    kc, vc, gc = (to_chunks(x[n], C) for n in ("k", "v", "g"))
    G = chunk_local_cumsum(gc)
    with FlopCounterMode(display=False) as counter:
        chunk_states(kc, vc, G)
    N = costs.num_chunks(T, C)
    assert counter.get_total_flops() == 2 * N * C * K * V
    cost = costs.chunk_cost(T, K, V, C)
    assert cost.matmul_flops == 2 * (2 * N * C * K * V) + 2 * N * C * C * V


def test_recurrent_cost_counts_exps_and_steps():
    T, K, V = 7, 3, 5
    x = random_gla_inputs(B=1, T=T, H=1, K=K, V=V)
    with CountExps() as counter:
        recurrent_gla(**x)
    cost = costs.recurrent_cost(T, K, V)
    assert counter.nonzero == cost.exps == T * K
    assert cost.sequential_steps == T and cost.matmul_flops == 0


@pytest.mark.parametrize("T,C", [(1, 1), (64, 16), (65, 16), (4096, 64)])
def test_sequential_steps_are_chunks(T, C):
    assert costs.chunk_cost(T, 8, 8, C).sequential_steps == -(-T // C) == costs.num_chunks(T, C)


def test_chunk_cost_interpolates_between_recurrent_and_parallel():
    """C = 1: as many steps as the recurrence; C = T: the log-space parallel form's exps, one step."""
    T, K, V = 256, 16, 32
    assert costs.chunk_cost(T, K, V, 1).sequential_steps == costs.recurrent_cost(T, K, V).sequential_steps
    one_chunk = costs.chunk_cost(T, K, V, T)
    parallel = costs.parallel_cost(T, K, V, log_space=True)
    assert one_chunk.sequential_steps == 1
    # the parallel form's score exps plus the chunk form's decays (Λ, Γ for every token, γ once)
    assert one_chunk.exps == parallel.exps + 2 * T * K + K
    flops = [costs.chunk_cost(T, K, V, C).flops for C in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert all(a < b for a, b in itertools.pairwise(flops[2:]))  # beyond tiny C the intra part dominates


def test_two_level_moves_exps_into_matmuls():
    T, K, V, C = 1024, 64, 64, 64
    one = costs.chunk_cost(T, K, V, C)
    for L in (2, 4, 8, 16, 32):
        two = costs.two_level_cost(T, K, V, C, L)
        assert two.exps < one.exps and two.matmul_flops > one.matmul_flops
        assert two.sequential_steps == one.sequential_steps
    # L = 1 goes too far: one K-vector of exps per pair of single tokens is as dear as log space
    assert costs.two_level_cost(T, K, V, C, 1).exps > one.exps
    # L = C: one sub-chunk, nothing off the diagonal; the scores are chapter 3's log-space ones
    same = costs.two_level_cost(T, K, V, C, C)
    assert same.matmul_flops == one.matmul_flops
    assert same.exps - one.exps == costs.num_chunks(T, C) * 2 * C * K


def test_state_memory():
    assert costs.state_memory(4096, 64, 64) == 4096 * 64 * 64
    assert costs.state_memory(4096, 64, 64, chunk_size=64) == 64 * 64 * 64
    assert costs.state_memory(65, 2, 3, chunk_size=64) == 2 * 2 * 3


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_sizes_name_the_argument(bad):
    with pytest.raises(ValueError, match="T must be a positive int"):
        costs.recurrent_cost(bad, 4, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        costs.chunk_cost(16, 4, 4, bad)


def test_sub_chunk_must_divide_chunk():
    with pytest.raises(ValueError, match="sub_chunk_size must divide chunk_size = 64, got 24"):
        costs.two_level_cost(128, 4, 4, 64, 24)
