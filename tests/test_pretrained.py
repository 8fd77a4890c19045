"""The shipped models (chapter 9): they load, reach their stated loss, decode recurrently, fail clearly."""

import json
import shutil

import pytest
import torch

import glalearn
from glalearn.data import shakespeare_splits
from glalearn.evaluate import validation_loss
from glalearn.model import GLAForCausalLM, TransformerForCausalLM
from glalearn.pretrained import PRETRAINED, checkpoint_dir, load_from_dir, load_pretrained, stated_metrics


@pytest.fixture(scope="module")
def models():
    return {name: glalearn.load_pretrained(name) for name in PRETRAINED}


def test_shipped_files_are_small_and_pickle_free():
    for name in PRETRAINED:
        folder = checkpoint_dir(name)
        names = {p.name for p in folder.iterdir()}
        assert names == {"model.safetensors", "config.json", "train_log.json"}
        assert (folder / "model.safetensors").stat().st_size <= 12_000_000


def test_they_load_in_eval_mode_with_a_tokenizer(models):
    gla, tr = models["shakespeare-gla"], models["shakespeare-transformer"]
    assert isinstance(gla, GLAForCausalLM) and isinstance(tr, TransformerForCausalLM)
    for m in (gla, tr):
        assert not m.training and m.tokenizer.vocab_size == 65
        assert m.num_parameters() <= 5_000_000
    assert abs(gla.num_parameters() - tr.num_parameters()) / tr.num_parameters() < 0.10


@pytest.mark.parametrize("name", PRETRAINED)
def test_they_reach_their_stated_validation_loss(models, name):
    _, val = shakespeare_splits()
    metrics = stated_metrics(name)
    loss = validation_loss(models[name], val, 256, max_windows=8)
    assert loss == pytest.approx(metrics["val_loss_slice"], abs=2e-4)


def test_gla_targets_as_recorded():
    gla, tr = stated_metrics("shakespeare-gla"), stated_metrics("shakespeare-transformer")
    assert gla["val_loss_by_context"]["256"] <= 1.52
    assert gla["val_loss_by_context"]["256"] <= tr["val_loss_by_context"]["256"] + 0.03
    for C in ("4096", "8192"):
        assert gla["val_loss_by_context"][C] <= gla["val_loss_by_context"]["256"] + 0.02


def test_recurrent_decoding_of_the_shipped_gla_equals_parallel(models):
    gla = models["shakespeare-gla"]
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ids = torch.tensor([gla.tokenizer.encode(text)])
    parallel = gla(ids)
    states, worst = None, 0.0
    for t in range(ids.shape[1]):
        logits, states = gla.step(ids[:, t], states)
        worst = max(worst, (logits - parallel[:, t]).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("name", PRETRAINED)
def test_generation_is_deterministic_and_readable(models, name):
    m = models[name]
    prompt = torch.tensor([m.tokenizer.encode("KING HENRY:\n")])
    a = m.generate(prompt, 60, temperature=0.8, top_k=20, seed=7)
    assert torch.equal(a, m.generate(prompt, 60, temperature=0.8, top_k=20, seed=7))
    text = m.tokenizer.decode(a[0])
    assert text.startswith("KING HENRY:\n") and len(text) == 72


def test_corrupt_or_truncated_checkpoints_fail_clearly(tmp_path):
    src = checkpoint_dir("shakespeare-gla")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_from_dir(bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_from_dir(bad)
    shutil.copy(src / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="config.json is corrupt"):
        load_from_dir(bad)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model"]["d_model"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config"):
        load_from_dir(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_from_dir(bad)
    with pytest.raises(ValueError, match="name must be one of"):
        load_pretrained("shakespeare-mamba")
