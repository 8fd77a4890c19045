"""Training throughput of GLA vs Transformer++ on a GPU (chapter 9; the paper's Fig. 6 in miniature).

    python -m glalearn.bench model [--lengths 2048 4096 8192] [--json glalearn/assets/results/bench_model.json]

Both models at d_model 1024, 8 layers, 4 heads (vocabulary 32,000 as in the paper), bf16 autocast,
AdamW. One timed step is forward + backward + optimizer step; tokens per second = batch · T / median
step time. GLA runs the flash backend (``glalearn.flash_gla``, chapter 7), Transformer++ runs
``scaled_dot_product_attention`` (FlashAttention-2 on an H100). The batch holds ``--tokens`` tokens
(default 32,768) split into sequences of length T.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from glalearn.model import GLAConfig, TransformerConfig, build_model


def step_seconds(model, batch: int, T: int, vocab: int, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one forward + backward + AdamW step on random tokens [batch, T] (CUDA events)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, T + 1), device="cuda")

    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_model(lengths=(2048, 4096, 8192), tokens: int = 32768, d_model: int = 1024, n_layers: int = 8,
                vocab: int = 32000, gla_backend: str = "flash", repeats: int = 10) -> list[dict]:
    """Rows {T, batch, gla_tokens_per_s, transformer_tokens_per_s} (chapter 9)."""
    if not torch.cuda.is_available():
        raise RuntimeError("python -m glalearn.bench model needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = {"d_model": d_model, "n_layers": n_layers, "num_heads": 4, "vocab_size": vocab}
    rows = []
    for T in lengths:
        batch = max(1, tokens // T)
        row = {"T": T, "batch": batch}
        for name, cfg in [("gla", GLAConfig(**shape, context_length=T, backend=gla_backend)),
                          ("transformer", TransformerConfig(**shape, context_length=T))]:
            torch.manual_seed(0)
            model = build_model(cfg).cuda()
            for block in model.blocks:
                if hasattr(block.mixer, "check_inputs"):
                    block.mixer.check_inputs = False
            seconds = step_seconds(model, batch, T, vocab, repeats=repeats)
            row[f"{name}_step_s"] = seconds
            row[f"{name}_tokens_per_s"] = batch * T / seconds
            del model
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"T={T:>5} batch={batch:>3}  GLA {row['gla_tokens_per_s']:>10,.0f} tok/s   "
              f"Transformer++ {row['transformer_tokens_per_s']:>10,.0f} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glalearn.bench model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch")
    parser.add_argument("--gla-backend", default="flash", help="flash (default), chunk or two_level")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the rows, command and machine to this file")
    args = parser.parse_args(argv)
    rows = bench_model(args.lengths, args.tokens, gla_backend=args.gla_backend, repeats=args.repeats)
    if args.json:
        from glalearn.train import machine_info

        with open(args.json, "w") as f:
            json.dump({"command": "python -m glalearn.bench model " + " ".join(argv if argv is not None else sys.argv[2:]),
                       "machine": machine_info(torch.device("cuda")), "date": time.strftime("%Y-%m-%d"),
                       "shape": {"d_model": 1024, "n_layers": 8, "num_heads": 4, "vocab_size": 32000,
                                 "dtype": "bfloat16 autocast"}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
