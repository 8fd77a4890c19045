"""Benchmarks: `python -m glalearn.bench forms | kernels | model`.

`forms` times every GLA form on this machine's CPU (forward, and forward + backward) and prints a
table with ratios to the recurrent form. `kernels` and `model` need a GPU (chapters 7 and 9).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from glalearn import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla
from glalearn.clierror import OneLineParser, guarded
from glalearn.numerics import random_gla_inputs


def direct_chunk_prototype(q, k, v, g, chunk_size: int = 64):
    """The unstable baseline exactness is measured against: intra-chunk (q ⊙ Λ)(k / Λ)ᵀ as one product.

    k / Λ = k·exp(-G) overflows float32 once a chunk's cumulative decay passes -88, so this is NOT a
    form of the library; it only prices what the exact forms pay for their bounded exponents.
    """
    from glalearn.forms.chunk import chunk_states, from_chunks, to_chunks

    T, K = q.shape[1], q.shape[-1]
    qc, kc, vc, gc = (to_chunks(x, chunk_size) for x in (q, k, v, g))
    G = gc.cumsum(-2)
    states, _ = chunk_states(kc, vc, G)
    q_decayed, k_inverse = qc * G.exp(), kc * (-G).exp()
    P = (q_decayed @ k_inverse.transpose(-1, -2)).tril_()
    return from_chunks(K**-0.5 * (q_decayed @ states + P @ vc), T), None


CPU_FORMS = {
    "recurrent": recurrent_gla,
    "parallel (log space)": lambda **kw: parallel_gla(**kw, log_space=True),
    "chunk (C=64)": chunk_gla,
    "two_level (C=64, L=16)": two_level_chunk_gla,
    "two_level split diag": lambda **kw: two_level_chunk_gla(**kw, diagonal="split"),
    "two_level guarded": lambda **kw: two_level_chunk_gla(**kw, diagonal="guarded"),
    "direct matmul (unstable)": direct_chunk_prototype,
}


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_forms(lengths=(256, 1024, 4096), B=1, H=4, K=64, V=64, repeats=5, skip_parallel_above=1024,
                seed=0) -> list[dict]:
    """Median seconds of each form's forward and forward+backward, fresh random inputs per length."""
    rows = []
    for T in lengths:
        inputs = random_gla_inputs(B=B, T=T, H=H, K=K, V=V, seed=seed + T)
        for name, form in CPU_FORMS.items():
            if name.startswith("parallel") and T > skip_parallel_above:
                continue
            slow = name == "recurrent"
            fwd = _median_seconds(lambda form=form, inputs=inputs: form(**inputs), 1 if slow and T >= 4096 else repeats)

            def fwd_bwd(form=form, inputs=inputs):
                x = {n: t.detach().requires_grad_() for n, t in inputs.items()}
                o, _ = form(**x)
                o.backward(torch.ones_like(o))

            fb = _median_seconds(fwd_bwd, 1 if slow else repeats, warmup=0 if slow and T >= 4096 else 1)
            rows.append({"T": T, "form": name, "forward_s": fwd, "forward_backward_s": fb})
    for row in rows:
        base = next(r for r in rows if r["T"] == row["T"] and r["form"] == "recurrent")
        row["forward_speedup"] = base["forward_s"] / row["forward_s"]
        row["forward_backward_speedup"] = base["forward_backward_s"] / row["forward_backward_s"]
    return rows


def format_forms_table(rows: list[dict]) -> str:
    lines = [f"{'T':>5}  {'form':<24} {'fwd ms':>9} {'x rec':>7} {'fwd+bwd ms':>11} {'x rec':>7}"]
    for r in rows:
        lines.append(f"{r['T']:>5}  {r['form']:<24} {1e3 * r['forward_s']:>9.1f} {r['forward_speedup']:>7.1f}"
                     f" {1e3 * r['forward_backward_s']:>11.1f} {r['forward_backward_speedup']:>7.1f}")
    return "\n".join(lines)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m glalearn.bench", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="{forms,kernels,model}")
    forms = sub.add_parser("forms", help="time the GLA forms on the CPU")
    forms.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    forms.add_argument("--repeats", type=int, default=5)
    forms.add_argument("--json", help="also write the rows to this JSON file")
    for name in ("kernels", "model"):
        sub.add_parser(name, help=f"GPU benchmark ({name}); see glalearn.bench_{name}", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.what != "forms":
        module = importlib.import_module(f"glalearn.bench_{args.what}")
        return module.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if min(args.lengths) < 1:
        raise ValueError(f"--lengths must be whole numbers of at least 1, got {min(args.lengths)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be a whole number of at least 1, got {args.repeats}")
    rows = bench_forms(lengths=args.lengths, repeats=args.repeats)
    print(f"GLA forms on {machine_info()['processor']} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("B=1, H=4, K=V=64, float32, g = logsigmoid(randn)/16; median seconds; 'x rec' = speedup over recurrent")
    print(format_forms_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m glalearn.bench " + " ".join(argv or sys.argv[1:]),
                       "machine": machine_info(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(guarded("python -m glalearn.bench", main))
