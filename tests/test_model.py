"""The GLA language model and its Transformer++ baseline (chapter 8)."""

import pytest
import torch

from glalearn.model import (
    GLAConfig,
    GLAForCausalLM,
    TransformerConfig,
    TransformerForCausalLM,
    build_model,
    config_from_dict,
    flops_per_token,
)


def _small_gla(**kw):
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    return GLAForCausalLM(GLAConfig(d_model=64, n_layers=2, num_heads=4, **kw))


def _ids(B, T):
    return torch.randint(0, 65, (B, T))


@pytest.mark.parametrize("cls,cfg", [(GLAForCausalLM, GLAConfig), (TransformerForCausalLM, TransformerConfig)])
def test_forward_shapes(cls, cfg):
    model = cls(cfg(d_model=64, n_layers=2))
    for B, T in [(1, 1), (3, 17), (2, 100)]:
        assert model(_ids(B, T)).shape == (B, T, 65)


def test_models_differ_only_in_the_mixer_and_have_equal_size():
    gla = GLAForCausalLM(GLAConfig())
    tr = TransformerForCausalLM(TransformerConfig())
    n_gla, n_tr = gla.num_parameters(), tr.num_parameters()
    assert n_gla <= 5_000_000 and n_tr <= 5_000_000
    assert abs(n_gla - n_tr) / n_tr < 0.10
    strip = {n for n, _ in gla.named_parameters() if ".mixer." not in n}
    assert strip == {n for n, _ in tr.named_parameters() if ".mixer." not in n}


@pytest.mark.parametrize("gate", ["vector", "scalar", "fixed", "none"])
def test_backends_give_the_same_logits(gate):
    model = _small_gla(gate=gate)
    ids = _ids(2, 90)
    model.set_backend("recurrent")
    ref = model(ids)
    for backend in ["chunk", "two_level", "auto"]:
        assert (model.set_backend(backend)(ids) - ref).abs().max() < 1e-4, backend


@pytest.mark.parametrize("gate", ["vector", "scalar", "fixed", "none"])
def test_recurrent_decoding_equals_parallel_logits(gate):
    model = _small_gla(gate=gate).eval()
    ids = _ids(2, 70)
    parallel = model(ids)
    states, steps = None, []
    for t in range(ids.shape[1]):
        logits, states = model.step(ids[:, t], states)
        steps.append(logits)
    assert (torch.stack(steps, 1) - parallel).abs().max() < 1e-4
    # prefill half in parallel, then step
    logits, states = model.prefill(ids[:, :33])
    assert (logits - parallel[:, :33]).abs().max() < 1e-4
    for t in range(33, 70):
        logits, states = model.step(ids[:, t], states)
        assert (logits - parallel[:, t]).abs().max() < 1e-4


def test_state_size_does_not_grow_with_length():
    model = _small_gla().eval()
    _, s1 = model.prefill(_ids(1, 10))
    _, s2 = model.prefill(_ids(1, 300))
    assert [s.shape for s in s1] == [s.shape for s in s2] == [(1, 4, 8, 16)] * 2


@pytest.mark.parametrize("cls,cfg", [(GLAForCausalLM, GLAConfig), (TransformerForCausalLM, TransformerConfig)])
def test_generation_is_deterministic_with_a_seed(cls, cfg):
    model = cls(cfg(d_model=64, n_layers=2, context_length=32)).eval()
    prompt = _ids(2, 5)
    a = model.generate(prompt, 40, temperature=0.8, top_k=10, seed=3)
    b = model.generate(prompt, 40, temperature=0.8, top_k=10, seed=3)
    c = model.generate(prompt, 40, temperature=0.8, top_k=10, seed=4)
    assert a.shape == (2, 45) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], prompt)
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 10, temperature=0, seed=99))


def test_gla_generation_matches_greedy_parallel_decoding():
    model = _small_gla().eval()
    prompt = _ids(1, 7)
    out = model.generate(prompt, 12, temperature=0)
    ids = prompt
    for _ in range(12):  # the slow way: rerun the whole sequence in parallel every token
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_config_round_trip_and_errors():
    cfg = GLAConfig(d_model=64, n_layers=2, gate="scalar")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_model(TransformerConfig(d_model=64, n_layers=1).to_dict()), TransformerForCausalLM)
    with pytest.raises(ValueError, match="model_type"):
        config_from_dict({"d_model": 64})
    with pytest.raises(ValueError, match="unknown gla config fields"):
        config_from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        GLAConfig(d_model=0)
    model = _small_gla()
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(_ids(1, 3), 2, top_k=0)


def test_flop_counts_favour_gla_at_long_context():
    gla, tr = GLAConfig(d_model=1024, n_layers=24), TransformerConfig(d_model=1024, n_layers=24)
    assert flops_per_token(gla, 256)["total"] > 0.8 * flops_per_token(tr, 256)["total"]
    assert flops_per_token(gla, 8192)["total"] < flops_per_token(tr, 8192)["total"]
    # GLA's mixing cost per token does not grow with T beyond the chunk size.
    assert flops_per_token(gla, 2048)["mixing"] == flops_per_token(gla, 8192)["mixing"]


def test_short_conv_is_causal_and_has_no_recurrent_step():
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    for cls, cfg in ((GLAForCausalLM, GLAConfig), (TransformerForCausalLM, TransformerConfig)):
        model = cls(cfg(vocab_size=20, d_model=32, n_layers=2, num_heads=2, short_conv=4)).eval()
        ids = torch.randint(0, 20, (2, 12))
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 20
        a, b = model(ids), model(changed)
        assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)  # the future does not leak back
        assert not torch.allclose(a[:, 7:], b[:, 7:])
        # the convolution takes part: another kernel changes the output
        with torch.no_grad():
            model.blocks[0].conv.weight.normal_()
        assert not torch.allclose(model(ids), a)
    with pytest.raises(NotImplementedError, match="short_conv"):
        model = GLAForCausalLM(GLAConfig(vocab_size=20, d_model=32, n_layers=1, num_heads=2, short_conv=3))
        model.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="short_conv must be an int >= 0"):
        GLAConfig(short_conv=-1)
