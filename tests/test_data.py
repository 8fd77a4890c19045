"""Your own corpus (issue 9, chapter 11): --data files and folders, the byte tokenizer, the memmapped cache."""

import random

import numpy as np
import pytest
import torch

from glalearn import data
from glalearn.data import FILE_SEPARATOR, ByteTokenizer, CharTokenizer, load_corpus, tokenizer_from_dict

WORDS = ["der", "Bär", "café", "naïve", "東京", "λόγος", "tree", "river", "🙂", "and", "the", "\n"]


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def test_byte_tokenizer_round_trips_any_text_and_replaces_invalid_bytes():
    tok = ByteTokenizer()
    for text in [_text(200, s) for s in range(3)] + ["", "a", "\x00 nul and \U0010ffff", "ASCII only."]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.encode("é") == [0xC3, 0xA9]  # one character, two tokens
    # half of a multi-byte character (what a sampling model can produce): U+FFFD, no exception
    assert tok.decode([0x61, 0xC3]) == "a\ufffd"
    assert tok.decode([0xFF, 0x62]) == "\ufffdb"
    with pytest.raises(ValueError, match="token id 256 at position 1 is outside 0..255"):
        tok.decode([1, 256])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    assert isinstance(tokenizer_from_dict(tok.to_dict()), ByteTokenizer)
    with pytest.raises(ValueError, match="tokenizer kind must be one of"):
        tokenizer_from_dict({"kind": "bpe"})


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_file_is_tokenized_in_blocks_into_a_memmap(tmp_path, monkeypatch, kind):
    text = _text(3000, 1)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "BLOCK_BYTES", 7)  # multi-byte characters straddle the blocks
    corpus = load_corpus(tmp_path / "corpus.txt", kind, tmp_path / "cache")
    assert isinstance(corpus.ids, np.memmap) and corpus.ids.dtype == np.uint8
    expected = (CharTokenizer.from_text(text) if kind == "char" else ByteTokenizer()).encode_array(text)
    assert np.array_equal(np.asarray(corpus.ids), expected)
    assert corpus.tokenizer.decode(corpus.ids[:500]) == (text[:500] if kind == "char" else
                                                         text.encode()[:500].decode("utf-8", "replace"))
    train_ids, val_ids = corpus.splits()
    assert isinstance(train_ids, np.memmap) and isinstance(val_ids, np.memmap)
    assert len(train_ids) == int(0.9 * len(expected)) and len(train_ids) + len(val_ids) == len(expected)
    # cached: a second call reuses the token file, an edited corpus is tokenized anew
    mtime = corpus.cache.stat().st_mtime_ns
    assert load_corpus(tmp_path / "corpus.txt", kind, tmp_path / "cache").cache.stat().st_mtime_ns == mtime
    (tmp_path / "corpus.txt").write_text(text + " extra", encoding="utf-8")
    again = load_corpus(tmp_path / "corpus.txt", kind, tmp_path / "cache")
    assert again.cache != corpus.cache and len(again.ids) > len(corpus.ids)


def test_folder_is_sorted_and_joined_by_the_separator(tmp_path):
    parts = {"b.txt": _text(50, 2), "a/z.md": _text(40, 3), "c.txt": "Zürich 🙂"}
    for name, text in parts.items():
        (tmp_path / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / name).write_text(text, encoding="utf-8")
    (tmp_path / "docs" / ".hidden").write_bytes(b"\x00\xff not read")
    joined = FILE_SEPARATOR.join(parts[n] for n in ["a/z.md", "b.txt", "c.txt"])
    for kind in ["char", "byte"]:
        corpus = load_corpus(tmp_path / "docs", kind, tmp_path / "cache")
        assert [f.name for f in corpus.files] == ["z.md", "b.txt", "c.txt"]
        assert corpus.tokenizer.decode(np.asarray(corpus.ids)) == joined
    assert load_corpus(tmp_path / "docs", "char", tmp_path / "cache").tokenizer.chars == "".join(sorted(set(joined)))


def test_bad_corpora_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data: .*nowhere.txt does not exist"):
        load_corpus(tmp_path / "nowhere.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--data: .*empty.txt is empty"):
        load_corpus(tmp_path / "empty.txt", cache_dir=tmp_path / "c")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"--data: the folder .*nothing holds no files"):
        load_corpus(tmp_path / "nothing", cache_dir=tmp_path / "c")
    (tmp_path / "nul.txt").write_bytes(b"hello\x00world")
    with pytest.raises(ValueError, match=r"nul.txt is binary, not text: a NUL byte at byte offset 5"):
        load_corpus(tmp_path / "nul.txt", "byte", cache_dir=tmp_path / "c")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: .* byte offset 3 \(byte 0xe9\)"):
        load_corpus(tmp_path / "latin1.txt", "char", cache_dir=tmp_path / "c")
    (tmp_path / "cut.txt").write_bytes("naïve 東".encode()[:-1])
    with pytest.raises(ValueError, match=r"cut.txt is not UTF-8 text: it ends inside a multi-byte character"):
        load_corpus(tmp_path / "cut.txt", "byte", cache_dir=tmp_path / "c")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "mixed" / "b.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"b.bin is binary"):
        load_corpus(tmp_path / "mixed", "char", cache_dir=tmp_path / "c")
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--tokenizer must be one of \('char', 'byte'\), got 'bpe'"):
        load_corpus(tmp_path / "ok.txt", "bpe")
    assert not list((tmp_path / "c").glob("*.tmp"))  # nothing half-written left behind
