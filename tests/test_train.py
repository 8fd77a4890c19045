"""Training (chapter 9): the loss goes down, checkpoints round-trip, resume is exact, the tokenizer is strict."""

import itertools
import json

import numpy as np
import pytest
import torch

from glalearn.data import CharTokenizer, eval_windows, sample_batch, shakespeare_splits, shakespeare_tokenizer
from glalearn.train import PRESETS, learning_rate, load_checkpoint, main, preset, save_checkpoint, train

SMALL = {"d_model": 32, "n_layers": 2, "num_heads": 2, "ffn_hidden": 64, "context_length": 32}


def _cfg(name="tiny-cpu", **kw):
    base = {"steps": 4, "batch_size": 8, "context": 32, "eval_interval": 2, "eval_batches": 1, "log_interval": 1,
            "checkpoint_interval": 2, "warmup_steps": 2}
    base.update(kw)
    return preset(name, model=dict(SMALL), **base)


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-cpu-transformer"])
def test_a_few_steps_reduce_the_loss(tmp_path, name):
    log = train(_cfg(name, steps=30, lr=1e-2, eval_interval=30), tmp_path, progress=False)
    losses = [r["loss"] for r in log["steps"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert log["evals"][-1]["val_loss"] < 3.5  # from log(65) = 4.17
    assert all(r["tokens_per_s"] > 0 for r in log["steps"])


def test_checkpoint_round_trip(tmp_path):
    train(_cfg(), tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"train_log.json", "checkpoint-00000004"}  # the last one only
    files = {p.name for p in (tmp_path / "checkpoint-00000004").iterdir()}
    assert files == {"model.safetensors", "config.json", "train_log.json", "train_state.safetensors",
                     "train_state.json", "manifest.json"}
    model = load_checkpoint(tmp_path)
    again = tmp_path / "again"
    save_checkpoint(model, again, {"note": "re-saved"})
    ids = torch.randint(0, 65, (2, 20))
    assert torch.equal(model(ids), load_checkpoint(again)(ids))
    assert json.loads((again / "config.json").read_text())["note"] == "re-saved"
    # float16 storage: half the bytes, logits within float16 rounding of the weights
    half = tmp_path / "half"
    save_checkpoint(model, half, {}, save_dtype="float16")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (again / "model.safetensors").stat().st_size
    assert (load_checkpoint(half)(ids) - model(ids)).abs().max() < 1e-2


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-cpu-transformer"])
def test_resume_continues_exactly(tmp_path, name):
    straight = train(_cfg(name, steps=4), tmp_path / "a", progress=False)
    cfg = _cfg(name, steps=2)
    train(cfg, tmp_path / "b", progress=False)
    resumed = train(_cfg(name, steps=4), tmp_path / "b", resume=True, progress=False)
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx([r["loss"] for r in straight["steps"]], abs=1e-5)
    assert resumed["resumed_at"] == [2]
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (p - q).abs().max() < 1e-5, n


def test_learning_rate_schedule():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1e-3)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] >= 1e-4 and lrs[-1] < 1.1e-4


def test_presets_shipped_pair_share_the_budget():
    a, b = PRESETS["shakespeare-gla"], PRESETS["shakespeare-transformer"]
    assert (a.steps, a.batch_size, a.context) == (b.steps, b.batch_size, b.context)
    assert a.model["model_type"] == "gla" and b.model["model_type"] == "transformer"
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("huge")


def test_cli_trains_and_writes_a_checkpoint(tmp_path, capsys):
    main(["--preset", "tiny-cpu", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
          "--eval-interval", "2", "--no-progress"])
    assert "final validation loss" in capsys.readouterr().out
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [r["step"] for r in log["steps"]] == [0, 1] and log["preset"] == "tiny-cpu"


def test_batches_depend_only_on_seed_and_step():
    train_ids, _ = shakespeare_splits()
    x1, y1 = sample_batch(train_ids, 6, 16, torch.Generator().manual_seed(5))
    x2, _ = sample_batch(train_ids, 6, 16, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    # a rank's rows of the global batch are exactly those rows
    xr, _ = sample_batch(train_ids, 6, 16, torch.Generator().manual_seed(5), rows=slice(3, 6))
    assert torch.equal(xr, x1[3:])


def test_tokenizer_and_split():
    tok = shakespeare_tokenizer()
    assert tok.vocab_size == 65
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tok.decode(tok.encode(text)) == text
    train_ids, val_ids = shakespeare_splits()
    assert (len(train_ids), len(val_ids)) == (1_003_854, 111_540)
    with pytest.raises(ValueError, match=r"character '€' \(U\+20AC\) at position 4"):
        tok.encode("good€ morning")
    with pytest.raises(ValueError, match="character '1' .* at position 5"):
        tok.encode("line 13")
    with pytest.raises(ValueError, match="token id 65 at position 1"):
        tok.decode([3, 65])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aab")


def test_eval_windows_cover_every_token_once():
    ids = np.arange(1000) % 65
    for C in [1, 7, 256, 999, 4096]:
        windows = eval_windows(ids, C)
        targets = [i for s, n in windows for i in range(s + 1, s + n + 1)]
        assert targets == list(range(1, 1000))
        assert all(n <= C for _, n in windows)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = train(_cfg(steps=3), tmp_path / "one", progress=False)
    acc = train(_cfg(steps=3, accum_steps=2), tmp_path / "acc", progress=False)
    assert [r["loss"] for r in acc["steps"]] == pytest.approx([r["loss"] for r in one["steps"]], abs=1e-5)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    """Issue 9: DDP with gloo on CPU, each rank its rows of the global batch, = one process."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    args = ["-m", "glalearn.train", "--preset", "tiny-cpu", "--steps", "3", "--batch-size", "4",
            "--eval-interval", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", *args, "--out", str(tmp_path / "two")], check=True,
                   env=env, capture_output=True, timeout=600)
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=600)
    two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    one = json.loads((tmp_path / "one" / "train_log.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [r["loss"] for r in two["steps"]] == pytest.approx([r["loss"] for r in one["steps"]], abs=1e-5)
    a, b = load_checkpoint(tmp_path / "two"), load_checkpoint(tmp_path / "one")  # written by rank 0, loads in one
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (p - q).abs().max() < 1e-5, name


# ----------------------------------------------------------------------------- issue 9: your own corpus, FSDP2


def _corpus_text(seed: int, n_words: int = 1500) -> str:
    import random

    rng = random.Random(seed)
    words = ["der", "Bär", "café", "naïve", "東京", "λόγος", "tree", "river", "🙂", "and", "the", "\n"]
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.mark.parametrize(("source", "kind"), [("one.txt", "char"), ("many", "byte")])
def test_train_on_own_corpus_file_and_folder(tmp_path, monkeypatch, source, kind, one_thread):
    """--data on a file and on a folder: memmapped tokens, the vocabulary of the tokenizer, restorable.
    (tests/test_data.py tokenizes files and folders with both tokenizers.)"""
    import glalearn.train as train_mod
    from glalearn.data import ByteTokenizer, CharTokenizer, sample_batch

    seen = []

    def spy(ids, *args, **kwargs):
        seen.append(type(ids))
        return sample_batch(ids, *args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_batch", spy)
    text = _corpus_text(7)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    (tmp_path / "many" / "sub").mkdir(parents=True)
    (tmp_path / "many" / "b.txt").write_text(text[:3000], encoding="utf-8")
    (tmp_path / "many" / "sub" / "a.txt").write_text(text[3000:], encoding="utf-8")
    out = tmp_path / "run"
    log = train(_cfg(steps=2, data=str(tmp_path / source), tokenizer=kind), out, progress=False)
    assert seen and all(t is np.memmap for t in seen)  # training and validation windows come from the memmap
    vocab = 256 if kind == "byte" else len(set(text))
    assert log["data"]["vocab_size"] == vocab and log["train_config"]["model"]["vocab_size"] == vocab
    assert log["data"]["files"] == (1 if source == "one.txt" else 2)
    assert log["data"]["tokens"] == (len(text) if kind == "char" else len(text.encode()) + 2)  # + the separator
    assert (out / "data_cache" / log["data"]["cache"]).is_file()
    model = load_checkpoint(out)  # the tokenizer comes back from config.json
    assert isinstance(model.tokenizer, ByteTokenizer if kind == "byte" else CharTokenizer)
    assert model.config.vocab_size == vocab
    prompt = torch.tensor([model.tokenizer.encode("der Bär ")])
    sample = model.tokenizer.decode(model.generate(prompt, 12, seed=3)[0])
    assert sample.startswith("der Bär ")


def test_own_corpus_errors_name_the_argument(tmp_path, one_thread):
    (tmp_path / "short.txt").write_text("too short for a window of 32 " * 5, encoding="utf-8")
    with pytest.raises(ValueError, match=r"--data: the corpus .*short.txt is 145 tokens .*too short for one context "
                                         r"window: its validation split \(the last 10%\) holds 15 tokens, fewer "
                                         r"than --context \+ 1 = 33"):
        train(_cfg(data=str(tmp_path / "short.txt")), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="--data: .*missing.txt does not exist"):
        train(_cfg(data=str(tmp_path / "missing.txt")), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"--tokenizer must be one of \('char', 'byte'\), got 'word'"):
        train(_cfg(tokenizer="word"), tmp_path / "run", progress=False)
    (tmp_path / "a.txt").write_text(_corpus_text(1), encoding="utf-8")
    train(_cfg(steps=2, data=str(tmp_path / "a.txt")), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="--resume: the checkpoint .* different tokenizer"):
        train(_cfg(steps=4, data=str(tmp_path / "a.txt"), tokenizer="byte"), tmp_path / "a", resume=True,
              progress=False)


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process_and_checkpoints_round_trip(tmp_path, one_thread):
    """FSDP2 (fully_shard per block) with gloo on CPU: 2 ranks resume a 1-process checkpoint, accumulate 2
    micro-batches each, and write a checkpoint that one process loads and resumes: every loss and weight
    equals an uninterrupted single-process run with the same effective batch."""
    import os
    import subprocess
    import sys

    common = {"steps": 4, "batch_size": 8, "context": 32, "eval_interval": 4, "warmup_steps": 50,
              "checkpoint_interval": 250}
    straight = train(preset("tiny-cpu", **{**common, "steps": 5}), tmp_path / "straight", progress=False)
    train(preset("tiny-cpu", **{**common, "steps": 2}), tmp_path / "run", progress=False)  # 1 process: steps 0-1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "glalearn.train", "--preset", "tiny-cpu", "--out", str(tmp_path / "run"), "--steps", "4",
                           "--batch-size", "8", "--accum-steps", "2", "--context", "32", "--eval-interval", "4",
                           "--fsdp", "--resume", "--no-progress"], check=False, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["parallel"] == "fsdp2" and log["world_size"] == 2 and log["resumed_at"] == [2]
    files = {p.name for p in (tmp_path / "run" / "checkpoint-00000004").iterdir()}
    assert {"model.safetensors", "config.json", "train_state.safetensors", "manifest.json"} <= files
    assert not any(name.endswith((".pt", ".pth", ".bin", ".distcp")) for name in files)
    # the FSDP-written checkpoint is the full model and loads in one process
    fsdp_model = load_checkpoint(tmp_path / "run")
    assert fsdp_model.num_parameters() == straight["parameters"]
    resumed = train(preset("tiny-cpu", **{**common, "steps": 5}), tmp_path / "run", resume=True, progress=False)
    assert resumed["resumed_at"] == [2, 4] and resumed["parallel"] == "none"
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx([r["loss"] for r in straight["steps"]], abs=1e-5)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (p - q).abs().max() < 1e-5, name
