import math

import pytest
import torch

from glalearn import gates


def test_gla_gate_matches_the_paper_formula():
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    W1, W2, b = torch.randn(32, 16, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    g = gates.gla_gate(x, W1, W2, b, normalizer=16)
    alpha = torch.sigmoid(x @ W1 @ W2 + b) ** (1 / 16)  # α = σ(·)^(1/τ)
    assert torch.allclose(g.exp(), alpha)
    assert (g < 0).all()


def test_larger_normalizer_means_slower_forgetting():
    x = torch.randn(100, 8)
    gate = gates.LowRankGate(8, 12, normalizer=1.0)
    g1 = gate(x)
    gate.normalizer = 16.0
    g16 = gate(x)
    assert torch.allclose(g16 * 16, g1)
    assert (g16 > g1).all()


def test_low_rank_gate_shapes_and_rank():
    gate = gates.LowRankGate(d_model=64, key_dim=32)
    assert gate.down.weight.shape == (16, 64) and gate.up.weight.shape == (32, 16)
    assert gate(torch.randn(2, 5, 64)).shape == (2, 5, 32)


def test_gate_errors():
    with pytest.raises(ValueError, match="normalizer"):
        gates.LowRankGate(8, 8, normalizer=0)
    with pytest.raises(ValueError, match=r"shapes must chain as x \[..., d\] @ W1 \[d, r\]"):
        gates.gla_gate(torch.randn(4, 8), torch.randn(7, 16), torch.randn(16, 4), torch.randn(4))


def test_decay_mask_is_the_product_of_gates():
    g = -torch.rand(6, 3, dtype=torch.float64)
    D = gates.decay_mask(g)
    alpha = g.exp()
    for t in range(6):
        for s in range(6):
            expected = torch.prod(alpha[s + 1 : t + 1], dim=0) if s <= t else torch.zeros(3, dtype=torch.float64)
            assert torch.allclose(D[t, s], expected)


def test_decay_mask_survives_strong_decay():
    D = gates.decay_mask(torch.full((300,), -30.0))
    assert torch.isfinite(D).all() and (D.diagonal() == 1).all()


def test_chunk_cumulative_log_decay_restarts():
    g = -torch.rand(10, 2)
    G = gates.chunk_cumulative_log_decay(g, 4)
    assert torch.allclose(G[4:8], g[4:8].cumsum(0)) and torch.allclose(G[8:], g[8:].cumsum(0))
    assert torch.allclose(gates.cumulative_log_decay(g, dim=0), g.cumsum(0))


def test_retnet_decays():
    d = gates.retnet_log_decay(4)
    assert torch.allclose(d.exp(), torch.tensor([1 - 2.0 ** (-5 - h) for h in range(4)]))
    assert math.isclose(d[0].item(), math.log(1 - 1 / 32), rel_tol=1e-6)
