"""Train a character-level GLA or Transformer++ on Tiny Shakespeare (chapter 9).

    python -m glalearn.train --preset tiny-cpu --out runs/tiny
    python -m glalearn.train --preset shakespeare-gla --out runs/gla            # the shipped model (GPU)
    python -m glalearn.train --preset shakespeare-gla --out runs/gla --resume   # continue after a stop
    python -m glalearn.train --preset tiny-cpu --data my_texts/ --tokenizer byte --out runs/mine  # your corpus
    torchrun --standalone --nproc_per_node 8 -m glalearn.train --preset shakespeare-gla --out runs/gla8 [--fsdp]

AdamW, linear warmup then cosine decay to a tenth of the peak learning rate, gradient clipping,
validation every ``eval_interval`` steps on a fixed set of validation windows, a tqdm progress bar, and a
JSON log (``train_log.json``) of the loss, learning rate and throughput of every step. Checkpoints are
safetensors + JSON, never pickles, in one folder per checkpoint, ``OUT/checkpoint-NNNNNNNN`` (the step):

    model.safetensors    the weights (in ``save_dtype``)        + config.json (model, tokenizer, training)
    train_state.safetensors  float32 weights and AdamW moments   + train_state.json (step, ...)  for --resume
    train_log.json       the log up to that step                 + manifest.json (size and SHA-256 of each)

Each is written as one set (``glalearn.checkpoint``: a temporary folder, every file fsynced, one
rename) every ``--checkpoint-every`` steps and after the last; the previous one is removed once the
new one is in place, so a crash or a kill never leaves a half-written checkpoint. ``load_checkpoint(OUT)``
loads the latest. An OUT that already holds a run is an error unless ``--resume``, which checks the
checkpoint against its manifest and names every missing or corrupt file instead of starting over.
SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes a checkpoint, prints the command that
resumes and exits with 128 + the signal's number, as a shell reports a process that a signal stopped:
130 for SIGINT, 143 for SIGTERM, so a supervisor can tell a Ctrl-C from a kill. A second signal
interrupts at once (the latest complete checkpoint stays loadable) and exits with 128 + its number.

Batches are a pure function of (seed, step): step s samples one global batch of windows from a
generator seeded with (seed, s). A resumed run therefore sees exactly the batches an uninterrupted one
would, and a data-parallel run (``torchrun``, rank r of N) takes rows r·B/N ... (r+1)·B/N of that same
global batch, so N ranks compute the gradient one process would. Logging, the progress bar
and checkpoints happen on rank 0 only. DDP by default; ``--fsdp`` shards parameters, gradients and AdamW
moments with FSDP2 (``fully_shard`` per block, then the root), and gathers the full state on rank 0's
CPU for each checkpoint, so the files are the same either way and a run resumes with any number of ranks.

``--data PATH`` trains on your own UTF-8 text (a file, or a folder joined in sorted order by a blank
line), tokenized once into a memory-mapped token file (``glalearn.data.load_corpus``; appendix chapter 11)
with ``--tokenizer char`` (the corpus's alphabet) or ``byte`` (256 UTF-8 bytes); the model's vocabulary
follows the tokenizer, which is saved in config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glalearn import checkpoint
from glalearn.clierror import OneLineParser, guarded
from glalearn.data import (
    TOKENIZERS,
    load_corpus,
    sample_batch,
    shakespeare_splits,
    shakespeare_tokenizer,
    tokenizer_from_dict,
)
from glalearn.model import CausalLM, GLAConfig, LMConfig, TransformerConfig, build_model, config_from_dict


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a training run depends on (chapter 9). ``model`` is a model config's dict."""

    model: dict
    steps: int = 1000
    batch_size: int = 64  # the global batch, in windows, split over ranks and accumulation steps
    context: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    accum_steps: int = 1
    eval_interval: int = 250
    eval_batches: int = 8  # validation windows: eval_batches × batch_size, fixed for the whole run
    log_interval: int = 10  # host-device syncs for the log happen every log_interval steps
    checkpoint_interval: int = 500
    seed: int = 1337
    device: str = "auto"
    amp_dtype: str | None = None  # "bfloat16": autocast the matmuls on a GPU
    save_dtype: str = "float32"  # dtype of model.safetensors ("float16" halves the file)
    compile: bool = False
    data: str | None = None  # your own corpus: a UTF-8 file or a folder of them (None: Tiny Shakespeare)
    tokenizer: str = "char"  # "char" (the corpus's alphabet) or "byte" (256 UTF-8 byte values)
    data_cache: str | None = None  # where the token file of ``data`` goes (None: OUT/data_cache)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard per block + root instead of DDP
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _gla(**kw) -> dict:
    return GLAConfig(**kw).to_dict()


def _transformer(**kw) -> dict:
    return TransformerConfig(**kw).to_dict()


# The shipped pair: the same shapes (d_model 256, 6 layers, 4 heads, SwiGLU 688; 4.82M vs 4.78M
# parameters) and the same budget (steps × batch × context).
SHIPPED = {"d_model": 256, "n_layers": 6, "num_heads": 4, "context_length": 256, "dropout": 0.1}
# 1200 steps × 64 × 256 = 19.7M tokens, about 20 passes over the training split. A first run of 2700 steps
# overfit both models (train loss 0.84, validation rising from 1.47 at step 1000 to 1.72; chapter 9).
SHIPPED_TRAINING = {"steps": 1200, "batch_size": 64, "context": 256, "lr": 2e-3, "warmup_steps": 100,
                    "eval_interval": 100, "eval_batches": 8, "checkpoint_interval": 400, "amp_dtype": "bfloat16",
                    "save_dtype": "float16"}

TINY = {"d_model": 128, "n_layers": 4, "num_heads": 4, "context_length": 64}
TINY_TRAINING = {"steps": 1000, "batch_size": 32, "context": 64, "lr": 3e-3, "warmup_steps": 50, "eval_interval": 100,
                 "eval_batches": 4, "checkpoint_interval": 250, "device": "cpu"}

PRESETS: dict[str, TrainConfig] = {
    "shakespeare-gla": TrainConfig(model=_gla(**SHIPPED, backend="chunk", chunk_size=16), **SHIPPED_TRAINING),
    "shakespeare-transformer": TrainConfig(model=_transformer(**SHIPPED), **SHIPPED_TRAINING),
    # A small GLA that trains on a 2-core CPU in minutes (0.8M parameters, 1000 × 32 × 64 = 2M tokens).
    # Measured: 0.28 s per step on an idle 2-core CPU (about 5 minutes in all); validation loss 1.85 at
    # step 500 and 1.76 at step 700 (a run on a heavily shared machine, where it took far longer).
    "tiny-cpu": TrainConfig(model=_gla(**TINY), **TINY_TRAINING),
    "tiny-cpu-transformer": TrainConfig(model=_transformer(**TINY), **TINY_TRAINING),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of a preset's TrainConfig with fields replaced (``model`` overrides go in ``model=dict``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    cfg = dataclasses.replace(PRESETS[name], model=dict(PRESETS[name].model))
    model_overrides = overrides.pop("model", {})
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.model.update(model_overrides)
    return cfg


# The command-line flag of each TrainConfig field, for errors in the user's words.
_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "context": "--context", "accum_steps": "--accum-steps",
          "eval_interval": "--eval-interval", "checkpoint_interval": "--checkpoint-every", "lr": "--lr",
          "seed": "--seed", "device": "--device", "tokenizer": "--tokenizer"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, f"TrainConfig.{name}")


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check every number of ``cfg`` before anything runs; ValueError names the flag, the rule and the value."""
    for name in ("steps", "batch_size", "context", "accum_steps", "eval_interval", "eval_batches", "log_interval",
                 "checkpoint_interval"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_flag(name)} must be a whole number of at least 1, got {value!r}")
    for name in ("warmup_steps", "seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{_flag(name)} must be a whole number of at least 0, got {value!r}")
    for name, low_open in (("lr", True), ("weight_decay", False), ("grad_clip", False)):
        value = getattr(cfg, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (low_open and value == 0):
            rule = "a finite number above 0" if low_open else "a finite number of at least 0"
            raise ValueError(f"{_flag(name)} must be {rule}, got {value!r}")
    if not 0 < cfg.min_lr_ratio <= 1:
        raise ValueError(f"TrainConfig.min_lr_ratio must be in (0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.batch_size % (world_size * cfg.accum_steps):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks × --accum-steps = "
                         f"{world_size} × {cfg.accum_steps}")
    if cfg.save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"TrainConfig.save_dtype must be one of {sorted(_SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if cfg.amp_dtype not in (None, "bfloat16", "float16"):
        raise ValueError(f"TrainConfig.amp_dtype must be None, 'bfloat16' or 'float16', got {cfg.amp_dtype!r}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {TOKENIZERS}, got {cfg.tokenizer!r}")


# ----------------------------------------------------------------------------- distributed hooks
@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


@contextmanager
def process_group(device: str = "auto"):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU), yield the
    :class:`Dist`, leave it at the end. In one process: yield ``Dist()`` and do nothing else."""
    dist = Dist.from_env()
    if dist.world_size > 1:
        use_cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield dist
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def resolve_device(name: str, dist: Dist) -> torch.device:
    """``--device`` as a torch.device ("auto": cuda when there is one, else cpu; cuda: this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


# ----------------------------------------------------------------------------- schedule
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr·min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms, biases or the gate's bias).

    ``fused``: the fused CUDA kernel on a GPU (off for FSDP2's sharded parameters, which take the
    default multi-tensor path)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused and next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)


def batch_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    """The generator that draws step ``step``'s global batch: a function of (seed, step) only."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT_FILES = ("model.safetensors", "config.json")
TRAIN_STATE_FILES = ("train_state.safetensors", "train_state.json", "train_log.json")
_SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _model_writers(model: CausalLM, extra_config: dict, save_dtype: str, state: dict | None) -> dict:
    if save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(_SAVE_DTYPES)}, got {save_dtype!r}")
    tensors = _state_tensors(model, _SAVE_DTYPES[save_dtype], state)
    config = {"model": model.config.to_dict(), "tokenizer": model.tokenizer.to_dict(), "save_dtype": save_dtype,
              **extra_config}
    return {"model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            "config.json": lambda p: p.write_text(json.dumps(config, indent=1))}


def save_checkpoint(model: CausalLM, out: Path, extra_config: dict, save_dtype: str = "float32",
                    state: dict | None = None) -> Path:
    """Write the folder ``out``: model.safetensors (weights in ``save_dtype``) + config.json (model config,
    tokenizer, ``extra_config``) + manifest.json, as one set (``glalearn.checkpoint.write_set``).

    ``state``: the full state dict when the model itself holds only shards (FSDP2, gathered by
    :func:`full_states`); by default ``model.state_dict()``. Either way the file is the same. An
    existing checkpoint folder ``out`` is replaced; a folder holding anything else is an error.
    """
    out = Path(out)
    return checkpoint.write_set(out.parent, out.name, _model_writers(model, extra_config, save_dtype, state),
                                replace=True)


def _state_tensors(model: CausalLM, dtype: torch.dtype, state: dict | None = None) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def checkpoint_folder(path: str | Path) -> Path:
    """The folder to load from ``path``: itself when it holds a checkpoint's files, else the latest
    ``checkpoint-NNNNNNNN`` folder of a training run. Raises FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a checkpoint folder (model.safetensors + config.json) "
                                 "or a training run's folder")
    if any((path / f).exists() for f in CHECKPOINT_FILES):
        return path
    latest = checkpoint.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds no checkpoint: expected model.safetensors + config.json, or a "
                                f"{checkpoint.CHECKPOINT_PREFIX}NNNNNNNN folder written by python -m glalearn.train")
    return latest


def _check_finite_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            count = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{path}: tensor {name!r} {tuple(t.shape)} holds {count:,} non-finite values (NaN or "
                             f"inf; {name}[{', '.join(map(str, bad))}] = {t[tuple(bad)].item()}): the file is damaged "
                             "or the run that wrote it diverged")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not valid JSON: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt (a JSON object was expected, got {type(data).__name__})")  # noqa: TRY004
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({path.stat().st_size:,} bytes): {err}") from err
    _check_finite_tensors(tensors, path)
    return tensors


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> CausalLM:
    """Rebuild a model from a checkpoint folder (model.safetensors + config.json) or a training run's
    folder (its latest checkpoint): float32, eval mode, ``.tokenizer`` attached (chapter 9).

    Every problem is an error naming the file: a missing file (FileNotFoundError), a file that differs
    from the folder's manifest.json, invalid JSON, a truncated safetensors file, a config that is not a
    glalearn model, weights that disagree with the config or are not finite (ValueError).
    """
    folder = checkpoint_folder(path)
    for fname in CHECKPOINT_FILES:
        if not (folder / fname).is_file():
            raise FileNotFoundError(f"checkpoint file {folder / fname} is missing")
    if (folder / checkpoint.MANIFEST).exists():
        problems = checkpoint.verify(folder, CHECKPOINT_FILES, only=CHECKPOINT_FILES)
        if problems:
            raise ValueError(f"the checkpoint {folder} is damaged: {'; '.join(problems)}")
    config_path = folder / "config.json"
    config = _read_json(config_path)
    try:
        model = build_model(config_from_dict(config["model"]))
        tokenizer = tokenizer_from_dict(config["tokenizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{config_path} is not a glalearn checkpoint config: {err!r}") from err
    weights = folder / "model.safetensors"
    tensors = _read_safetensors(weights)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    except RuntimeError as err:  # shapes that disagree with the config
        raise ValueError(f"{weights} does not match its config.json: {err}") from err
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tokenizer = tokenizer
    return model.to(device).eval()


def _param_order(model, optimizer) -> list[str]:
    """The parameter names in the optimizer's order: index i of ``optimizer.state_dict()`` is name i."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_states(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model state, optimizer state by parameter index), full and on the CPU on rank 0 (chapter 11).

    Under FSDP2 each rank holds a shard of every parameter and moment: gathering them is a collective
    that every rank must enter; the other ranks get empty dicts. Without FSDP the model's own state.
    """
    if not fsdp:
        opt = optimizer.state_dict()
        return model.state_dict(), opt["state"]
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    opt = get_optimizer_state_dict(model, optimizer, options=options)
    index = {name: i for i, name in enumerate(_param_order(model, optimizer))}
    return state, {index[name]: st for name, st in opt.get("state", {}).items()}


def _write_checkpoint(model, optimizer, step: int, out: Path, log: dict, state: dict, opt_state: dict,
                      cfg: TrainConfig) -> Path:
    """OUT/checkpoint-NNNNNNNN (every file of the step, one set), then OUT/train_log.json; older
    checkpoints are removed once the new one is in place."""
    tensors = {f"model.{k}": v for k, v in _state_tensors(model, torch.float32, state).items()}
    for idx, st in opt_state.items():
        for name, value in st.items():
            tensors[f"opt.{idx}.{name}"] = value.detach().to("cpu").reshape(value.shape).contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    n = 0
    for g, src in zip(groups, optimizer.param_groups):
        g["params"] = list(range(n, n + len(src["params"])))
        n += len(src["params"])
    log_text = json.dumps(log, indent=1)
    writers = _model_writers(model, {"train": cfg.to_dict(), "step": step}, cfg.save_dtype, state)
    writers.update({
        "train_state.safetensors": lambda p: save_file(tensors, str(p)),
        "train_state.json": lambda p: p.write_text(json.dumps({"step": step, "param_groups": groups}, indent=1)),
        "train_log.json": lambda p: p.write_text(log_text),
    })
    folder = checkpoint.write_set(out, checkpoint.checkpoint_name(step), writers, {"step": step}, replace=True)
    checkpoint.atomic_write_text(out / "train_log.json", log_text)
    checkpoint.prune(out, keep=folder)
    return folder


def _read_train_state(folder: Path) -> tuple[int, dict, dict, list]:
    """(step, model state, optimizer state by parameter index, param_groups) of a checkpoint folder."""
    meta = _read_json(folder / "train_state.json")
    tensors = _read_safetensors(folder / "train_state.safetensors")
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return int(meta["step"]), model_state, state, meta["param_groups"]


def _load_optimizer_state(model, optimizer, state: dict, param_groups: list, fsdp: bool) -> None:
    if not fsdp:
        device = next(model.parameters()).device
        state = {i: {k: v if k == "step" else v.to(device) for k, v in st.items()} for i, st in state.items()}
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_order(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in param_groups]
    full = {"state": {names[i]: st for i, st in state.items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full,
                             options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- the run folder
def _run_contents(out: Path) -> list[str]:
    """What in ``out`` belongs to a training run (a log, checkpoints, files of the flat layout)."""
    if not out.is_dir():
        return []
    found = [p.name for _, p in checkpoint.list_checkpoints(out)]
    found += [f for f in ("train_log.json", *CHECKPOINT_FILES, "train_state.json", "train_state.safetensors")
              if (out / f).exists()]
    return found


def prepare_run_folder(out: Path, resume: bool, steps: int, announce: bool = True) -> Path | None:
    """Check ``out`` before anything is written; return the checkpoint folder to resume from (or None).

    Without ``resume`` a folder that already holds a run is an error naming the two choices. With it,
    the latest checkpoint must be complete and intact (every file present and equal to its manifest),
    and ``steps`` must lie beyond its step; an error lists what is missing or corrupt and nothing in
    ``out`` is changed. A folder with no run in it (missing, empty, only other files) starts at step 0.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; expected a folder for the run's checkpoints and log")
    existing = _run_contents(out)
    if not resume:
        if existing:
            raise FileExistsError(f"--out {out} already holds a training run ({', '.join(existing)}): pass --resume to "
                                  f"continue it, or choose a new --out folder to start afresh")
        return None
    if not existing:
        if announce:
            print(f"--resume: no run in {out} yet, starting from step 0", file=sys.stderr)
        return None
    folder = checkpoint.latest_checkpoint(out)
    if folder is None:
        folder = out  # the flat layout (files directly in OUT), or a log without any checkpoint
        if not any((out / f).exists() for f in (*CHECKPOINT_FILES, "train_state.json", "train_state.safetensors")):
            raise FileNotFoundError(f"--resume: {out} holds {', '.join(existing)} but no checkpoint "
                                    f"({checkpoint.CHECKPOINT_PREFIX}NNNNNNNN folder) to resume from; nothing was "
                                    "changed. Start afresh with a new --out folder")
    problems = checkpoint.verify(folder, CHECKPOINT_FILES + TRAIN_STATE_FILES)
    if problems:
        raise ValueError(f"--resume: the checkpoint {folder} is incomplete or corrupt: {'; '.join(problems)}. Nothing "
                         "was changed; restore those files, or start afresh with a new --out folder")
    step = _read_json(folder / "train_state.json").get("step")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"--resume: {folder / 'train_state.json'} holds no valid step (got {step!r})")
    if steps <= step:
        raise ValueError(f"--resume: the checkpoint {folder} is at step {step} and --steps {steps} asks for no "
                         f"further step; pass --steps above {step} to train on")
    return folder


# ----------------------------------------------------------------------------- data
def training_data(cfg: TrainConfig, out: Path, dist: Dist | None = None):
    """(tokenizer, train ids, validation ids, description) for ``cfg`` (chapters 9 and 11).

    Tiny Shakespeare with its 65-character tokenizer by default. With ``cfg.data`` (or the byte
    tokenizer) the corpus is tokenized once into ``cfg.data_cache`` (default OUT/data_cache) by the
    first process of each machine while the others wait, and read by every rank through numpy.memmap.
    """
    dist = dist or Dist()
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {TOKENIZERS}, got {cfg.tokenizer!r}")
    if cfg.data is None and cfg.tokenizer == "char":
        train_ids, val_ids = shakespeare_splits()
        return shakespeare_tokenizer(), train_ids, val_ids, {"corpus": "tinyshakespeare", "tokenizer": "char"}
    if cfg.data is None:
        from importlib.resources import files

        path = Path(str(files("glalearn") / "assets" / "tinyshakespeare.txt"))
    else:
        path = Path(cfg.data)
    cache = Path(cfg.data_cache) if cfg.data_cache else out / "data_cache"
    if dist.local_rank == 0:
        corpus = load_corpus(path, cfg.tokenizer, cache)
    dist.barrier()
    if dist.local_rank != 0:
        corpus = load_corpus(path, cfg.tokenizer, cache)  # the token file the first rank wrote
    train_ids, val_ids = corpus.splits()
    need = cfg.context + 1
    if len(val_ids) < need:
        raise ValueError(f"--data: the corpus {path} is {len(corpus.ids):,} tokens ({cfg.tokenizer} tokenizer), "
                         f"too short for one context window: its validation split (the last 10%) holds "
                         f"{len(val_ids):,} tokens, fewer than --context + 1 = {need}. Use a longer corpus "
                         f"(at least {10 * need:,} tokens) or a smaller context")
    return corpus.tokenizer, train_ids, val_ids, {"corpus": str(path), **corpus.describe()}


def _check_resumed_tokenizer(folder: Path, tokenizer) -> None:
    saved = _read_json(folder / "config.json").get("tokenizer")
    if saved is not None and saved != tokenizer.to_dict():
        raise ValueError(f"--resume: the checkpoint {folder} was trained with a different tokenizer "
                         f"({saved.get('kind')}, {len(saved.get('chars', '')) or 256} symbols) than this "
                         f"run's {tokenizer!r}; use the same --data and --tokenizer")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def estimate_val_loss(model: CausalLM, val_ids, cfg: TrainConfig, device: torch.device, amp) -> float:
    """Mean loss over a fixed set of eval_batches × batch_size validation windows (same every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 99_991)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for _ in range(cfg.eval_batches):
        x, y = sample_batch(val_ids, cfg.batch_size, cfg.context, gen, device)
        with amp():
            total += model.loss(x, y).double()
    model.train(was_training)
    return float(total / cfg.eval_batches)


def machine_info(device: torch.device) -> dict:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:  # the vector instructions PyTorch's CPU kernels use (AVX2, AVX512, ...) decide the rounding too
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


# ----------------------------------------------------------------------------- stopping on a signal
class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step whose checkpoint was written (``python -m
    glalearn.train`` reports it in one line and exits with 128 + the signal's number: 130 for Ctrl-C)."""

    def __init__(self, signum: int, step: int, steps: int, folder: Path | None):
        self.signum, self.step, self.steps, self.folder = signum, step, steps, folder
        super().__init__(f"{signal.Signals(signum).name} after step {step} of {steps}")


class SecondSignal(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while a stop was pending: training is interrupted at once (the latest
    complete checkpoint stays loadable); ``python -m glalearn.train`` exits with 128 + its number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} while stopping")


class _StopRequest:
    """While active (main thread only): the first SIGINT/SIGTERM is remembered, so that training stops
    after the current step; a second one interrupts at once (:class:`SecondSignal`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SecondSignal(signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          dist: Dist | None = None, command: str | None = None, handle_signals: bool = False) -> dict:
    """Train per ``cfg``, writing checkpoints and the log under ``out``; returns the log dict (chapter 9).

    ``out`` must not hold a run yet unless ``resume`` (then its latest checkpoint must be intact; see
    :func:`prepare_run_folder`). ``handle_signals``: SIGINT/SIGTERM finish the current step, write a
    checkpoint and raise :class:`TrainingInterrupted` (under torchrun the ranks agree to stop at the next
    multiple of ``log_interval`` steps, where they synchronise anyway).
    """
    out = Path(out)
    dist = dist or Dist.from_env()
    validate_config(cfg, dist.world_size)
    resume_from = prepare_run_folder(out, resume, cfg.steps, announce=dist.is_main)
    device = resolve_device(cfg.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer, train_ids, val_ids, data_info = training_data(cfg, out, dist)
    if cfg.data is not None or cfg.tokenizer != "char":  # the vocabulary follows the corpus's tokenizer
        cfg = dataclasses.replace(cfg, model={**cfg.model, "vocab_size": tokenizer.vocab_size})
    mcfg: LMConfig = config_from_dict(cfg.model)
    if mcfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} != tokenizer's {tokenizer.vocab_size}")
    fsdp = cfg.fsdp and dist.world_size > 1
    if cfg.fsdp and not fsdp and dist.is_main:
        print("--fsdp: one process, nothing to shard; training without FSDP", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    model.tokenizer = tokenizer
    if device.type == "cuda":
        for block in model.blocks:
            if hasattr(block.mixer, "check_inputs"):
                block.mixer.check_inputs = False  # no host-device sync per layer
    start_step, opt_state = 0, None
    log = {"preset": cfg.extra.get("preset"), "command": command, "train_config": cfg.to_dict(),
           "parameters": model.num_parameters(), "machine": machine_info(device), "world_size": dist.world_size,
           "parallel": "fsdp2" if fsdp else "ddp" if dist.world_size > 1 else "none", "data": data_info,
           "steps": [], "evals": []}
    if resume_from is not None:
        _check_resumed_tokenizer(resume_from, tokenizer)
        start_step, model_state, opt_state, param_groups = _read_train_state(resume_from)
        try:
            model.load_state_dict(model_state, strict=not model.config.tie_embeddings)
        except RuntimeError as err:
            raise ValueError(f"--resume: the checkpoint {resume_from} holds another model than this run's "
                             f"--preset and options describe: {str(err).splitlines()[0]} ...") from None
        old = _read_json(resume_from / "train_log.json")
        log["steps"] = [r for r in old.get("steps", []) if r["step"] < start_step]
        log["evals"] = [r for r in old.get("evals", []) if r["step"] <= start_step]
        log["resumed_at"] = old.get("resumed_at", []) + [start_step]
        if old.get("interrupted_at"):
            log["interrupted_at"] = old["interrupted_at"]
    train_model = model
    if fsdp:  # FSDP2: every block, then the root (embedding, final norm, head), sharded over the ranks
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg, fused=not fsdp)
    if opt_state is not None:
        _load_optimizer_state(model, optimizer, opt_state, param_groups, fsdp)
    step_fn = torch.compile(train_model) if cfg.compile else train_model
    amp_dtype = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]

    def amp():
        if amp_dtype is None or device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=amp_dtype)

    per_rank = cfg.batch_size // dist.world_size
    micro = per_rank // cfg.accum_steps
    tokens_per_step = cfg.batch_size * cfg.context
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale(out)  # what a killed run may have left: temporary checkpoint folders
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.extra.get("preset") or "train", unit="step")
    model.train()
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on device, lr)
    t_last = time.perf_counter()
    t_start = t_last
    elapsed0 = log["steps"][-1]["elapsed_s"] if log["steps"] else 0.0

    def flush():
        nonlocal t_last
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).tolist()  # one sync for the whole interval
        now = time.perf_counter()
        tps = tokens_per_step * len(pending) / (now - t_last)
        for (s, _, lr), loss in zip(pending, losses):
            log["steps"].append({"step": s, "loss": round(loss, 5), "lr": round(lr, 7),
                                 "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed0 + now - t_start, 3)})
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
        pending.clear()
        t_last = now

    def stop_requested(done: int) -> bool:
        """Whether to stop after step ``done``: the same answer on every rank."""
        if stop is None or done == cfg.steps:
            return False
        if dist.world_size == 1:
            return stop.signum is not None
        if done % cfg.log_interval:
            return False
        flag = torch.tensor([0.0 if stop.signum is None else float(stop.signum)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if stop.signum is None and flag.item() > 0:
            stop.signum = int(flag.item())
        return flag.item() > 0

    interrupted_at = None
    # the bar is closed on every way out (a second signal too), so a message after it starts a new line
    with (_StopRequest() if handle_signals else nullcontext()) as stop, \
            (closing(bar) if bar is not None else nullcontext()):
        for step in range(start_step, cfg.steps):
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = batch_generator(cfg, step)
            x, y = sample_batch(train_ids, cfg.batch_size, cfg.context, gen, device,
                                rows=slice(dist.rank * per_rank, (dist.rank + 1) * per_rank))
            torch.manual_seed(cfg.seed + 7919 * step + dist.rank)  # dropout masks: a function of the step
            step_loss = torch.zeros((), device=device)
            for a in range(cfg.accum_steps):
                xs, ys = x[a * micro:(a + 1) * micro], y[a * micro:(a + 1) * micro]
                sync = a == cfg.accum_steps - 1 or dist.world_size == 1
                if fsdp:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                    model.set_requires_gradient_sync(sync)
                ctx = nullcontext() if sync or fsdp else train_model.no_sync()
                with ctx:
                    with amp():
                        logits = step_fn(xs)
                        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 ys.reshape(-1))
                    (loss / cfg.accum_steps).backward()
                step_loss += loss.detach() / cfg.accum_steps
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dist.world_size > 1:
                torch.distributed.all_reduce(step_loss)
                step_loss /= dist.world_size
            pending.append((step, step_loss, lr))
            done = step + 1
            if bar is not None:
                bar.update(1)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                flush()
            paused = False
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                flush()
                paused = True
                val = estimate_val_loss(model, val_ids, cfg, device, amp)
                recent = log["steps"][-cfg.log_interval:]
                train_loss = sum(r["loss"] for r in recent) / len(recent)
                log["evals"].append({"step": done, "val_loss": round(val, 5), "train_loss": round(train_loss, 5)})
                if bar is not None:
                    bar.write(f"step {done}: train {train_loss:.4f}  val {val:.4f}")
            stopping = stop_requested(done)
            if done % cfg.checkpoint_interval == 0 or done == cfg.steps or stopping:
                flush()
                if stopping:
                    log["interrupted_at"] = log.get("interrupted_at", []) + [done]
                state, opt_full = full_states(model, optimizer, fsdp)  # a collective under FSDP2
                if dist.is_main:
                    _write_checkpoint(model, optimizer, done, out, log, state, opt_full, cfg)
                del state, opt_full
                dist.barrier()
                paused = True
            if stopping:
                interrupted_at = (stop.signum, done)
                break
            if paused:  # evaluation and checkpoints stay out of the throughput
                t_last = time.perf_counter()
    if interrupted_at is not None:
        signum, done = interrupted_at
        raise TrainingInterrupted(signum, done, cfg.steps, checkpoint.latest_checkpoint(out) if dist.is_main else None)
    if dist.is_main:
        final = log["evals"][-1]["val_loss"] if log["evals"] else None
        log["final_val_loss"] = final
        checkpoint.atomic_write_text(out / "train_log.json", json.dumps(log, indent=1))
    return log


@contextmanager
def _signals_ignored():
    """SIGINT/SIGTERM ignored inside (a run that stops is reporting how to resume), restored after."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in _StopRequest.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _resume_command(argv: list[str], dist: Dist) -> str:
    if dist.world_size > 1:
        return "the same torchrun command with --resume"
    args = [a for a in argv if a != "--resume"]
    return "python -m glalearn.train " + shlex.join(args + ["--resume"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="python -m glalearn.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="folder for checkpoints and train_log.json (must not hold a "
                                                     "run yet, unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accum-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device")
    parser.add_argument("--eval-interval", type=int)
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="write a checkpoint every N steps (and after the last); default: the preset's")
    parser.add_argument("--backend", help="GLA backend: recurrent, chunk, two_level, flash, auto")
    parser.add_argument("--chunk-size", type=int, help="GLA chunk size of the chunk / two_level backends")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--data", help="train on your own corpus: a UTF-8 text file or a folder of them "
                                       "(sorted, joined by a blank line); default Tiny Shakespeare")
    parser.add_argument("--tokenizer", choices=TOKENIZERS,
                        help="char: one token per character of the corpus (default); byte: 256 UTF-8 bytes")
    parser.add_argument("--data-cache", help="folder for the tokenized corpus (default OUT/data_cache)")
    parser.add_argument("--context", type=int, help="tokens per training window")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and AdamW moments with FSDP2 "
                             "(fully_shard per block) instead of replicating them with DDP")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, attr) for name, attr in [
        ("steps", "steps"), ("batch_size", "batch_size"), ("accum_steps", "accum_steps"), ("lr", "lr"),
        ("seed", "seed"), ("device", "device"), ("eval_interval", "eval_interval"), ("data", "data"),
        ("tokenizer", "tokenizer"), ("data_cache", "data_cache"), ("context", "context"),
        ("checkpoint_interval", "checkpoint_every")]
        if getattr(args, attr) is not None}
    if args.compile:
        overrides["compile"] = True
    if args.fsdp:
        overrides["fsdp"] = True
    cfg = preset(args.preset, **overrides)
    if args.backend:
        if cfg.model.get("model_type") != "gla":
            parser.error("--backend applies to GLA presets only")
        cfg.model["backend"] = args.backend
    if args.chunk_size is not None:
        if cfg.model.get("model_type") != "gla":
            parser.error("--chunk-size applies to GLA presets only")
        cfg.model["chunk_size"] = args.chunk_size
    cfg.extra = {**cfg.extra, "preset": args.preset}
    dist = Dist.from_env()
    try:
        try:
            with process_group(cfg.device) as dist:
                command = "python -m glalearn.train " + " ".join(argv)
                log = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, dist=dist,
                            command=command, handle_signals=True)
        except TrainingInterrupted as stop:
            with _signals_ignored():  # a further Ctrl-C while the line is printed changes nothing
                if dist.is_main:
                    print(f"python -m glalearn.train: stopped by {signal.Signals(stop.signum).name} after step "
                          f"{stop.step} of {stop.steps}; checkpoint in {stop.folder}. To continue: "
                          f"{_resume_command(argv, dist)}", file=sys.stderr)
            return 128 + stop.signum
    except KeyboardInterrupt as stop:  # Ctrl-C before the first step, or a second signal while stopping
        with _signals_ignored():
            latest = checkpoint.latest_checkpoint(Path(args.out))
            if dist.is_main:
                where = (f"the latest complete checkpoint is {latest}. To continue: {_resume_command(argv, dist)}"
                         if latest is not None else "no checkpoint was written")
                print(f"python -m glalearn.train: interrupted; {where}", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    if dist.is_main:
        unit = "byte" if cfg.tokenizer == "byte" else "char"
        print(f"final validation loss {log['final_val_loss']:.4f} (nats/{unit}); checkpoint in {args.out}")
    return 0


if __name__ == "__main__":
    status = guarded("python -m glalearn.train", main)
    if status >= 128:  # stopped by a signal: no traceback from another one while the interpreter shuts down
        for s in _StopRequest.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(status)
