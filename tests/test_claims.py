"""Prose against data: what every chapter with numbers in its text (0-9 and 11; chapter 7's benchmark
claims in tests/test_chapters_6_7.py) says in words is what its data says.

Two kinds of test. The numbers a chapter states are formatted into its text by a cell (an
``IPython.display.Markdown`` output) or read from a committed results file; the tests recompute them
from the same seeds or files and compare with the stored output. And the chapters' markdown cells may
only type numbers that are definitions (sizes, seeds, the paper's constants): each chapter's allowed
set is listed below, so a measured number typed into prose fails here.
"""

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch

from glalearn import parallel_gla
from glalearn.numerics import random_gla_inputs

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def _cells(stem):
    return json.loads((CHAPTERS / f"{stem}.ipynb").read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def prose(stem) -> str:
    """A chapter's markdown cells, joined, with every run of whitespace one space (sentences wrap)."""
    return " ".join("\n".join(_source(c) for c in _cells(stem) if c["cell_type"] == "markdown").split())


def markdown_outputs(stem) -> list[str]:
    """The text/markdown outputs of a chapter's code cells, in order."""
    return ["".join(o["data"]["text/markdown"]) for c in _cells(stem) if c["cell_type"] == "code"
            for o in c["outputs"] if "text/markdown" in o.get("data", {})]


def printed(stem) -> str:
    """Everything a chapter's cells printed (stream outputs), joined."""
    return "".join("".join(o.get("text", "")) for c in _cells(stem) if c["cell_type"] == "code"
                   for o in c["outputs"] if o.get("output_type") == "stream")


NUMBER = re.compile(r"(?<![\w.^_/])([0-9][0-9,]*(?:\.[0-9]+)?(?:e-?[0-9]+)?)")
REFERENCE = re.compile(r"(Eq\.|§|chapters?|Chapter|Listing|Fig\.|Table|arXiv|exercise|step|sections?)\s*[\d.–, and]+")


def prose_numbers(stem) -> set[str]:
    """Numbers typed in a chapter's markdown, leaving out references (Eq. 4, §3, chapter 2, 2.1 ...),
    LaTeX blocks and sub/superscripts."""
    found = set()
    for cell in _cells(stem):
        if cell["cell_type"] != "markdown":
            continue
        text = re.sub(r"\$\$.*?\$\$", " ", _source(cell), flags=re.DOTALL)
        text = re.sub(r"`[^`]*\.ipynb`|\(\d+\.\d+\)", " ", text)  # notebook names, exercise IDs
        text = re.sub(r"(?m)^(#+ \d+\.|\s*\d+\. )", " ", text)  # section numbers and numbered lists
        text = REFERENCE.sub(" ", text)
        found |= {n.replace(",", "") for n in NUMBER.findall(text)}
    return found


# --------------------------------------------------------------------------------------------- chapter 2
CH2 = "02_parallel_form"
# sizes and seeds chosen by the chapter, dtype limits and float constants it derives in cells
CH2_DEFINITIONS = {"0", "1", "2", "4", "16", "2048", "512", "64", "1e-12", "88.7", "11.09"}


@pytest.fixture(scope="module")
def ch2_long():
    return random_gla_inputs(B=1, T=2048, H=1, K=16, V=16, gate_normalizer=16.0, dtype=torch.float64, seed=7)


def _first_non_finite(x, dtype):
    o, _ = parallel_gla(**{n: t.to(dtype) for n, t in x.items()}, log_space=False)
    bad = (~torch.isfinite(o[0, :, 0])).any(dim=-1).nonzero()
    return int(bad[0]) if len(bad) else None


def test_ch2_the_decay_paragraph_is_formatted_from_the_data(ch2_long):
    text = next(md for md in markdown_outputs(CH2) if "averages" in md)
    mean_g = ch2_long["g"].mean().item()
    most_decayed = ch2_long["g"][0, :, 0].cumsum(0).min(dim=-1).values
    assert f"**{mean_g:.3f}**" in text
    for dtype in (torch.float16, torch.float32):
        limit = math.log(torch.finfo(dtype).max)
        reach = int((most_decayed < -limit).nonzero()[0])
        assert f"−{limit:.2f} after about {limit / -mean_g:.0f}" in text
        assert f"t = {reach}" in text
        assert reach < 2048  # "Both are inside the training length"
        # "The textbook form fails a little before the fastest channel's G reaches -ln(max)"
        first = _first_non_finite(ch2_long, dtype)
        assert first is not None and 0 <= reach - first < 20
        assert f"first non-finite output at t = {first}" in printed(CH2)


def test_ch2_stronger_gates_fail_sooner():
    rows = []
    for normalizer in (16.0, 4.0, 1.0):
        x = random_gla_inputs(B=1, T=2048, H=1, K=16, V=16, gate_normalizer=normalizer, dtype=torch.float64, seed=7)
        rows.append([_first_non_finite(x, d) for d in (torch.float32, torch.float16)])
    assert rows[0][0] > rows[1][0] > rows[2][0] and rows[0][1] > rows[1][1] > rows[2][1]
    for (f32, f16), normalizer in zip(rows, (16, 4, 1)):
        assert re.search(rf"\n\s+{normalizer}\s+-?\d\.\d+\s+{f32}\s+{f16}\n", printed(CH2))


def test_ch2_prose_types_only_definitions():
    assert prose_numbers(CH2) <= CH2_DEFINITIONS, prose_numbers(CH2) - CH2_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 3
CH3 = "03_chunkwise"
# the example sizes (T = 4, C = 2; T = 16, C = 4; T = 300), the paper's C = 64 and gate 16, the tolerances
CH3_DEFINITIONS = {"0", "1", "2", "3", "4", "16", "64", "300", "30", "1e-5", "1e-6", "1e-12", "1e-16"}


def test_ch3_cost_paragraph_is_formatted_from_the_cost_model():
    from glalearn import costs

    text = next(md for md in markdown_outputs(CH3) if "sequential steps fall" in md)
    T, K, V = 4096, 64, 64
    c1, c64 = costs.chunk_cost(T, K, V, 1), costs.chunk_cost(T, K, V, 64)
    assert f"fall {c1.sequential_steps // c64.sequential_steps}-fold" in text
    assert f"only {c64.flops / c1.flops:.2f}" in text and 1 < c64.flops / c1.flops < 1.5  # "grow by only a third"
    assert f"{c1.exps / 1e6:.1f} M at C = 1 against {c64.exps / 1e6:.1f} M at C = 64" in text
    per_token = costs.log_space_scores_cost(64, K).exps / 64
    assert f"{per_token:,.0f} exps per token" in text
    assert abs(per_token - 64 / 2 * K) / (64 / 2 * K) < 0.05  # "about C/2·K"


def test_ch3_timing_parts_add_up_to_the_whole_they_are_shares_of():
    cell = next(c for c in _cells(CH3) if c["cell_type"] == "code" and "def chunk_form_timed" in _source(c))
    assert _source(cell).startswith("# NBVAL_IGNORE_OUTPUT")
    for line in printed(CH3).splitlines():
        if line.startswith("C = ") and "in all" in line:
            shares = [int(p) for p in re.findall(r"(\d+)%", line)]
            assert sum(shares) <= 101  # parts of one measured whole (the fourth, layout, is the rest)
    assert "of which" not in printed(CH3)


def test_ch3_prose_types_only_definitions():
    assert prose_numbers(CH3) <= CH3_DEFINITIONS, prose_numbers(CH3) - CH3_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 4
def test_ch4_and_ch7_guard_bounds_are_the_librarys_and_explained_together():
    from glalearn import flash
    from glalearn.forms.two_level import GUARD_SPAN

    ch4 = "\n".join(_source(c) for c in _cells("04_secondary_chunking") if c["cell_type"] == "markdown")
    ch7 = "\n".join(_source(c) for c in _cells("07_flash_linear_attention") if c["cell_type"] == "markdown")
    assert f"**Δ ≤ {GUARD_SPAN[torch.float32]:g}**" in ch4 and f"**Δ ≤ {GUARD_SPAN[torch.float16]:g}**" in ch4
    assert GUARD_SPAN[torch.bfloat16] == GUARD_SPAN[torch.float32]
    span_max = flash.CONFIG["span_max"]
    # each chapter names the other's bound and says why both hold: another reference point
    assert f"{span_max:g} nats" in ch4 and "chunk's start" in ch4
    assert f"{GUARD_SPAN[torch.float32]:g}" in ch7 and "midpoint" in ch7
    # the largest factor each guard allows: e^(64/2) from the midpoint, e^40 from the chunk's start
    assert GUARD_SPAN[torch.float32] / 2 < span_max < math.log(torch.finfo(torch.bfloat16).max)


# --------------------------------------------------------------------------------------------- chapter 5
CH5 = "05_backward"
CH5_DEFINITIONS = {"0", "1", "2", "3", "4", "7", "16", "32", "64", "128", "512", "1024", "0.05", "0.1",
                   "1e-5", "1e-6", "1e-12", "1e-15"}


def _table_rows(text, header):
    """The rows printed under a header line, split on '|' and whitespace, until a blank or other line."""
    lines = text[text.index(header):].splitlines()[1:]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2 or not re.match(r"^\s*[\d.]+$", cells[0]):
            break
        rows.append(cells)
    return rows


def test_ch5_memory_paragraph_is_the_measured_table():
    text = next(md for md in markdown_outputs(CH5) if "numbers alive" in md)
    rows = _table_rows(printed(CH5), "saved by recurrent_gla")
    row = next(r for r in rows if r[0] == "1024")
    assert f"that is {row[2]} numbers per head" in text  # the recurrence, as measured in the table
    assert f"= {row[5]} numbers)" in text and int(row[4].replace(",", "")) - int(row[5].replace(",", "")) > 0
    assert f"and {int(row[4].replace(',', '')) - int(row[5].replace(',', ''))} more" in text
    assert f"{64 * 64 / (3 * 64 + 64):.0f} at K = V = 64" in text


def test_ch5_measurement_bullets_are_the_printed_tables():
    text = next(md for md in markdown_outputs(CH5) if "Diagonal pairs, one chunk" in md)
    diag = {float(r[0]): (float(r[1]), float(r[2])) for r in _table_rows(printed(CH5), "dG, diagonal kept apart")}
    lib, textbook = diag[0.1]
    assert f"is {textbook / lib:.0f}× less accurate" in text and textbook / lib > 2  # "several times"
    assert abs(diag[16.0][1] / diag[16.0][0] - 1) < 0.5  # "about equally good" with gentle gates
    rows = _table_rows(printed(CH5), "normalizer |    T | library | textbook")
    strong = [(int(r[1]), float(r[3])) for r in rows if r[0] == "0.1"]
    crossing = next(T for T, e in strong if e >= 1e-5)  # as printed
    assert f"at T = {crossing}" in text
    worst = max(float(r[2]) for r in rows)
    assert f"at or below {worst:.0e}" in text and worst < 1e-6


def test_ch5_summary_describes_the_current_grouping():
    summary = _source(_cells(CH5)[-1])
    assert "spans each" in summary or "span each" in summary
    assert "earlier version" not in summary.lower() and "a few 1e-6" not in summary


def test_ch5_prose_types_only_definitions():
    assert prose_numbers(CH5) <= CH5_DEFINITIONS, prose_numbers(CH5) - CH5_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 9
CH9 = "09_training"
# the evaluate command's contexts, the labels (1)-(3), the exercise 9.1, nanoGPT's 10.7M / 1.47 and the 90/10 split
CH9_DEFINITIONS = {"1", "2", "3", "10", "90", "256", "1024", "4096", "8192", "1e-4", "1.47", "10.7", "9.1"}
ASSETS = Path(__file__).resolve().parents[1] / "glalearn" / "assets"


def _json(rel):
    return json.loads((ASSETS / rel).read_text())


def test_ch9_recipe_paragraph_is_the_training_log():
    from glalearn.data import shakespeare_splits

    text = next(md for md in markdown_outputs(CH9) if "SwiGLU FFN" in md)
    gla, tfm = (_json(f"checkpoints/{n}/train_log.json") for n in ("shakespeare-gla", "shakespeare-transformer"))
    tc = gla["train_config"]
    assert {k: v for k, v in tc.items() if k not in ("model", "extra")} == \
        {k: v for k, v in tfm["train_config"].items() if k not in ("model", "extra")}  # "the same recipe"
    chars = tc["steps"] * tc["batch_size"] * tc["context"]
    train_ids, _ = shakespeare_splits()
    assert f"{tc['steps']:,} steps × {tc['batch_size']} windows × {tc['context']} characters" in text
    assert f"= {chars / 1e6:.1f}M characters (about {chars / len(train_ids):.0f} passes" in text
    assert gla["machine"]["gpu"] in text and tfm["machine"]["gpu"] == gla["machine"]["gpu"]


def test_ch9_three_validation_losses_are_labelled_and_consistent():
    out = printed(CH9)
    for name, label in (("shakespeare-gla", "GLA"), ("shakespeare-transformer", "Transformer++")):
        log, config = _json(f"checkpoints/{name}/train_log.json"), _json(f"checkpoints/{name}/config.json")
        metrics = config["metrics"]
        ext = _json("results/length_extrapolation.json")["models"][name]["rows"]
        full_256 = next(r["val_loss"] for r in ext if r["context"] == 256)
        # (1) the training-time estimate, (2) the full-split loss, (3) the slice loss: each printed with its label
        assert re.search(rf"{re.escape(label)}\s+final validation loss, \(1\) the training-time estimate over \d+ windows: "
                         rf"{log['evals'][-1]['val_loss']:.3f}", out)
        assert f"{name:<24} (2) full-split loss @256: {metrics['val_loss_256_full']:.3f}   (3) slice loss: " \
               f"{metrics['val_loss_slice']:.3f}" in out
        assert abs(full_256 - metrics["val_loss_256_full"]) < 1e-4  # (2) is one number in two files
        assert f"{label:<14} (3) slice loss, context 256: {metrics['val_loss_slice']:.2f}" in out  # recomputed live
        assert metrics["val_loss_slice"] < metrics["val_loss_256_full"]  # "its loss is lower"
    labels = next(md for md in markdown_outputs(CH9) if "the training-time estimate" in md)
    tc = _json("checkpoints/shakespeare-gla/train_log.json")["train_config"]
    assert f"fixed sample of {tc['eval_batches'] * tc['batch_size']} windows" in labels


def test_ch9_overfitting_and_extrapolation_paragraphs_are_the_files():
    over = _json("results/overfitting_run_2700_steps.json")
    text = next(md for md in markdown_outputs(CH9) if "bottomed out" in md)
    for name, run in over["runs"].items():
        best = min(run["evals"], key=lambda e: e["val_loss"])
        assert re.search(rf"\b{best['step']:,} \({'GLA' if name == 'shakespeare-gla' else 'Transformer'}", text)
        assert run["evals"][-1]["val_loss"] > best["val_loss"] + 0.05  # "and then rose"
        assert run["evals"][-1]["train_loss"] < best["train_loss"]  # "while the training loss kept falling"
    steps = _json("checkpoints/shakespeare-gla/train_log.json")["train_config"]["steps"]
    assert f"train for {steps:,} steps" in text
    ext = _json("results/length_extrapolation.json")["models"]
    g = {r["context"]: r["val_loss"] for r in ext["shakespeare-gla"]["rows"]}
    t = {r["context"]: r["val_loss"] for r in ext["shakespeare-transformer"]["rows"]}
    text = next(md for md in markdown_outputs(CH9) if "rotary angles" in md)
    assert f"({g[256]:.3f} → {g[8192]:.3f})" in text and g[8192] < g[256]
    assert f"from {t[256]:.2f} to {t[1024]:.2f} at 1,024 and {t[8192]:.2f} at 8,192" in text


def test_ch9_throughput_table_is_the_file():
    bench = _json("results/bench_model.json")
    out = printed(CH9)
    assert bench["machine"]["gpu"] in out
    for r in bench["rows"]:
        assert f"{r['T']:>6} {r['gla_tokens_per_s']:>12,.0f} {r['transformer_tokens_per_s']:>12,.0f}" in out
    ratios = [r["gla_tokens_per_s"] / r["transformer_tokens_per_s"] for r in bench["rows"]]
    assert ratios == sorted(ratios)  # "GLA's stays flat ... Transformer++'s falls": the ratio grows with T


def test_ch9_prose_types_only_definitions():
    assert prose_numbers(CH9) <= CH9_DEFINITIONS, prose_numbers(CH9) - CH9_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 10
CH10 = "10_recall_and_the_gate"
# sizes, seeds and settings the chapter defines, the paper's budget and constants, its thresholds
CH10_DEFINITIONS = {"0", "1", "2", "3", "4", "5", "7", "8", "10", "15", "16", "24", "64", "100", "128", "256", "1200",
                    "1024", "8000", "25000", "8192", "0.1", "0.02", "2i", "340", "10B", "1.3", "-100", "2024", "2021",
                    "60", "6", "10.1", "10.2", "648"}  # exercise IDs; "gla,64,8" (a command's argument)


def test_ch10_miniature_paragraph_is_the_recall_file():
    from glalearn import experiments as ex

    recall = ex.load_results("recall_cpu.json")
    s = recall["settings"]
    assert len(s["num_pairs"]) == 1  # the paragraph speaks of one number of pairs
    last = s["widths"][-1]
    rows = {(r["mixer"], r["width"]): r for r in recall["summary"]}
    text = " ".join(next(md for md in markdown_outputs(CH10) if "What the miniature shows" in md).split())
    acc = {m: rows[(m, last)]["accuracy"] for m in ex.MIXERS}
    assert (f"GLA {acc['gla']:.3f}, scalar gate {acc['scalar']:.3f}, fixed decay {acc['fixed']:.3f}, "
            f"no gate {acc['none']:.3f}") in text
    gap = acc["gla"] - max(acc[m] for m in ("scalar", "fixed", "none"))
    assert ("ahead of every other linear mixer by" in text) == (gap > 0)
    lowest = min(min(rows[("softmax", w)]["per_seed"]) for w in s["widths"])
    assert f"lowest run {lowest:.3f}" in text and lowest > 0.9  # "softmax attention solves the task"
    assert all(rows[(m, last)]["accuracy"] > 2 / s["vocab_size"] for m in ("gla", "scalar", "fixed", "none"))
    assert f"{s['steps']:,} steps of {s['batch_size']} sequences" in text


def test_ch10_bisection_paragraph_is_the_cause_file():
    from glalearn import experiments as ex

    cause = ex.load_results("cause_cpu.json")
    runs = {(r["variant"], r["mixer"]): r["final_accuracy"] for r in cause["runs"]}
    text = " ".join(next(md for md in markdown_outputs(CH10) if "What the bisection shows" in md).split())
    for acc in runs.values():
        assert f"{acc:.3f}" in text
    plateau = 5 * 2 / cause["settings"]["vocab_size"]
    gla = {v: runs[(v, "gla")] for v, _, _ in ex.CAUSE_VARIANTS}
    needed = gla["all three"] >= plateau and all(a < plateau for v, a in gla.items()
                                                 if v.endswith(" only") or v.startswith("all but"))
    assert ("all three are needed" in text) == needed
    recall = ex.load_results("recall_cpu.json")
    rows = {(r["mixer"], r["width"]): r["per_seed"] for r in recall["summary"]}
    last = recall["settings"]["widths"][-1]
    ahead = sum(b > a for a, b in zip(rows[("gla", last)], rows[("none", last)]))
    assert f"no gate was ahead of GLA at width {last} on {ahead} of its {len(rows[('gla', last)])} seeds" in text
    # "the GPU grid's picture, on a CPU": softmax learns, the linear mixers do not
    assert runs[("before", "softmax")] > 0.9 and max(runs[("before", "gla")], runs[("before", "none")]) < plateau
    gpu = ex.load_results("recall_gpu.json")
    linear = [r["final_accuracy"] for r in gpu["runs"] if r["mixer"] != "softmax"]
    assert max(linear) < 5 * 2 / gpu["settings"]["vocab_size"]  # §3's "stay at chance"
    assert min(r["final_accuracy"] for r in gpu["runs"] if r["mixer"] == "softmax") > 0.9


def test_ch10_ablation_paragraph_is_the_ablation_file():
    from glalearn import experiments as ex

    ablation = ex.load_results("ablation_cpu.json")
    loss = {r["name"]: r["final_val_loss"] for r in ablation["runs"]}
    text = " ".join(next(md for md in markdown_outputs(CH10) if "perplexity columns" in md).split())
    gates = ["gla", "scalar gate", "fixed decay", "no gate"]
    same = sorted(gates, key=loss.get) == sorted(gates, key=ablation["paper_table4_ppl"].get)
    assert ("*The gate: the paper's order.*" in text) == same
    for g in gates:
        assert f"{loss[g]:.3f}" in text


def test_ch10_prose_types_only_definitions():
    assert prose_numbers(CH10) <= CH10_DEFINITIONS, prose_numbers(CH10) - CH10_DEFINITIONS

# --------------------------------------------------------------------------------------------- chapter 0
CH0 = "00_orientation"
# the paper's year, sizes and claims (340M/1.3B, 15-100B tokens, 2K/20K, 2048/4096), P1/P2, chapter
# ranges, the exercise IDs 1.1/1.3 in code, the library's float32 tolerance 1e-5
CH0_DEFINITIONS = {"0", "1", "1.1", "1.3", "2", "3", "4", "5", "8", "9", "10", "11", "15", "16", "20", "64", "100",
                   "128", "340", "2024", "2048", "4096", "16384", "65536", "1e-5"}


def _profile_sentence(p):
    return f"H = {p['H']}, K = V = {p['K']} with {p['tokens']:,} tokens"


def test_ch0_benchmark_shapes_are_the_benchmarks():
    from glalearn.bench_kernels import PROFILES

    text = prose(CH0)
    assert f"P1 is {_profile_sentence(PROFILES['P1'])} per batch" in text
    assert f"P2 is {_profile_sentence(PROFILES['P2'])}" in text and PROFILES["P1"]["K"] == PROFILES["P1"]["V"]


def test_ch0_prose_types_only_definitions():
    assert prose_numbers(CH0) <= CH0_DEFINITIONS, prose_numbers(CH0) - CH0_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 1
CH1 = "01_linear_attention_and_the_gate"
# sizes (T = 256, K = V = 64, 2 heads; the explorer's 64 tokens, 4 channels), the paper's τ = 16, the
# RetNet formula's 5, the bias 6 to try, float64 agreement, and the derived gate values checked below
CH1_DEFINITIONS = {"0", "1", "2", "4", "5", "6", "16", "40", "64", "256", "1e-12", "1e-16", "0.01", "74", "0.08",
                   "92"}


def test_ch1_reset_and_wipe_numbers_are_the_gates():
    from glalearn import viz

    text = prose(CH1)
    assert viz.RESET_LOGIT == -40 and "gate logits are −40" in text
    alpha = math.exp(torch.nn.functional.logsigmoid(torch.tensor(viz.RESET_LOGIT, dtype=torch.float64)).item() / 16)
    assert f"α = σ(−40)^(1/16) ≈ {alpha:.2f}" in text and f"forgets about {round(100 * (1 - alpha))}% of the past" in text
    z = 16 * math.log(0.01)  # logsigmoid(z) = 16 ln 0.01, and logsigmoid(z) ≈ z that far out
    assert abs(torch.nn.functional.logsigmoid(torch.tensor(z, dtype=torch.float64)).item() - z) < 1e-30
    assert f"z ≈ −{round(-z)}" in text


def test_ch1_prose_types_only_definitions():
    assert prose_numbers(CH1) <= CH1_DEFINITIONS, prose_numbers(CH1) - CH1_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 4
CH4 = "04_secondary_chunking"
# the dtypes' limits (checked below), the guard bounds 64/8/40 (checked above), sub-chunk sizes, the
# book's bf16 tolerance 5e-3 and the benchmark length 4096
CH4_DEFINITIONS = {"0", "1", "2", "3.4", "4", "5e-3", "8", "9.7", "10", "11", "16", "24", "32", "40", "64", "88",
                   "4096", "65504"}


def test_ch4_float_limits_are_the_dtypes():
    from glalearn.bench import bench_forms
    from glalearn.forms.two_level import GUARD_SPAN

    text = prose(CH4)
    f16, f32, bf16 = (torch.finfo(d) for d in (torch.float16, torch.float32, torch.bfloat16))
    assert f"float16 overflows above {f16.max:,.0f} ≈ e^{math.log(f16.max):.1f}" in text
    assert f"above ≈ {f32.max / 1e38:.1f}·10^38 ≈ e^{math.log(f32.max):.1f}" in text and bf16.max / f32.max > 0.99
    bits = {d: round(1 - math.log2(torch.finfo(d).eps)) for d in (torch.bfloat16, torch.float16, torch.float32)}
    assert (f"bfloat16 keeps {bits[torch.bfloat16]} significant bits, float16 {bits[torch.float16]}, "
            f"float32 {bits[torch.float32]}") in text
    assert f"smallest normal number is ≈ e^−{-math.log(f16.tiny):.1f}" in text
    half = GUARD_SPAN[torch.float32] / 2  # the factors from the midpoint reach e^(Δ/2)
    assert f"within e^±{half:g} and leave e^{math.floor(math.log(f32.max)) - half:g}" in text
    assert f"(factors in [e^−{GUARD_SPAN[torch.float16] / 2:g}, e^{GUARD_SPAN[torch.float16] / 2:g}])" in text
    assert "times it at T = 4096" in text and 4096 in inspect.signature(bench_forms).parameters["lengths"].default


def test_ch4_prose_types_only_definitions():
    assert prose_numbers(CH4) <= CH4_DEFINITIONS, prose_numbers(CH4) - CH4_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 6
CH6 = "06_triton_from_zero"
# P1/P2 (checked below), tf32's 10-bit mantissa, the strong gate −30, tile sizes, `other=0.0`
CH6_DEFINITIONS = {"0", "0.0", "1", "2", "3", "4", "5", "10", "16", "30", "64", "128", "16384", "65536"}


def test_ch6_benchmark_shape_is_p1():
    from glalearn.bench_kernels import PROFILES

    p1, p2 = PROFILES["P1"], PROFILES["P2"]
    assert (f"(H = {p1['H']}, K = V = {p1['K']}, {p1['tokens']:,} tokens per batch: B = {p1['tokens'] // 16384} at "
            f"T = 16,384; P2 has K = V = {p2['K']})") in prose(CH6)


def test_ch6_prose_types_only_definitions():
    assert prose_numbers(CH6) <= CH6_DEFINITIONS, prose_numbers(CH6) - CH6_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 8
CH8 = "08_gla_transformer"
# the paper's shapes (340M/1.3B, d = 1024/2048, 24 layers, 32,000 tokens), our model's (checked below),
# expand_k = 0.5, the FFN's 8d/3, 10 or 10 million tokens, the exercise 8.1, the tolerance 1e-6
CH8_DEFINITIONS = {"0.5", "1", "1.3", "2", "4", "8", "8.1", "10", "16", "24", "32", "64", "256", "340", "1024",
                   "2048", "8192", "32000", "1e-6"}


def test_ch8_our_shapes_are_the_shipped_model_and_the_benchmark():
    from glalearn.bench_model import SHAPE
    from glalearn.train import preset

    text = prose(CH8)
    m = preset("shakespeare-gla").model
    H, d = m["num_heads"], m["d_model"]
    K, V = int(d * m["expand_k"]) // H, int(d * m["expand_v"]) // H
    assert f"`expand_k = {m['expand_k']:g}`" in text and f"`expand_v = {m['expand_v']:g}`" in text
    assert f"{H} heads" in text and f"width d = {d}: $K = {K}$ and $V = {V}$ per head" in text
    assert f"{H} × {K} × {V} = {H * K * V:,} numbers per layer" in text
    assert f"at d = {SHAPE['d_model']}, {SHAPE['n_layers']} layers" in text
    assert f"{SHAPE['vocab_size']:,}-token vocabulary" in text


def test_ch8_prose_types_only_definitions():
    assert prose_numbers(CH8) <= CH8_DEFINITIONS, prose_numbers(CH8) - CH8_DEFINITIONS


# --------------------------------------------------------------------------------------------- chapter 11
CH11 = "11_scaling_out"
# the commands' numbers (ranks, GPUs, port 29500, batches, steps), the data split 90/10, 256 byte values,
# 16 bytes a parameter, the 80 GB card, FSDP's 1.5x traffic, the paper's 340M/1.3B and 7B, and the
# model sizes, memory and loss figures checked below
CH11_DEFINITIONS = {"0", "0.8", "1", "1.3", "1.5", "2", "3", "4", "4.8", "5", "5.55", "6", "7", "8", "10", "15",
                    "16", "19.1", "21", "60", "64", "76", "80", "90", "112", "128", "216", "256", "340", "512",
                    "29500"}


def _parameters(model: dict) -> int:
    from glalearn.model import build_model, config_from_dict

    with torch.device("meta"):
        return build_model(config_from_dict(model)).num_parameters()


def test_ch11_model_sizes_and_memory_are_computed_from_the_configs(monkeypatch):
    from glalearn import scaling
    from glalearn.train import preset

    text = prose(CH11)
    tiny, gla = preset("tiny-cpu"), preset("shakespeare-gla")
    assert f"`tiny-cpu` preset ({_parameters(tiny.model) / 1e6:.1f}M parameters" in text
    assert f"trained a {_parameters(gla.model) / 1e6:.1f}M-parameter GLA" in text
    assert (f"the {_parameters(gla.model) / 1e6:.1f}M-parameter `shakespeare-gla`, {gla.batch_size} windows of "
            f"{gla.context} per step") in text
    captured = []  # the worker's defaults, as run-all passes them
    monkeypatch.setattr(scaling, "run_worker", lambda args: captured.append(args) or 0)
    assert scaling.main(["worker", "--out", "unused"]) == 0
    model = scaling.worker_config(captured[0], world_size=1).model
    n = _parameters(model)
    assert f"`d_model` {model['d_model']} ({n / 1e6:.1f}M parameters; {model['n_layers']} layers, " in text
    assert f"{n / 1e6:.1f}M parameters are {4 * n / 1e6:.0f} MB" in text and f"against {4 * n / 1e6:.0f} MB" in text
    assert "4 + 4 + 8 = 16 bytes per parameter" in text  # float32 weights, gradients, two AdamW moments
    assert f"the 1.3B model needs {1.3e9 * 16 / 1e9:.0f} GB" in text and f"7B needs {7e9 * 16 / 1e9:.0f} GB" in text


def test_ch11_toy_corpus_and_runs_are_the_cells():
    text = prose(CH11)
    code = " ".join(" ".join(_source(c) for c in _cells(CH11) if c["cell_type"] == "code").split())
    lists = {name: re.search(rf"{name} = \[(.*?)\]", code).group(1).count('"') // 2
             for name in ("subjects", "verbs", "places")}
    n = lists["subjects"]
    assert set(lists.values()) == {n} and f"{n} × {n} × {n} = {n ** 3} distinct sentences" in text
    assert '"--steps", "60", "--batch-size", "16"' in code and "60 steps of 16 windows" in text
    assert f"uniform {math.log(256):.2f} nats per byte" in text
    assert 'common = ["--preset", "tiny-cpu", "--steps", "4", "--batch-size", "8"' in code
    assert "global batch of 8 windows" in text and "); 4 steps." in text
    shipped = json.loads((ASSETS / "checkpoints" / "shakespeare-gla" / "train_log.json").read_text())
    assert "H100" in shipped["machine"]["gpu"] and "(one H100, " in text
    ms = re.search(r"= (\d+) ms per step", printed(CH11))
    assert ms and 10 <= int(ms.group(1)) < 100 and "Tens of milliseconds of compute per step" in text


def test_ch11_prose_types_only_definitions():
    assert prose_numbers(CH11) <= CH11_DEFINITIONS, prose_numbers(CH11) - CH11_DEFINITIONS
