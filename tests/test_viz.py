"""glalearn.viz: gate-decay data, plots and the explorer widget, tested without a browser."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from glalearn import gates, viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_constant_pattern_gives_geometric_decay():
    """A constant token gives a constant gate α per channel, so b_t = α^t (the known-gate check)."""
    tau, bias, T, K, d = 8.0, 1.5, 40, 5, 24
    curves = viz.gate_decay_curves(tau=tau, bias=bias, pattern="constant", T=T, key_dim=K, d_model=d, seed=3)
    W1, W2 = viz.explorer_gate_weights(d, K, seed=3)
    x = viz.gate_inputs("constant", T, W1, W2, seed=3)
    assert torch.equal(x[0], x[-1])
    alpha = torch.sigmoid(x[0] @ W1 @ W2 + bias) ** (1 / tau)  # α = σ(x W1 W2 + b)^(1/τ), independently
    t = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(curves.b, alpha ** t, rtol=1e-12, atol=0)
    torch.testing.assert_close(curves.g, alpha.log().expand(T, K), rtol=1e-12, atol=0)
    # The mask of one channel: D[t, s] = α^(t - s) below the diagonal, 0 above.
    a = alpha[curves.channel]
    i = torch.arange(T, dtype=torch.float64)
    expected = torch.where(i[:, None] >= i[None, :], a ** (i[:, None] - i[None, :]), torch.zeros(()))
    torch.testing.assert_close(curves.mask, expected, rtol=1e-10, atol=1e-300)


def test_retnet_decay_is_fixed_and_geometric():
    curves = viz.gate_decay_curves(tau=3.0, bias=-2.0, pattern="random", T=30, key_dim=3)
    gammas = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(3)], dtype=torch.float64)
    t = torch.arange(1, 31, dtype=torch.float64)[:, None]
    # retnet_log_decay is float32, hence rtol 1e-6.
    torch.testing.assert_close(curves.retnet_b, gammas ** t, rtol=1e-6, atol=0)
    other = viz.gate_decay_curves(tau=30.0, bias=5.0, pattern="reset", T=30, key_dim=3)
    assert torch.equal(curves.retnet_mask, other.retnet_mask)  # RetNet ignores the input and τ


def test_larger_tau_forgets_more_slowly():
    slow = viz.gate_decay_curves(tau=32.0, pattern="random", seed=1)
    fast = viz.gate_decay_curves(tau=2.0, pattern="random", seed=1)
    assert (slow.b[1:] > fast.b[1:]).all()
    torch.testing.assert_close(slow.g * 32, fast.g * 2)  # τ only divides the log gate


def test_reset_token_wipes_the_memory():
    T = 64
    curves = viz.gate_decay_curves(tau=1.0, pattern="reset", T=T)
    assert curves.reset_at == T // 2
    # The reset token's logits are RESET_LOGIT = -40 in every channel: log α = logsigmoid(-40) / τ.
    expected = torch.nn.functional.logsigmoid(torch.tensor(viz.RESET_LOGIT, dtype=torch.float64))
    torch.testing.assert_close(curves.g[T // 2], expected.expand(curves.g.shape[1]), rtol=1e-8, atol=0)
    # Nothing from before the reset reaches a query at or after it ...
    assert curves.mask[T // 2 :, : T // 2].max() < 1e-15
    # ... while without the reset token the previous token is still partly there.
    constant = viz.gate_decay_curves(tau=1.0, pattern="constant", T=T)
    assert constant.mask[T // 2, T // 2 - 1] > 0.1 and curves.mask[T // 2 - 1, T // 2 - 2] > 0.1


def test_mask_agrees_with_the_gates_module():
    curves = viz.gate_decay_curves(pattern="random", T=20, key_dim=3, channel=2)
    torch.testing.assert_close(curves.mask, gates.decay_mask(curves.g[:, 2]))
    torch.testing.assert_close(curves.log_b, curves.g.cumsum(0))
    assert (curves.g < 0).all()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="pattern must be one of"):
        viz.gate_decay_curves(pattern="sawtooth")
    with pytest.raises(ValueError, match=r"tau \(τ\) must be a number > 0, got 0"):
        viz.gate_decay_curves(tau=0)
    with pytest.raises(ValueError, match="channel must be in"):
        viz.gate_decay_curves(key_dim=4, channel=4)
    with pytest.raises(ValueError, match="T must be a positive int"):
        viz.gate_decay_curves(T=0)
    with pytest.raises(ValueError, match=r"b must be \[T, K\]"):
        viz.plot_gate_decay(torch.rand(5))
    with pytest.raises(ValueError, match=r"mask must be square \[T, T\]"):
        viz.plot_decay_mask(torch.rand(4, 5))


def test_plot_gate_decay_draws_one_line_per_channel():
    b = torch.rand(12, 3).cumprod(0)
    ax = viz.plot_gate_decay(b, title="my title", mark=5)
    lines = ax.get_lines()
    assert len(lines) == 4  # three channels + the reset marker
    for c in range(3):
        assert list(lines[c].get_ydata()) == pytest.approx(b[:, c].tolist())
        assert list(lines[c].get_xdata()) == list(range(12))  # tokens t = 0 ... T-1
    assert list(lines[3].get_xdata()) == [5, 5]  # the marked token itself
    assert ax.get_title() == "my title"
    assert ax.get_xlabel() == "token t" and ax.get_ylabel() == "b_t = α_0 ⋯ α_t"


def test_plot_decay_mask_shows_the_matrix():
    mask = gates.decay_mask(torch.nn.functional.logsigmoid(torch.randn(9)) / 4)
    ax = viz.plot_decay_mask(mask, title="mask")
    image = ax.get_images()[0]
    assert image.get_array().shape == (9, 9)
    torch.testing.assert_close(torch.as_tensor(image.get_array()).double(), mask.double())
    assert image.get_clim() == (0.0, 1.0)
    assert ax.get_xlabel() == "key position s" and ax.get_ylabel() == "query position t"


def test_explorer_figure_has_four_titled_panels():
    curves = viz.gate_decay_curves(tau=4.0, bias=2.0, pattern="reset")
    fig = viz.plot_gate_explorer(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "GLA gate (τ = 4, bias = 2, reset): b_t"
    assert "GLA decay mask" in titles[1] and "RetNet" in titles[2] and "RetNet decay mask" in titles[3]
    assert "ρ_h = 1 − 2^(−5−h)" in titles[2] and "γ" not in titles[2]
    width, height = fig.get_size_inches()
    assert (width, height) == (9, 6) and fig.dpi <= 100
    png = viz.figure_png(fig)
    assert png.startswith(b"\x89PNG") and len(png) < 200_000


def test_summary_reports_each_channel():
    curves = viz.gate_decay_curves(tau=16.0, pattern="constant", T=10, key_dim=2)
    lines = curves.summary().splitlines()
    assert lines[0] == "τ = 16, bias = 0, pattern = 'constant', T = 10"
    assert len(lines) == 3 and f"b_{{T−1}} = {curves.b[-1, 1]:.2e}" in lines[2]
    assert f"ρ_h = {1 - 2 ** -6:.4f}" in lines[2] and f"ρ_h^T = {(1 - 2 ** -6) ** 10:.2e}" in lines[2]
    assert "γ" not in curves.summary() and "b_T " not in curves.summary()  # the book's notation


def test_explorer_widget_redraws_when_controls_move():
    import ipywidgets

    explorer = viz.gate_decay_explorer(T=32, key_dim=3)
    assert isinstance(explorer, ipywidgets.VBox) and isinstance(explorer, viz.GateDecayExplorer)
    assert "τ" in explorer.tau_slider.description
    assert explorer.tau_slider.value == 16 and explorer.curves.tau == 16
    assert set(explorer.pattern_dropdown.options) == {
        ("constant token", "constant"), ("a reset token at t = T/2", "reset"), ("random tokens", "random")}
    first = explorer.png
    assert first.startswith(b"\x89PNG")
    explorer.tau_slider.value = 2  # the observer redraws
    assert explorer.curves.tau == 2 and explorer.png != first
    assert explorer.curves.b[-1].max() < viz.gate_decay_curves(tau=16, T=32, key_dim=3).b[-1].min()
    second = explorer.png
    explorer.bias_slider.value = 4.0
    assert explorer.curves.bias == 4.0 and explorer.png != second
    explorer.pattern_dropdown.value = "reset"
    assert explorer.curves.reset_at == 16
    assert "α_t in" in explorer.summary.value
    direct = explorer.update()  # the method a notebook cell calls to check the callback works
    assert direct is explorer.curves and math.isclose(direct.tau, 2.0)
    assert len(explorer.output.outputs) == 1  # redrawn in place, not appended
    assert explorer.output.outputs[0]["data"]["image/png"]


def test_explorer_rejects_a_bad_pattern():
    with pytest.raises(ValueError, match="pattern must be one of"):
        viz.gate_decay_explorer(pattern="zigzag")


def test_explorer_shows_a_callback_error_in_place_and_update_raises(monkeypatch):
    explorer = viz.gate_decay_explorer(T=16, key_dim=2)
    assert explorer.error is None

    def broken(**kwargs):
        raise RuntimeError("broken gate")

    monkeypatch.setattr(viz, "gate_decay_curves", broken)
    explorer.tau_slider.value = 3  # the callback must not swallow the error silently
    assert isinstance(explorer.error, RuntimeError)
    (shown,) = explorer.output.outputs
    assert shown["output_type"] == "error" and shown["evalue"] == "broken gate"
    with pytest.raises(RuntimeError, match="broken gate"):
        explorer.update()
