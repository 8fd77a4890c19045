"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"; the GLA paper's Fig. 4) — chapter 10.

A sequence first lists key-value pairs, then asks for some of the keys again; at each query the model
must produce the value that was paired with that key:

    k1 v1 k2 v2 ... kn vn | . . k2 v2 . k1 v1 . . kn vn .
                            queries: predict v2 after k2, v1 after k1, ...

Token ids: 0 is the filler ".", keys come from [1, vocab_size // 2), values from
[vocab_size // 2, vocab_size). Keys are distinct within a sequence, values may repeat. Targets are the
next-token labels, set only at the query positions (elsewhere IGNORE = -100, PyTorch's
cross-entropy default), so accuracy counts the queried positions only.

What stands between the queries: ``filler="zero"`` keeps the filler token 0 there (the layout as
printed above); ``filler="random"`` replaces every filler by a token drawn uniformly from the whole
vocabulary, as Zoology's generator does (``random_non_queries``). The difference matters to a linear
mixer (chapter 10): every position writes k_t^T v_t into the state, and a single repeated filler
writes the *same* outer product dozens of times, a component that outgrows the one pair a query
needs; after the layer's per-head normalisation it drowns that pair and the gradient that would
remove it (softmax attention simply looks past it). Random tokens write unrelated products instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
FILLER = 0
FILLERS = ("zero", "random")


@dataclass
class MQARBatch:
    """inputs, targets: [B, seq_len] int64; keys, values: [B, num_pairs]; query_positions: [B, num_queries]."""

    inputs: torch.Tensor
    targets: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_positions: torch.Tensor


def mqar_batch(
    batch_size: int,
    seq_len: int = 256,
    num_pairs: int = 16,
    vocab_size: int = 8192,
    num_queries: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    filler: str = "zero",
) -> MQARBatch:
    """A seeded batch of MQAR sequences (chapter 10).

    Args:
        batch_size: B;  seq_len: total tokens per sequence (>= 4 * num_pairs: pairs, then queries with
            their answers);  num_pairs: key-value pairs shown;  vocab_size: token ids in [0, vocab_size);
        num_queries: keys asked again (default num_pairs; each pair at most once);
        seed / generator: randomness (a seed gives the same batch every time);
        filler: "zero" (the token 0 between the queries) or "random" (a uniformly random token of the
            vocabulary at each such position, Zoology's protocol).
    Returns:
        MQARBatch with inputs/targets [B, seq_len]; the value of a query key is the target at the
        query's position and the next input token.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_pairs", num_pairs),
                        ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    num_queries = num_pairs if num_queries is None else num_queries
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must be in [1, num_pairs = {num_pairs}], got {num_queries}")
    num_keys = vocab_size // 2 - 1
    if num_keys < num_pairs:
        raise ValueError(f"vocab_size must give at least num_pairs = {num_pairs} distinct keys "
                         f"(vocab_size // 2 - 1 of them), got vocab_size = {vocab_size}")
    if seq_len < 2 * num_pairs + 2 * num_queries:
        raise ValueError(f"seq_len must be >= 2 * num_pairs + 2 * num_queries = "
                         f"{2 * num_pairs + 2 * num_queries}, got {seq_len}")
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    B, n = batch_size, num_pairs
    # The n smallest of num_keys uniform draws, in ascending order of draw: a uniformly random ordered
    # subset (the same subset as argsort(...)[:, :n], at a fraction of the cost for a large vocabulary).
    keys = torch.rand(B, num_keys, generator=generator).topk(n, dim=1, largest=False, sorted=True).indices + 1
    values = torch.randint(vocab_size // 2, vocab_size, (B, n), generator=generator)
    # Queries: which pairs are asked (each at most once), and at which slots after the pairs.
    # A query takes two positions (key, then its value), so slots are pairs of positions.
    asked = torch.argsort(torch.rand(B, n, generator=generator), dim=1)[:, :num_queries]
    free_slots = (seq_len - 2 * n) // 2
    slots = torch.argsort(torch.rand(B, free_slots, generator=generator), dim=1)[:, :num_queries].sort(dim=1).values
    inputs, targets = mqar_layout(keys, values, asked, slots, seq_len)
    positions = 2 * n + 2 * slots  # [B, num_queries]
    if filler == "random":
        noise = torch.randint(0, vocab_size, inputs.shape, generator=generator)
        inputs = torch.where(inputs == FILLER, noise, inputs)
    return MQARBatch(inputs=inputs, targets=targets, keys=keys, values=values, query_positions=positions)


def mqar_layout(keys: torch.Tensor, values: torch.Tensor, asked: torch.Tensor, slots: torch.Tensor,
                seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out MQAR sequences from their random choices (chapter 10; exercise 10.1).

    Args:
        keys, values: [B, n] int64, the pairs, shown first as k1 v1 k2 v2 ... kn vn (positions 0 .. 2n-1).
        asked: [B, q] int64, which pairs are queried (indices into the n pairs), in the order asked.
        slots: [B, q] int64, increasing; query j takes positions p = 2n + 2·slots[j] (its key) and p + 1
            (its value), so slots index the 2-token places after the pairs.
        seq_len: T; every other position holds the filler 0.
    Returns:
        (inputs [B, T], targets [B, T]) int64: targets[p] = the asked value at each query key's position
        p, IGNORE (-100) everywhere else.
    """
    B, n = keys.shape
    inputs = torch.full((B, seq_len), FILLER, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    positions = 2 * n + 2 * slots
    rows = torch.arange(B)[:, None]
    query_keys, query_values = keys[rows, asked], values[rows, asked]
    inputs[rows, positions] = query_keys
    inputs[rows, positions + 1] = query_values
    targets[rows, positions] = query_values
    return inputs, targets


def mqar_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of queried positions whose argmax prediction is the right value (chapter 10).

    Args: logits [B, T, vocab];  targets [B, T] with IGNORE (-100) where nothing is asked.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits [B, T, vocab] and targets [B, T] must agree in B, T, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    asked = targets != IGNORE
    if not bool(asked.any()):
        raise ValueError("targets has no queried position (every entry is IGNORE = -100)")
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()
