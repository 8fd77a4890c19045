"""The shipped models (chapter 9): ``glalearn.load_pretrained("shakespeare-gla")``.

Two character-level models trained on Tiny Shakespeare with the same budget on one GPU — a GLA and its
Transformer++ baseline — ship as package data under ``glalearn/assets/checkpoints/<name>/``:

    model.safetensors   the weights (stored in float16 to keep the repository lean; loaded as float32)
    config.json         the model and tokenizer configuration, the training configuration, the
                        validation loss on a fixed slice measured when it was exported
    train_log.json      the loss, learning rate and throughput of every training step

Nothing is downloaded. A corrupt or truncated file, or weights that are not finite, is an error that
names the file (and the tensor).
"""

from __future__ import annotations

import json
from importlib.resources import as_file, files
from pathlib import Path

import torch

from glalearn.model import CausalLM

PRETRAINED = ("shakespeare-gla", "shakespeare-transformer")


def checkpoint_dir(name: str) -> Path:
    """The folder of a shipped checkpoint inside the installed package."""
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {PRETRAINED}, got {name!r}")
    with as_file(files("glalearn") / "assets" / "checkpoints" / name) as path:
        return Path(path)


def load_from_dir(path: str | Path, device: str | torch.device = "cpu") -> CausalLM:
    """Load model.safetensors + config.json from ``path`` (or a training run's latest checkpoint) with
    clear errors naming the missing or damaged file: the loader of ``glalearn.train.load_checkpoint``."""
    from glalearn.train import load_checkpoint

    return load_checkpoint(path, device)


def load_pretrained(name: str, device: str | torch.device = "cpu") -> CausalLM:
    """A shipped model in eval mode with ``.tokenizer`` attached (chapter 9).

    Args: name: "shakespeare-gla" or "shakespeare-transformer";  device: where to put it.
    Returns: GLAForCausalLM or TransformerForCausalLM; forward(input_ids [B, T]) -> logits [B, T, 65].
    """
    model = load_from_dir(checkpoint_dir(name), device)
    model.pretrained_name = name
    return model


def training_log(name: str) -> dict:
    """The shipped model's train_log.json: per-step loss and throughput, validation evals, config."""
    return json.loads((checkpoint_dir(name) / "train_log.json").read_text())


def stated_metrics(name: str) -> dict:
    """What the export measured and recorded in config.json (e.g. the validation loss on a fixed slice)."""
    return json.loads((checkpoint_dir(name) / "config.json").read_text()).get("metrics", {})
