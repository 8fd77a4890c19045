"""glalearn.check: the registry, the worked solutions pass, plausible wrong answers fail with a pointed message,
the library's own answer scores nothing, and a check never raises for a wrong answer."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

import glalearn
from glalearn import checks
from glalearn.checks import ERROR, FAILED, NOT_STARTED, PASSED, core, run_check

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


def grade_outputs_of(ex, fn, seed=None):
    """The verdict on the outputs of ``fn`` (a plain function with the exercise's signature, even for a kernel
    exercise), with no reference guard: how the diagnosis reads a learner who made that mistake."""
    seed, cases = core.draw_cases(ex, seed)
    answers = []
    for case in cases:
        try:
            answers.append(core.Answer(value=fn(*core._clone(case.args), **core._clone(case.kwargs))))
        except Exception as exc:  # noqa: BLE001
            answers.append(core.Answer(raised=core.describe_exception(exc)))
    return core.evaluate(ex, cases, answers, seed)


@pytest.mark.parametrize("exercise_id", sorted(checks.exercises()))
def test_every_registered_mistake_is_graded_failed_and_named(exercise_id):
    ex = checks.get(exercise_id)
    assert ex.all_mistakes
    for mistake in ex.all_mistakes:
        result = grade_outputs_of(ex, mistake.fn)
        assert result.status in (FAILED, ERROR) and mistake.description in result.message, (
            mistake.description, result.message)


def test_a_hard_coded_output_fails():
    def hard_coded(x, dim):
        return torch.zeros_like(x)

    result = run_check(checks.get("5.1"), hard_coded)
    assert result.status == FAILED and "first divergence" in result.message


# ----------------------------------------------------------------------------- what the learner sees
def test_not_started_is_one_friendly_line_and_no_exception(capsys):
    def chunk_states(k_chunks, v_chunks, G, initial_state=None):
        raise NotImplementedError("Exercise 3.2 (chunk states): write your solution here")

    result = glalearn.check("3.2", chunk_states)  # must not raise
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not started" in out[0] and 'glalearn.check("3.2", chunk_states, hint=1)' in out[0]
    assert result.status == NOT_STARTED and result.points == 0 and not result.passed


def test_a_failing_check_prints_its_diagnosis_and_returns_a_result_without_raising(capsys):
    result = glalearn.check("3.2", _wrong_chunk_states)  # must not raise: Run All goes on
    assert isinstance(result, checks.CheckResult)
    assert result.status == FAILED and not result.passed and result.points == 0
    assert len(result.cases) == 4 and not all(c.ok for c in result.cases)
    out = capsys.readouterr().out
    assert "max abs err" in out and "rel err" in out and "FAIL" in out
    assert "first divergence (case" in out and "states[b=" in out and "likely mistake:" in out
    assert "✗ Exercise 3.2 (chunk states): failed, 0/3 points" in out
    assert "feedback, not the grade" in out and "glalearn grade exercises/03_chunkwise.ipynb" in out
    assert "Traceback" not in out
    assert result.table() in out and repr(result) == "<CheckResult 3.2: failed, 0/3 points>"


def test_passing_prints_a_tick_with_the_points(capsys):
    result = glalearn.check("3.2", SOLUTIONS["3.2"])
    assert "✓ Exercise 3.2 (chunk states): passed, 3/3 points" in capsys.readouterr().out
    assert result.passed and result.points == 3


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


def test_an_exception_in_the_learners_function_is_reported_with_its_line_and_not_raised(capsys):
    def broken(x, dim):
        raise RuntimeError("size mismatch in my code")

    result = glalearn.check("5.1", broken)  # must not raise
    assert result.status == ERROR and result.points == 0
    assert result.message.startswith("RuntimeError: size mismatch in my code (case ")
    assert 'in broken' in result.message and 'raise RuntimeError("size mismatch in my code")' in result.message
    out = capsys.readouterr().out
    assert "where your code raised it" in out and "✗ Exercise 5.1 (the reverse cumulative sum): error" in out
    assert "Traceback" not in out and "glalearn/checks" not in out  # only the learner's own frames


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


# ----------------------------------------------------------------------------- the library's answer scores nothing
@pytest.mark.parametrize("exercise_id", sorted(checks.exercises()))
def test_handing_in_the_librarys_reference_scores_nothing(exercise_id):
    ex = checks.get(exercise_id)
    result = run_check(ex, ex.reference)
    assert result.status == ERROR and result.points == 0, result.message
    expected = "grades a @triton.jit kernel" if ex.is_kernel else "the library's answer to this exercise"
    assert expected in result.message, result.message


def _calls_library(exercise_id):
    """A "solution" that returns what the library computes, through the library's public names."""
    from glalearn.forms.chunk import chunk_states, reverse_cumsum, to_chunks
    from glalearn.layers import GatedLinearAttention
    from glalearn.tasks.mqar import mqar_layout

    def recurrent(q, k, v, g, scale=None, initial_state=None):
        return glalearn.recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=True)

    def one_step(state, q_t, k_t, v_t, g_t, scale):  # a length-1 sequence through the chunk form
        o, S = glalearn.chunk_gla(q_t[:, None], k_t[:, None], v_t[:, None], g_t[:, None], scale=scale,
                                  initial_state=state, output_final_state=True)
        return o[:, 0], S

    def layer(x, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
        return checks.ch08.layer_from_weights(W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads)(x)

    def fixed(x):
        return GatedLinearAttention(x.shape[2] * x.shape[3], x.shape[2], expand_k=1.0, gate="fixed").log_gate(
            torch.zeros(*x.shape[:2], x.shape[2] * x.shape[3])).to(x.dtype)

    return {"1.1": one_step, "1.2": recurrent, "3.1": to_chunks, "3.2": chunk_states, "5.1": reverse_cumsum,
            "8.1": layer, "10.1": mqar_layout, "10.2": fixed,
            "1.3": lambda x, W1, W2, b, normalizer=16.0: glalearn.gates.gla_gate(x, W1, W2, b, normalizer)}[exercise_id]


@pytest.mark.parametrize("exercise_id", ["1.1", "1.2", "1.3", "3.1", "3.2", "5.1", "8.1", "10.1", "10.2"])
def test_calling_the_library_by_its_public_name_scores_nothing(exercise_id):
    result = run_check(checks.get(exercise_id), _calls_library(exercise_id))
    assert result.status == ERROR and "the library's answer" in result.message, result.message


def test_a_swallowed_refusal_still_scores_nothing_and_the_library_works_again_afterwards():
    def sneaky(x, dim):
        try:
            return glalearn.forms.chunk.reverse_cumsum(x, dim)
        except Exception:  # noqa: BLE001
            return SOLUTIONS["5.1"](x, dim)  # the right answer, after calling the reference

    result = run_check(checks.get("5.1"), sneaky)
    assert result.status == ERROR and "calls glalearn.forms.chunk.reverse_cumsum" in result.message
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(glalearn.forms.chunk.reverse_cumsum(x, 1), x.flip(1).cumsum(1).flip(1))


def test_library_functions_an_exercise_builds_on_stay_usable():
    """8.1 may use any GLA form: its worked solution calls chunk_gla and passes."""
    assert "glalearn.forms.chunk.chunk_gla" not in checks.get("8.1").forbidden
    assert run_check(checks.get("8.1"), SOLUTIONS["8.1"]).status == PASSED


def test_every_refused_name_is_a_function_the_guard_can_refuse():
    from glalearn.checks import guard

    for ex in checks.exercises().values():
        for target in ex.refused():
            assert guard.resolve(target) is not None, (ex.id, target)


# ----------------------------------------------------------------------------- kernels are kernels
@pytest.mark.parametrize("exercise_id", ["6.1", "6.2", "7.1"])
def test_a_kernel_exercise_does_not_accept_a_plain_function(exercise_id):
    ex = checks.get(exercise_id)
    result = run_check(ex, ex.reference)  # right numbers, pure PyTorch
    assert result.status == ERROR and result.points == 0
    assert "grades a @triton.jit kernel that the check launches itself" in result.message


@pytest.mark.parametrize("exercise_id", ["6.1", "6.2", "7.1"])
def test_the_check_launches_the_learners_kernel(exercise_id):
    kernel = SOLUTIONS[exercise_id]
    assert core.is_triton_kernel(kernel)
    result = run_check(checks.get(exercise_id), kernel)
    assert result.status == PASSED, result.message


def _kernel_variant(exercise_id, old, new):
    """The worked kernel of an exercise with one line changed, for Triton's interpreter."""
    import triton
    import triton.language as tl

    name = checks.get(exercise_id).function_name
    source = next(c.source for c in _solution_cells() if f"def {name}(" in c.source)
    source = "\n".join(line for line in source.splitlines() if "### " not in line)
    assert old in source, old
    namespace = {"triton": triton, "tl": tl}
    exec(compile(source.replace(old, new), f"<{name} variant>", "exec"), namespace)  # noqa: S102  (our own notebook)
    return namespace[name]


def _solution_cells():
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        yield from (c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


# ----------------------------------------------------------------------------- states: transposed, k_tᵀv_t, layout
STATE_EXERCISES = sorted(i for i, e in checks.exercises().items() if e.state_outputs)


def test_the_exercises_that_return_a_state_are_the_ones_we_think():
    assert STATE_EXERCISES == ["1.1", "1.2", "3.2", "6.1", "7.1", "9.1"]


def _with_states_transposed(ex, fn):
    names = [n for n, _ in ex.outputs]

    def transposed(*args, **kwargs):
        out = list(fn(*args, **kwargs))
        for i, name in enumerate(names):
            if name in ex.state_outputs:
                out[i] = out[i].transpose(-1, -2)
        return tuple(out)
    return transposed


KERNEL_STATE_STORE = {  # a kernel that stores every state element (c, v) at v·K + c: [V, K] order
    "6.1": ("state_offsets = rk[:, None] * V + rv[None, :]", "state_offsets = rk[:, None] + rv[None, :] * K"),
    "7.1": ("state_offsets = rk[:, None] * V + rv[None, :]", "state_offsets = rk[:, None] + rv[None, :] * K"),
}


@pytest.mark.parametrize("exercise_id", STATE_EXERCISES)
def test_a_transposed_state_is_named_for_every_exercise_that_returns_a_state(exercise_id):
    ex = checks.get(exercise_id)
    if ex.is_kernel:
        learner = _kernel_variant(exercise_id, *KERNEL_STATE_STORE[exercise_id])
        words = "stored in [V, K] order: element (c, v) of a state belongs at offset c·V + v"
    else:
        learner = _with_states_transposed(ex, SOLUTIONS[exercise_id])
        words = "transposed: a state is [K, V]"
    result = run_check(ex, learner)
    assert result.status == FAILED and result.points == 0, result.message
    assert result.message.startswith(f"likely mistake: {' and '.join(ex.state_outputs)} "), result.message
    assert words in result.message, result.message


def _step_kv_transposed(state, q_t, k_t, v_t, g_t, scale):
    new_state = g_t.exp().unsqueeze(-1) * state + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)
    return scale * (q_t.unsqueeze(-2) @ new_state).squeeze(-2), new_state


def _recurrent_kv_transposed(q, k, v, g, scale=None, initial_state=None):
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o_t, S = _step_kv_transposed(S, q[:, t], k[:, t], v[:, t], g[:, t], K ** -0.5 if scale is None else scale)
        outs.append(o_t)
    return torch.stack(outs, 1), S


def _chunk_states_kv_transposed(k_chunks, v_chunks, G, initial_state=None):
    gamma = G[:, :, :, -1:, :]
    updates = v_chunks.transpose(-1, -2) @ (k_chunks * (gamma - G).exp())  # V_nᵀ (K_n ⊙ Γ_n): [V, K]
    S = k_chunks.new_zeros(*k_chunks.shape[:2], k_chunks.shape[-1], v_chunks.shape[-1]) \
        if initial_state is None else initial_state
    states = []
    for n in range(k_chunks.shape[2]):
        states.append(S)
        S = gamma[:, :, n].exp().transpose(-1, -2) * S + updates[:, :, n]
    return torch.stack(states, 2), S


def _gla_step_kv_transposed(x_t, state, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    from torch.nn import functional as F

    B = x_t.shape[0]
    q, k, v = ((x_t @ W).view(B, num_heads, -1) for W in (W_q, W_k, W_v))
    g = (F.logsigmoid(x_t @ W_1 @ W_2 + b) / 16).view(B, num_heads, -1)
    new_state = g.exp().unsqueeze(-1) * state + v.unsqueeze(-1) * k.unsqueeze(-2)
    o = q.shape[-1] ** -0.5 * (q.unsqueeze(-2) @ new_state).squeeze(-2)
    o = F.rms_norm(o, (o.shape[-1],), w_norm, 1e-5).flatten(1)
    return (o * F.silu(x_t @ W_r)) @ W_o, new_state


KV_TRANSPOSED = {"1.1": _step_kv_transposed, "1.2": _recurrent_kv_transposed, "3.2": _chunk_states_kv_transposed,
                 "9.1": _gla_step_kv_transposed}
KERNEL_KV_TRANSPOSED = {
    "6.1": ("tl.dot(tl.trans(k_n * tl.exp(gamma[None, :] - G)), v_n)", "tl.dot(tl.trans(v_n), k_n * tl.exp(gamma[None, :] - G))"),
    "7.1": ("tl.dot(tl.trans(scale * q_n * tl.exp(G)), do_n)", "tl.dot(tl.trans(do_n), scale * q_n * tl.exp(G))"),
}


@pytest.mark.parametrize("exercise_id", STATE_EXERCISES)
def test_a_transposed_outer_product_is_named_for_every_exercise_that_returns_a_state(exercise_id):
    ex = checks.get(exercise_id)
    learner = _kernel_variant(exercise_id, *KERNEL_KV_TRANSPOSED[exercise_id]) if ex.is_kernel \
        else KV_TRANSPOSED[exercise_id]
    result = run_check(ex, learner)
    assert result.points == 0 and result.status in (FAILED, ERROR), result.message
    named = [core.KV_TRANSPOSED, checks.ch06.KV_KERNEL, "the update (q_[n] ⊙ Λ_[n])ᵀ do_[n] is transposed",
             core.KV_MIXUP.split(":")[0]]
    assert any(n in result.message for n in named), result.message


def _step_vk_layout(state, q_t, k_t, v_t, g_t, scale):  # the whole step with S kept as [V, K]
    new_state = state * g_t.exp().unsqueeze(-2) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)
    return scale * (new_state @ q_t.unsqueeze(-1)).squeeze(-1), new_state


def _inter_vk_layout(q_chunks, states, G, scale):  # reads states as [V, K]
    return scale * (q_chunks * G.exp()) @ states.transpose(-1, -2)


def _gla_step_vk_layout(x_t, state, W_q, W_k, W_v, W_1, W_2, b, W_r, w_norm, W_o, num_heads):
    from torch.nn import functional as F

    B = x_t.shape[0]
    q, k, v = ((x_t @ W).view(B, num_heads, -1) for W in (W_q, W_k, W_v))
    g = (F.logsigmoid(x_t @ W_1 @ W_2 + b) / 16).view(B, num_heads, -1)
    new_state = g.exp().unsqueeze(-2) * state + v.unsqueeze(-1) * k.unsqueeze(-2)  # [V, K]
    o = q.shape[-1] ** -0.5 * (new_state @ q.unsqueeze(-1)).squeeze(-1)
    o = F.rms_norm(o, (o.shape[-1],), w_norm, 1e-5).flatten(1)
    return (o * F.silu(x_t @ W_r)) @ W_o, new_state


def _recurrent_vk_layout(q, k, v, g, scale=None, initial_state=None):
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, v.shape[-1], K) if initial_state is None else initial_state  # [V, K]
    outs = []
    for t in range(T):
        o_t, S = _step_vk_layout(S, q[:, t], k[:, t], v[:, t], g[:, t], K ** -0.5 if scale is None else scale)
        outs.append(o_t)
    return torch.stack(outs, 1), S


def _chunk_states_vk_layout(k_chunks, v_chunks, G, initial_state=None):
    gamma = G[:, :, :, -1:, :]
    updates = v_chunks.transpose(-1, -2) @ (k_chunks * (gamma - G).exp())  # [V, K]
    S = k_chunks.new_zeros(*k_chunks.shape[:2], v_chunks.shape[-1], k_chunks.shape[-1]) \
        if initial_state is None else initial_state
    states = []
    for n in range(k_chunks.shape[2]):
        states.append(S)
        S = gamma[:, :, n].exp() * S + updates[:, :, n]  # decays the columns (key channels) of [V, K]
    return torch.stack(states, 2), S


@pytest.mark.parametrize(("exercise_id", "learner"), [
    ("1.1", _step_vk_layout), ("1.2", _recurrent_vk_layout), ("3.2", _chunk_states_vk_layout),
    ("3.4", _inter_vk_layout), ("9.1", _gla_step_vk_layout)])
def test_a_state_kept_as_v_by_k_is_named_not_a_raw_torch_error(exercise_id, learner):
    result = run_check(checks.get(exercise_id), learner)
    assert result.points == 0 and result.status in (FAILED, ERROR), result.message
    assert "likely mistake: " in result.message and ("[V, K]" in result.message), result.message


# ----------------------------------------------------------------------------- statements and stubs
@pytest.mark.parametrize("exercise_id", sorted(checks.exercises()))
def test_every_statement_names_the_dtype_of_every_tensor_it_is_given(exercise_id):
    ex = checks.get(exercise_id)
    dtypes = set()
    for case in ex.cases(torch.Generator().manual_seed(0)):
        for x in (*case.args, *case.kwargs.values()):
            if isinstance(x, torch.Tensor):
                dtypes.add(str(x.dtype).removeprefix("torch."))
    assert dtypes
    for dtype in dtypes:
        assert dtype in ex.statement, f"{exercise_id}: the statement never says its inputs are {dtype}"
