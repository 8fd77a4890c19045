"""glalearn.check: the registry, the worked solutions pass, plausible wrong answers fail with a pointed message."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

import glalearn
from glalearn import checks
from glalearn.checks import FAILED, NOT_STARTED, PASSED, CheckFailed, run_check

ROOT = Path(__file__).resolve().parents[1]
CHECK_CALL = re.compile(r"glalearn\.check\(\s*\"([0-9.]+)\",\s*(\w+)")


def _solution_functions() -> dict[str, object]:
    """Exercise ID -> the worked solution, executed from the solutions notebooks (no kernel needed)."""
    found = {}
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        namespace: dict = {}
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        for source in code:
            calls = CHECK_CALL.findall(source)
            if calls:
                for exercise_id, name in calls:
                    found[exercise_id] = namespace[name]
            elif "def " in source or "import" in source:
                exec(compile(source, f"{path.name}", "exec"), namespace)  # noqa: S102  (our own notebooks)
    return found


SOLUTIONS = _solution_functions()


# ----------------------------------------------------------------------------- the registry
def test_registry_has_the_chapter_1_to_5_exercises_with_complete_specs():
    exercises = checks.exercises()
    assert len(exercises) >= 10
    for exercise_id, ex in exercises.items():
        assert re.fullmatch(r"[0-9]+\.[0-9]+", exercise_id) and ex.id == exercise_id
        assert ex.title and ex.points >= 1 and len(ex.hints) == 3 and all(ex.hints)
        assert "[" in ex.statement, f"{exercise_id}: the statement must give shapes"
        assert ex.mistakes, f"{exercise_id}: give at least one plausible wrong answer"
        assert (ROOT / "solutions" / f"{ex.notebook}.ipynb").exists(), ex.notebook
    chapters = {ex.id.split(".")[0] for ex in exercises.values()}
    assert {"1", "2", "3", "4", "5"} <= chapters


def test_unknown_exercise_names_the_known_ones():
    with pytest.raises(ValueError, match="known: 1.1"):
        glalearn.check("9.9", lambda: None)


def test_every_solution_passes_its_check():
    assert set(SOLUTIONS) == set(checks.exercises()), "every exercise has a worked solution, and vice versa"
    for exercise_id, fn in SOLUTIONS.items():
        result = run_check(checks.get(exercise_id), fn)
        assert result.status == PASSED, f"{exercise_id}: {result.message}"
        assert len(result.cases) >= 3 and all(c.ok for c in result.cases)


def test_cases_are_fresh_and_repeatable_by_seed():
    ex = checks.get("3.2")
    a, b = run_check(ex, SOLUTIONS["3.2"]), run_check(ex, SOLUTIONS["3.2"])
    assert a.seed != b.seed
    gen1, gen2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    c1, c2 = ex.cases(gen1), ex.cases(gen2)
    assert all(torch.equal(x.args[0], y.args[0]) for x, y in zip(c1, c2))
    sizes = {c.label for c in c1}
    assert any("T=1 " in s for s in sizes) and any("T=63" in s for s in sizes) and any("τ=0.1" in s for s in sizes)


# ----------------------------------------------------------------------------- wrong answers
def _wrong_step(state, q_t, k_t, v_t, g_t, scale):  # forgot the gate
    new_state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return scale * (q_t.unsqueeze(-2) @ new_state).squeeze(-2), new_state


def _wrong_recurrent(q, k, v, g, scale=None, initial_state=None):  # uses the previous token's gate
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        gate = g[:, t - 1] if t > 0 else torch.zeros_like(g[:, 0])
        S = gate.exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(scale * (q[:, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, 1), S


def _wrong_gate(x, W1, W2, b, normalizer=16.0):  # multiplied by τ
    return torch.nn.functional.logsigmoid(x @ W1 @ W2 + b) * normalizer


def _wrong_naive(q, k, v, g, scale=None):  # strict mask: forgot the diagonal
    T, K = q.shape[1], q.shape[-1]
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))
    G = g.cumsum(2)
    P = (q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)
    P = P * torch.ones(T, T, dtype=q.dtype).tril(-1)
    return (K ** -0.5 * P @ v).transpose(1, 2)


def _wrong_log_space(q, k, v, g, scale=None):  # exclusive cumulative sum (off by one)
    T, K = q.shape[1], q.shape[-1]
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))
    G = torch.cat([torch.zeros_like(g[:, :, :1]), g[:, :, :-1].cumsum(2)], dim=2)
    D = G[:, :, :, None, :] - G[:, :, None, :, :]
    D = D.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril()[:, :, None], float("-inf"))
    P = (q[:, :, :, None, :] * k[:, :, None, :, :] * D.exp()).sum(-1)
    return (K ** -0.5 * P @ v).transpose(1, 2)


def _wrong_to_chunks(x, chunk_size):  # reshaped without moving the heads
    B, T, H, D = x.shape
    N = (T + chunk_size - 1) // chunk_size
    padded = torch.cat([x, x.new_zeros(B, N * chunk_size - T, H, D)], dim=1)
    return padded.reshape(B, H, N, chunk_size, D)


def _wrong_chunk_states(k_chunks, v_chunks, G, initial_state=None):  # stores the state after the update
    B, H, N, _, K = k_chunks.shape
    S = k_chunks.new_zeros(B, H, K, v_chunks.shape[-1]) if initial_state is None else initial_state
    states = []
    for n in range(N):
        gamma = G[:, :, n, -1]
        S = gamma.exp().unsqueeze(-1) * S + (k_chunks[:, :, n] * (gamma.unsqueeze(-2) - G[:, :, n]).exp()).transpose(
            -1, -2) @ v_chunks[:, :, n]
        states.append(S)
    return torch.stack(states, 2), S


def _wrong_intra(q_chunks, k_chunks, v_chunks, G, scale):  # no causal mask inside the chunk
    P = (q_chunks[..., :, None, :] * k_chunks[..., None, :, :] * (G[..., :, None, :] - G[..., None, :, :]).exp()).sum(-1)
    return scale * P @ v_chunks


def _wrong_inter(q_chunks, states, G, scale):  # forgot Λ
    return scale * q_chunks @ states


def _wrong_block(q_a, k_b, G_a, G_b):  # transposed: keys as rows
    ref = G_a[..., :1, :]
    return (k_b * (ref - G_b).exp()) @ (q_a * (G_a - ref).exp()).transpose(-1, -2)


def _wrong_scores(q, k, G, sub_chunk_size):  # forgot the diagonal sub-chunks
    C, L = q.shape[-2], sub_chunk_size
    P = q.new_zeros(*q.shape[:-1], C)
    for a in range(C // L):
        for b in range(a):
            r = G[..., a * L:a * L + 1, :]
            qa = q[..., a * L:(a + 1) * L, :] * (G[..., a * L:(a + 1) * L, :] - r).exp()
            kb = k[..., b * L:(b + 1) * L, :] * (r - G[..., b * L:(b + 1) * L, :]).exp()
            P[..., a * L:(a + 1) * L, b * L:(b + 1) * L] = qa @ kb.transpose(-1, -2)
    return P


def _wrong_reverse_cumsum(x, dim):  # exclusive: off by one
    return x.flip(dim).cumsum(dim).flip(dim) - x


def _wrong_gate_gradient(q, k, dq, dk):  # forward cumulative sum
    return (q * dq - k * dk).cumsum(1)


WRONG = {  # exercise ID -> (a plausible wrong answer, words the message must contain)
    "1.1": (_wrong_step, "gate is missing"),
    "1.2": (_wrong_recurrent, "off by one step"),
    "1.3": (_wrong_gate, "τ multiplies"),
    "2.1": (_wrong_naive, "diagonal"),
    "2.2": (_wrong_log_space, "off by one"),
    "3.1": (_wrong_to_chunks, "transpose"),
    "3.2": (_wrong_chunk_states, "ENTERING chunk n"),
    "3.3": (_wrong_intra, "causal mask is missing"),
    "3.4": (_wrong_inter, "q is not decayed"),
    "4.1": (_wrong_block, "transposed"),
    "4.2": (_wrong_scores, "diagonal sub-chunks are missing"),
    "5.1": (_wrong_reverse_cumsum, "off by one"),
    "5.2": (_wrong_gate_gradient, "forward cumulative sum"),
}


def test_every_chapter_1_to_5_exercise_has_a_hand_written_wrong_answer_here():
    ids = {i for i in checks.exercises() if int(i.split(".")[0]) <= 5}
    assert ids == set(WRONG)


@pytest.mark.parametrize("exercise_id", sorted(WRONG))
def test_plausible_wrong_answer_fails_with_a_message_that_points_at_the_mistake(exercise_id):
    fn, words = WRONG[exercise_id]
    result = run_check(checks.get(exercise_id), fn)
    assert result.status == FAILED, result.message
    assert words in result.message, result.message
    assert "first divergence" in result.message or "non-finite" in result.message


@pytest.mark.parametrize("exercise_id", sorted(checks.exercises()))
def test_every_registered_mistake_is_graded_failed_and_named(exercise_id):
    ex = checks.get(exercise_id)
    for mistake in ex.mistakes:
        result = run_check(ex, mistake.fn)
        assert result.status == FAILED and mistake.description in result.message, (mistake.description, result.message)


def test_a_hard_coded_output_fails():
    def hard_coded(x, dim):
        return torch.zeros_like(x)

    result = run_check(checks.get("5.1"), hard_coded)
    assert result.status == FAILED and "first divergence" in result.message


# ----------------------------------------------------------------------------- what the learner sees
def test_not_started_is_one_friendly_line_and_no_exception(capsys):
    def chunk_states(k_chunks, v_chunks, G, initial_state=None):
        raise NotImplementedError("Exercise 3.2 (chunk states): write your solution here")

    glalearn.check("3.2", chunk_states)  # must not raise
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not started" in out[0] and 'glalearn.check("3.2", chunk_states, hint=1)' in out[0]
    assert run_check(checks.get("3.2"), chunk_states).status == NOT_STARTED


def test_failure_prints_the_table_and_raises_an_assertion_error(capsys):
    with pytest.raises(AssertionError) as info:
        glalearn.check("3.2", _wrong_chunk_states)
    assert isinstance(info.value, CheckFailed) and "Exercise 3.2 (chunk states) failed" in str(info.value)
    out = capsys.readouterr().out
    assert "max abs err" in out and "rel err" in out and "FAIL" in out
    assert "first divergence (case" in out and "states[b=" in out and "likely mistake:" in out
    assert "✗ Exercise 3.2" in out


def test_passing_prints_a_tick_with_the_points(capsys):
    glalearn.check("3.2", SOLUTIONS["3.2"])
    assert "✓ Exercise 3.2 (chunk states): passed, 3/3 points" in capsys.readouterr().out


def test_wrong_shape_and_dtype_are_named_precisely():
    def transposed_state(k_chunks, v_chunks, G, initial_state=None):
        states, final = SOLUTIONS["3.2"](k_chunks, v_chunks, G, initial_state)
        return states.transpose(-1, -2), final

    result = run_check(checks.get("3.2"), transposed_state)
    assert result.status == FAILED and "states has shape" in result.message and "[B, H, N, K, V]" in result.message

    def float32_output(x, dim):
        return SOLUTIONS["5.1"](x, dim).float()

    result = run_check(checks.get("5.1"), float32_output)
    assert result.status == FAILED and "dtype torch.float32, expected torch.float64" in result.message

    def one_output(k_chunks, v_chunks, G, initial_state=None):
        return SOLUTIONS["3.2"](k_chunks, v_chunks, G, initial_state)[0]

    result = run_check(checks.get("3.2"), one_output)
    assert result.status == FAILED and "expected a tuple (states, final_state)" in result.message


def test_an_exception_in_the_learners_function_is_reported_then_re_raised(capsys):
    def broken(x, dim):
        raise RuntimeError("size mismatch in my code")

    with pytest.raises(RuntimeError, match="size mismatch in my code"):
        glalearn.check("5.1", broken)
    assert "error" in capsys.readouterr().out


def test_hints_are_progressive(capsys):
    glalearn.check("5.1", SOLUTIONS["5.1"], hint=2)
    out = capsys.readouterr().out
    assert "Hint 1 for Exercise 5.1" in out and "Hint 2 for Exercise 5.1" in out and "Hint 3" not in out
    with pytest.raises(ValueError, match="hint must be 1, 2 or 3"):
        glalearn.check("5.1", SOLUTIONS["5.1"], hint=4)


def test_the_gate_gradient_truth_equals_autograd_through_the_recurrence():
    """5.2's expected dg comes from autograd through parallel_gla; it must equal the loop's."""
    case = next(c for c in checks.get("5.2").cases(torch.Generator().manual_seed(3)) if "+S0" in c.label)
    gen = torch.Generator().manual_seed(3)
    x = glalearn.numerics.random_gla_inputs(B=1, T=37, H=2, K=12, V=20, gate_normalizer=1.0, dtype=torch.float64,
                                           seed=5, initial_state=True)
    w = torch.randn(1, 37, 2, 20, generator=gen, dtype=torch.float64)
    grads = []
    for form in (glalearn.recurrent_gla, glalearn.parallel_gla):
        g = x["g"].clone().requires_grad_(True)
        o, _ = form(x["q"], x["k"], x["v"], g, initial_state=x["initial_state"])
        grads.append(torch.autograd.grad((o * w).sum(), g)[0])
    assert glalearn.numerics.relative_rmse(grads[1], grads[0]) < 1e-12
    assert case.expected.shape == case.args[0].shape
