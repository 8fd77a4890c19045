"""Tiny Shakespeare, a character tokenizer and batches (chapter 9).

The corpus is 1,115,394 characters of Shakespeare (char-rnn's Tiny Shakespeare, public domain) shipped in
``glalearn/assets/``. Its 65 distinct characters are the vocabulary: one token per character. The first
90% is the training split, the last 10% the validation split (the split nanoGPT reports on).

Token ids are stored as uint8 numpy arrays (65 < 256), so a split is a flat array that batches are cut
from, and a corpus can be memory-mapped.

Your own corpus (``python -m glalearn.train --data PATH``, appendix chapter 11): :func:`load_corpus` reads a
UTF-8 text file, or every file of a folder (and its subfolders; hidden names skipped) in sorted order of
their relative paths joined by :data:`FILE_SEPARATOR` (a blank line, ``"\n\n"``, between consecutive
files). It streams the bytes in blocks, never holding the text in memory, checks that they are UTF-8
without NUL bytes, and writes the token ids once to a cache file (uint8 for up to 256 symbols, uint16
beyond) that training reads through ``numpy.memmap`` — so a corpus larger than RAM works. Two tokenizers:

- ``char`` (:class:`CharTokenizer`): one token per character of the corpus's own alphabet (its distinct
  characters, sorted);
- ``byte`` (:class:`ByteTokenizer`): the 256 byte values of the UTF-8 encoding; no unknown characters.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

TRAIN_FRACTION = 0.9
FILE_SEPARATOR = "\n\n"  # between consecutive files of a --data folder
BLOCK_BYTES = 1 << 22  # corpora are read and tokenized 4 MiB at a time


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ``vocab_size`` token ids."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


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
        return ids.astype(token_dtype(self.vocab_size))

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


class ByteTokenizer:
    """One token per byte of the text's UTF-8 encoding: 256 symbols, no unknown characters (chapter 11).

    ``encode`` never fails on a str: a non-ASCII character becomes 2-4 tokens. ``decode`` turns ids back
    into bytes and decodes them as UTF-8 with ``errors="replace"``: a byte sequence that is not valid
    UTF-8 (which a sampling model can produce, e.g. half a multi-byte character) comes out as U+FFFD
    (the replacement character, '\ufffd') instead of raising.
    """

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str) -> np.ndarray:
        """text -> its UTF-8 bytes as a numpy uint8 array [number of bytes]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode(self, text: str) -> list[int]:
        """text -> list of token ids (byte values 0..255)."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """token ids (list, numpy array or tensor [T]) -> text; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for pos, i in enumerate(ids):
            if not 0 <= i < 256:
                raise ValueError(f"token id {i} at position {pos} is outside 0..255")
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


TOKENIZERS = ("char", "byte")


def tokenizer_from_dict(data: dict) -> CharTokenizer | ByteTokenizer:
    """Rebuild a tokenizer from ``to_dict()`` output (as stored in config.json)."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"])
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer kind must be one of {TOKENIZERS}, got {kind!r}")


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


# ----------------------------------------------------------------------------- your own corpus (chapter 11)
def corpus_files(path: str | Path) -> list[Path]:
    """The files ``--data PATH`` names: the file itself, or every non-hidden file under the folder, sorted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: {path} does not exist (expected a UTF-8 text file or a folder of them)")
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted((p for p in path.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not found:
            raise ValueError(f"--data: the folder {path} holds no files (expected UTF-8 text files)")
    else:
        raise ValueError(f"--data: {path} is neither a file nor a folder")
    return found


def _blocks(files_: list[Path], block_bytes: int | None = None):
    """(file, byte offset in it, bytes) blocks of every file, each file checked to be non-empty UTF-8 text.

    The separator's bytes come as a block of their own (file None) between consecutive files.
    """
    sep = FILE_SEPARATOR.encode("utf-8")
    for n, f in enumerate(files_):
        if f.stat().st_size == 0:
            raise ValueError(f"--data: {f} is empty (expected UTF-8 text)")
        if n:
            yield None, 0, sep
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        with open(f, "rb") as fh:
            while block := fh.read(block_bytes or BLOCK_BYTES):
                nul = block.find(b"\0")
                if nul >= 0:
                    raise ValueError(f"--data: {f} is binary, not text: a NUL byte at byte offset {offset + nul}")
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    raise ValueError(f"--data: {f} is not UTF-8 text: {err.reason} near byte offset "
                                     f"{max(0, offset + err.start)} (byte 0x{err.object[err.start]:02x}); "
                                     "convert it to UTF-8 first") from None
                yield f, offset, block
                offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"--data: {f} is not UTF-8 text: it ends inside a multi-byte character") from None


def _fingerprint(files_: list[Path], kind: str) -> str:
    h = hashlib.sha256(f"glalearn-corpus-v1 {kind} {FILE_SEPARATOR!r}".encode())
    for f in files_:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Corpus:
    """A tokenized corpus on disk (chapter 11): the tokenizer and the token ids as a read-only memmap."""

    tokenizer: CharTokenizer | ByteTokenizer
    ids: np.memmap
    cache: Path  # the token file
    files: list[Path]

    def splits(self, train_fraction: float = TRAIN_FRACTION) -> tuple[np.memmap, np.memmap]:
        """(train, validation) memmaps: the first 90% of the tokens and the last 10%, as for Tiny Shakespeare."""
        return split_ids(self.ids, train_fraction)

    def describe(self) -> dict:
        return {"files": len(self.files), "tokens": len(self.ids), "tokenizer": self.tokenizer.kind,
                "vocab_size": self.tokenizer.vocab_size, "cache": self.cache.name,
                "dtype": str(self.ids.dtype)}


def load_corpus(path: str | Path, tokenizer: str = "char", cache_dir: str | Path | None = None) -> Corpus:
    """Tokenize ``path`` (a UTF-8 file or a folder of them) once into ``cache_dir`` and memory-map it (chapter 11).

    The cache file is named by a fingerprint of the files (paths, sizes, modification times) and the
    tokenizer, so a later call (a resumed run, another rank) reuses it and an edited corpus is tokenized
    anew. Its JSON sidecar records the token file's size and SHA-256: a cache that does not match them
    (truncated, overwritten, damaged) is reported on stderr and rebuilt. ``cache_dir`` defaults to a ``.glalearn-cache`` folder beside ``path``. Raises FileNotFoundError
    for a missing path and ValueError for an empty file or folder, a binary or non-UTF-8 file.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    files_ = corpus_files(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(path).resolve().parent / ".glalearn-cache"
    key = _fingerprint(files_, tokenizer)
    meta_path = cache_dir / f"corpus-{key}.json"
    if meta_path.exists():
        meta, problem = _check_cache(meta_path)
        if problem is None:
            return _open(meta, cache_dir / meta["tokens_file"], files_)
        print(f"--data: the token cache {meta_path.with_suffix('')}.* is {problem}; tokenizing the corpus again",
              file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "byte":
        tok: CharTokenizer | ByteTokenizer = ByteTokenizer()
    else:  # first pass: the alphabet (and every check)
        alphabet: set[str] = set()
        decoder = None
        for _, offset, block in _blocks(files_):
            if offset == 0:
                decoder = codecs.getincrementaldecoder("utf-8")()
            alphabet.update(decoder.decode(block))
        tok = CharTokenizer("".join(sorted(alphabet)))
    dtype = token_dtype(tok.vocab_size)
    tok_path = cache_dir / f"corpus-{key}.{dtype.name}"
    tmp = tok_path.with_name(f"{tok_path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as out:
            decoder = None
            for _, offset, block in _blocks(files_):
                if tokenizer == "byte":
                    ids = np.frombuffer(block, dtype=np.uint8)
                else:
                    if offset == 0:
                        decoder = codecs.getincrementaldecoder("utf-8")()
                    ids = tok.encode_array(decoder.decode(block))
                out.write(ids.astype(dtype, copy=False).tobytes())
                count += len(ids)
        os.replace(tmp, tok_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"tokens_file": tok_path.name, "tokens": count, "dtype": dtype.name, "tokenizer": tok.to_dict(),
            "files": [str(f) for f in files_], "separator": FILE_SEPARATOR,
            "bytes": tok_path.stat().st_size, "sha256": _sha256(tok_path)}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return _open(meta, tok_path, files_)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def _check_cache(meta_path: Path) -> tuple[dict | None, str | None]:
    """(metadata, None) when the cached token file is intact, else (None, what is wrong with it).

    Intact means: the JSON sidecar parses and names a tokenizer, and the token file has the size
    and the SHA-256 the sidecar recorded when it was written (a truncated, overwritten or bit-flipped
    file is tokenized anew, never read as token ids).
    """
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tok_path = meta_path.parent / meta["tokens_file"]
        expected = int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize
        tokenizer_from_dict(meta["tokenizer"])
        recorded_bytes, recorded_hash = meta["bytes"], meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable ({type(err).__name__}: {err})"
    if not tok_path.is_file():
        return None, f"incomplete ({tok_path.name} is missing)"
    size = tok_path.stat().st_size
    if size != recorded_bytes or size != expected:
        return None, f"corrupt ({tok_path.name} is {size:,} bytes, its metadata says {recorded_bytes:,})"
    if _sha256(tok_path) != recorded_hash:
        return None, f"corrupt ({tok_path.name} does not match the SHA-256 in its metadata)"
    return meta, None


def _open(meta: dict, tok_path: Path, files_: list[Path]) -> Corpus:
    ids = np.memmap(tok_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))
    return Corpus(tokenizer_from_dict(meta["tokenizer"]), ids, tok_path, files_)
