import pytest
import torch

from glalearn.tasks.mqar import FILLER, IGNORE, mqar_accuracy, mqar_batch


@pytest.mark.parametrize("seq_len,num_pairs,vocab", [(64, 4, 64), (256, 16, 8192), (256, 64, 8192), (130, 16, 40)])
def test_generator_properties(seq_len, num_pairs, vocab):
    b = mqar_batch(8, seq_len, num_pairs, vocab, seed=3)
    assert b.inputs.shape == b.targets.shape == (8, seq_len)
    for i in range(8):
        keys, values = b.keys[i], b.values[i]
        assert len(set(keys.tolist())) == num_pairs  # keys unique per sequence
        assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
        assert torch.equal(b.inputs[i, 0 : 2 * num_pairs : 2], keys)
        assert torch.equal(b.inputs[i, 1 : 2 * num_pairs : 2], values)
        pairs = dict(zip(keys.tolist(), values.tolist()))
        asked = (b.targets[i] != IGNORE).nonzero().flatten()
        assert torch.equal(asked, b.query_positions[i])
        for p in asked.tolist():
            key = b.inputs[i, p].item()
            assert key in pairs  # a queried key was shown before
            assert b.targets[i, p].item() == pairs[key] == b.inputs[i, p + 1].item()  # label correct
        queried_keys = b.inputs[i, asked].tolist()
        assert len(set(queried_keys)) == len(queried_keys)  # each pair asked at most once
        rest = torch.ones(seq_len, dtype=torch.bool)
        rest[: 2 * num_pairs] = False
        rest[asked] = False
        rest[asked + 1] = False
        assert (b.inputs[i, rest] == FILLER).all()


def test_seeded_and_fresh():
    a, b = mqar_batch(4, 64, 8, 64, seed=11), mqar_batch(4, 64, 8, 64, seed=11)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    c = mqar_batch(4, 64, 8, 64, seed=12)
    assert not torch.equal(a.inputs, c.inputs)


def test_accuracy_counts_queried_positions_only():
    b = mqar_batch(2, 32, 4, 32, seed=0)
    logits = torch.randn(2, 32, 32)
    perfect = logits.clone()
    asked = b.targets != IGNORE
    perfect[asked] = -1e4
    perfect[asked, b.targets[asked]] = 1e4
    assert mqar_accuracy(perfect, b.targets) == 1.0
    wrong = perfect.clone()
    wrong[asked, b.targets[asked]] = -1e5
    assert mqar_accuracy(wrong, b.targets) == 0.0
    wrong[~asked] = perfect[~asked]  # non-queried positions never matter
    assert mqar_accuracy(wrong, b.targets) == 0.0


def test_errors():
    with pytest.raises(ValueError, match=r"seq_len must be >= 2 \* num_pairs \+ 2 \* num_queries = 64, got 40"):
        mqar_batch(1, 40, 16, 8192)
    with pytest.raises(ValueError, match=r"vocab_size must give at least num_pairs = 16 distinct keys"):
        mqar_batch(1, 256, 16, 20)
    with pytest.raises(ValueError, match=r"num_pairs must be a positive int, got 0"):
        mqar_batch(1, 256, 0, 100)
    with pytest.raises(ValueError, match=r"num_queries must be in \[1, num_pairs = 4\], got 5"):
        mqar_batch(1, 256, 4, 100, num_queries=5)
    with pytest.raises(ValueError, match=r"logits \[B, T, vocab\] and targets \[B, T\] must agree"):
        mqar_accuracy(torch.randn(2, 10, 5), torch.zeros(2, 11, dtype=torch.long))
