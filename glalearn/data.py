"""Tiny Shakespeare, a character tokenizer and batches (chapter 9).

The corpus is 1,115,394 characters of Shakespeare (char-rnn's Tiny Shakespeare, public domain) shipped in
``glalearn/assets/``. Its 65 distinct characters are the vocabulary: one token per character. The first
90% is the training split, the last 10% the validation split (the split nanoGPT reports on).

Token ids are stored as uint8 numpy arrays (65 < 256), so a split is a flat array that batches are cut
from, and a corpus can be memory-mapped.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np
import torch

TRAIN_FRACTION = 0.9


def corpus_text() -> str:
    """The Tiny Shakespeare corpus (1,115,394 characters) from the package data."""
    return (files("glalearn") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")


class CharTokenizer:
    """One token per character of a fixed alphabet (chapter 9).

    ``encode(text) -> list[int]``, ``decode(ids) -> str``. A character outside the alphabet is an error
    that names it and its position: the model has no embedding for it.
    """

    kind = "char"

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("chars must be a non-empty string of distinct characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._lookup = np.full(0x110000 if max(map(ord, chars)) >= 256 else 256, -1, dtype=np.int64)
        for i, c in enumerate(chars):
            self._lookup[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The alphabet of ``text``: its distinct characters, sorted."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        """text -> token ids as a numpy uint8 array [len(text)] (uint16 for alphabets over 256)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lookup), self._lookup[np.minimum(codes, len(self._lookup) - 1)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            pos = int(bad[0])
            raise ValueError(
                f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} is not in the tokenizer's "
                f"{self.vocab_size}-character alphabet; remove or replace it"
            )
        return ids.astype(np.uint8 if self.vocab_size <= 256 else np.uint16)

    def encode(self, text: str) -> list[int]:
        """text -> list of token ids."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """token ids (list, numpy array or tensor [T]) -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for pos, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} at position {pos} is outside 0..{self.vocab_size - 1}")
            out.append(self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(data: dict) -> CharTokenizer:
    """Rebuild a tokenizer from ``to_dict()`` output (as stored in config.json)."""
    if data.get("kind") != "char":
        raise ValueError(f"tokenizer kind must be 'char', got {data.get('kind')!r}")
    return CharTokenizer(data["chars"])


@lru_cache(maxsize=1)
def shakespeare_tokenizer() -> CharTokenizer:
    """The 65-character tokenizer of Tiny Shakespeare."""
    return CharTokenizer.from_text(corpus_text())


@lru_cache(maxsize=1)
def _shakespeare_ids() -> np.ndarray:
    return shakespeare_tokenizer().encode_array(corpus_text())


def split_ids(ids: np.ndarray, train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the first ``train_fraction`` of the tokens and the rest."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def shakespeare_splits() -> tuple[np.ndarray, np.ndarray]:
    """Token ids of Tiny Shakespeare's train (first 90%, 1,003,854) and validation (last 10%, 111,540) splits."""
    return split_ids(_shakespeare_ids())


def sample_batch(ids: np.ndarray, batch_size: int, context: int, generator: torch.Generator,
                 device: str | torch.device = "cpu", rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows: (inputs [B, context], targets [B, context], shifted by one) (chapter 9).

    The offsets come from ``generator``; ``rows`` takes a slice of the batch (each data-parallel rank
    its own share of one global batch, so N ranks see exactly what one process would).
    """
    if len(ids) < context + 1:
        raise ValueError(f"the token array holds {len(ids)} tokens, fewer than context + 1 = {context + 1}")
    starts = torch.randint(0, len(ids) - context, (batch_size,), generator=generator)
    if rows is not None:
        starts = starts[rows]
    window = np.stack([np.asarray(ids[s:s + context + 1]) for s in starts.tolist()]).astype(np.int64)
    window = torch.from_numpy(window)
    if torch.device(device).type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    return window[:, :-1], window[:, 1:]


def eval_windows(ids: np.ndarray, context: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive windows that predict every token after the first exactly once.

    Window i holds tokens [i·context, i·context + context] (context + 1 tokens, the last one shorter):
    the loss over all windows is the loss over the whole split, each token seen with up to ``context``
    tokens before it.
    """
    n = len(ids)
    return [(s, min(context, n - 1 - s)) for s in range(0, n - 1, context)]
