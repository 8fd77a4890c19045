"""Validation loss at several context lengths (chapter 9): the paper's Fig. 5 in miniature.

    python -m glalearn.evaluate shakespeare-gla --context 256 1024 4096 8192
    python -m glalearn.evaluate runs/tiny --context 128 512 --json results.json

MODEL is a shipped model's name, a folder with model.safetensors + config.json, or a training run's
folder (its latest checkpoint). For each context length C the validation split (the last 10% of Tiny
Shakespeare, 111,540 characters) is cut into consecutive windows of C + 1 tokens that overlap by one,
so every token after the first is predicted exactly once, with up to C tokens before it. The loss is the mean over all of them, in nats per
character. Both models were trained at context 256: beyond it the Transformer meets positions it never
saw, GLA only a longer run of its recurrence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from glalearn.clierror import OneLineParser, guarded
from glalearn.data import eval_windows, shakespeare_splits, shakespeare_tokenizer
from glalearn.model import CausalLM


def load_model(name_or_path: str, device: str | torch.device = "cpu") -> CausalLM:
    """A shipped model by name, or a checkpoint folder (model.safetensors + config.json) or training run,
    through the loader of ``load_pretrained`` (errors name the missing or damaged file)."""
    from glalearn.pretrained import PRETRAINED, load_from_dir, load_pretrained

    if name_or_path in PRETRAINED:
        return load_pretrained(name_or_path).to(device)
    if not Path(name_or_path).exists():
        raise FileNotFoundError(f"MODEL must be one of {sorted(PRETRAINED)} or a checkpoint folder (model.safetensors "
                                f"+ config.json, or a training run's --out folder), got {name_or_path!r}, which "
                                "does not exist")
    return load_from_dir(name_or_path, device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    return device


@torch.no_grad()
def validation_loss(model: CausalLM, ids, context: int, batch_size: int = 8, max_windows: int | None = None,
                    device: str | torch.device | None = None) -> float:
    """Mean next-token loss (nats per token) over consecutive windows of ``context`` (chapter 9).

    Args:
        model: a CausalLM;  ids: token ids (numpy array [N]);  context: C, tokens of history at most.
        batch_size: windows run together (the last, shorter window runs alone).
        max_windows: only the first this many windows (a fixed slice, for quick checks).
    Returns: the loss summed over every predicted token divided by their number.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    device = device or next(model.parameters()).device
    windows = eval_windows(ids, context)
    if max_windows is not None:
        windows = windows[:max_windows]
    total, count = 0.0, 0
    full = [s for s, n in windows if n == context]
    short = [(s, n) for s, n in windows if n != context]
    groups = [[(s, context) for s in full[i:i + batch_size]] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in short]
    for group in groups:
        n = group[0][1]
        batch = torch.stack([torch.from_numpy(ids[s:s + n + 1].astype("int64")) for s, _ in group]).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m glalearn.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="shakespeare-gla, shakespeare-transformer or a folder")
    parser.add_argument("--context", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    bad = [c for c in args.context if c < 1]
    if bad:
        raise ValueError(f"--context must be whole numbers of at least 1, got {bad[0]}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a whole number of at least 1, got {args.batch_size}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    device = _device(args.device)
    if device.type == "cuda":  # full float32 products, so GPU and CPU numbers agree
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = load_model(args.model, device)
    if model.tokenizer.to_dict() != shakespeare_tokenizer().to_dict():
        raise ValueError(f"MODEL {args.model} was trained with another tokenizer ({model.tokenizer!r}) than Tiny "
                         "Shakespeare's 65 characters, which this evaluation measures")
    _, val_ids = shakespeare_splits()
    print(f"{args.model}: {model.num_parameters():,} parameters, validation split {len(val_ids):,} characters")
    print(f"{'context':>8} {'val loss':>9} {'windows':>8}")
    rows = []
    for C in args.context:
        start = time.perf_counter()
        loss = validation_loss(model, val_ids, C, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        rows.append({"context": C, "val_loss": loss, "windows": len(eval_windows(val_ids, C)), "seconds": seconds})
        print(f"{C:>8} {loss:>9.4f} {rows[-1]['windows']:>8}", flush=True)
    if args.json:
        from glalearn.train import machine_info

        Path(args.json).write_text(json.dumps({
            "model": args.model, "command": "python -m glalearn.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine_info(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(guarded("python -m glalearn.evaluate", main))
