"""Pictures of the gate: decay curves, decay masks and the interactive gate-decay explorer (chapter 1).

The data functions (:func:`explorer_gate_weights`, :func:`gate_inputs`, :func:`gate_decay_curves`) and
the plotting functions (:func:`plot_gate_decay`, :func:`plot_decay_mask`, :func:`plot_gate_explorer`)
need only torch and matplotlib; :func:`gate_decay_explorer` wires them to ipywidgets sliders.

What the explorer shows. A token x_t [d] goes through the paper's low-rank gate (§4.4)

    g_t = logsigmoid(x_t W1 W2 + b_α) / τ,      b_t = exp(g_0 + ... + g_t)   (cumulative decay)

and the T x T decay mask D[t, s] = b_t / b_s says how much of token s is left in the state at time t.
Next to it, RetNet's fixed decay ρ_h = 1 - 2^(-5-h) gives the same pictures without any input.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass

import torch

from glalearn.gates import (
    GATE_LOGIT_NORMALIZER,
    GATE_LOW_RANK_DIM,
    cumulative_log_decay,
    decay_mask,
    gla_gate,
    retnet_log_decay,
)

PATTERNS = ("constant", "reset", "random")
RESET_LOGIT = -40.0  # the gate logit a "reset" token produces (before the bias): sigmoid ≈ 4e-18


def explorer_gate_weights(d_model: int = 32, key_dim: int = 4, low_rank_dim: int = GATE_LOW_RANK_DIM,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random low-rank gate weights W1 [d_model, r], W2 [r, key_dim] in float64 (chapter 1).

    Scaled so that a standard-normal token gives gate logits x W1 W2 of about unit size.
    """
    for name, value in (("d_model", d_model), ("key_dim", key_dim), ("low_rank_dim", low_rank_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.randn(d_model, low_rank_dim, generator=gen, dtype=torch.float64) / d_model ** 0.5
    W2 = torch.randn(low_rank_dim, key_dim, generator=gen, dtype=torch.float64) / low_rank_dim ** 0.5
    return W1, W2


def gate_inputs(pattern: str, T: int, W1: torch.Tensor, W2: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Tokens x [T, d_model] (float64) for one of the explorer's input patterns (chapter 1).

    - "constant": the same token at every step, so the gate is constant and b_t = α^(t+1) per channel.
    - "reset": the constant token, except at t = T // 2 a token whose gate logits x W1 W2 all equal
      RESET_LOGIT (-40): that token tells every channel to forget.
    - "random": a fresh standard-normal token at every step.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    d_model = W1.shape[0]
    gen = torch.Generator().manual_seed(seed)
    token = torch.randn(d_model, generator=gen, dtype=torch.float64)
    if pattern == "random":
        return torch.randn(T, d_model, generator=gen, dtype=torch.float64)
    x = token.expand(T, d_model).clone()
    if pattern == "reset":
        # The least-norm token whose logits are RESET_LOGIT in every channel: solve x (W1 W2) = target.
        W = (W1 @ W2).to(torch.float64)
        target = torch.full((1, W.shape[1]), RESET_LOGIT, dtype=torch.float64)
        x[T // 2] = (target @ torch.linalg.pinv(W))[0]
    return x


@dataclass
class GateDecayCurves:
    """Everything the explorer draws, for one setting of (τ, bias, pattern) (chapter 1).

    g, log_b, b: [T, K] log gates, cumulative log decay G_t and cumulative decay b_t = exp(G_t).
    mask: [T, T] decay mask D[t, s] = exp(G_t - G_s) (s <= t) of channel ``channel``.
    retnet_g: [K] RetNet's fixed log decays; retnet_b [T, K]; retnet_mask [T, T] for the same channel.
    """

    tau: float
    bias: float
    pattern: str
    channel: int
    reset_at: int | None
    g: torch.Tensor
    log_b: torch.Tensor
    b: torch.Tensor
    mask: torch.Tensor
    retnet_g: torch.Tensor
    retnet_b: torch.Tensor
    retnet_mask: torch.Tensor

    def summary(self) -> str:
        """One line per channel: α range, the decay after all T tokens b_{T−1}, and RetNet's (head h = c)."""
        T, K = self.b.shape
        alpha = self.g.exp()
        lines = [f"τ = {self.tau:g}, bias = {self.bias:g}, pattern = {self.pattern!r}, T = {T}"]
        for c in range(K):
            lines.append(
                f"  channel {c}: α_t in [{alpha[:, c].min():.3f}, {alpha[:, c].max():.3f}], "
                f"b_{{T−1}} = {self.b[-1, c]:.2e}   (RetNet head {c}: ρ_h = {self.retnet_g[c].exp():.4f}, "
                f"b_{{T−1}} = ρ_h^T = {self.retnet_b[-1, c]:.2e})"
            )
        return "\n".join(lines)


def gate_decay_curves(tau: float = GATE_LOGIT_NORMALIZER, bias: float = 0.0, pattern: str = "constant",
                      T: int = 64, key_dim: int = 4, d_model: int = 32, channel: int = 0,
                      seed: int = 0) -> GateDecayCurves:
    """The decay curves and masks of the paper's gate and of RetNet's fixed decay (chapter 1).

    Args:
        tau: the gate logit normalizer τ > 0 (paper: 16).
        bias: added to every channel's gate logit (b_α in logsigmoid(x W_α¹ W_α² + b_α) / τ).
        pattern: "constant", "reset" or "random" (see :func:`gate_inputs`).
        T: tokens;  key_dim: K channels;  d_model: token width;  channel: which channel's mask.
        seed: fixes the gate weights and the tokens.
    Returns:
        GateDecayCurves with g, log_b, b [T, K], mask [T, T], and the RetNet counterparts (float64).
    """
    if not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau (τ) must be a number > 0, got {tau!r}")
    if not 0 <= channel < key_dim:
        raise ValueError(f"channel must be in [0, key_dim={key_dim}), got {channel}")
    W1, W2 = explorer_gate_weights(d_model, key_dim, seed=seed)
    x = gate_inputs(pattern, T, W1, W2, seed=seed)
    b_vec = torch.full((key_dim,), float(bias), dtype=torch.float64)
    g = gla_gate(x, W1, W2, b_vec, normalizer=float(tau))  # [T, K]
    log_b = cumulative_log_decay(g, dim=0)
    retnet_g = retnet_log_decay(key_dim).to(torch.float64)  # one fixed decay per head: here per channel
    retnet_gates = retnet_g.expand(T, key_dim)
    return GateDecayCurves(
        tau=float(tau), bias=float(bias), pattern=pattern, channel=channel,
        reset_at=T // 2 if pattern == "reset" else None,
        g=g, log_b=log_b, b=log_b.exp(), mask=decay_mask(g[:, channel]),
        retnet_g=retnet_g, retnet_b=cumulative_log_decay(retnet_gates, dim=0).exp(),
        retnet_mask=decay_mask(retnet_gates[:, channel]),
    )


def plot_gate_decay(b: torch.Tensor, ax=None, title: str = "cumulative decay b_t per channel",
                    label: str = "channel", mark: int | None = None):
    """Line plot of the cumulative decay b_t [T, K], one line per channel, t = 0..T−1 (chapter 1).

    ``mark`` draws a dashed vertical line at that token t, e.g. a reset token. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if b.dim() != 2:
        raise ValueError(f"b must be [T, K], got shape {tuple(b.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    t = torch.arange(b.shape[0])
    for c in range(b.shape[1]):
        ax.plot(t.numpy(), b[:, c].detach().double().numpy(), label=f"{label} {c}")
    if mark is not None:
        ax.axvline(mark, color="k", linestyle="--", linewidth=1, label="reset token")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(0, max(b.shape[0] - 1, 1))
    ax.set_xlabel("token t")
    ax.set_ylabel("b_t = α_0 ⋯ α_t")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    return ax


def plot_decay_mask(mask: torch.Tensor, ax=None, title: str = "decay mask D[t, s]", colorbar: bool = True):
    """Image of a T x T decay mask D[t, s] (row t = query, column s = key), values in [0, 1] (chapter 1)."""
    import matplotlib.pyplot as plt

    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be square [T, T], got shape {tuple(mask.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3.5), dpi=80)
    image = ax.imshow(mask.detach().double().numpy(), vmin=0.0, vmax=1.0, cmap="viridis",
                      interpolation="nearest")
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_gate_explorer(curves: GateDecayCurves, figsize=(9, 6), dpi: int = 72):
    """The explorer's 2 x 2 figure: GLA decay curves and mask (top), RetNet's (bottom) (chapter 1)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=figsize, dpi=dpi, gridspec_kw={"width_ratios": [1.5, 1]})
    c = curves.channel
    plot_gate_decay(curves.b, ax=axes[0, 0], mark=curves.reset_at,
                    title=f"GLA gate (τ = {curves.tau:g}, bias = {curves.bias:g}, {curves.pattern}): b_t")
    plot_decay_mask(curves.mask, ax=axes[0, 1], title=f"GLA decay mask, channel {c}")
    plot_gate_decay(curves.retnet_b, ax=axes[1, 0], label="head",
                    title="RetNet fixed decay ρ_h = 1 − 2^(−5−h): b_t = ρ_h^(t+1)")
    plot_decay_mask(curves.retnet_mask, ax=axes[1, 1], title=f"RetNet decay mask, head {c}")
    # Fixed margins rather than tight_layout: the same picture, and a faster redraw for the sliders.
    fig.subplots_adjust(left=0.07, right=0.94, bottom=0.08, top=0.94, wspace=0.25, hspace=0.38)
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (the explorer shows these, whatever the matplotlib backend)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def gate_decay_explorer(T: int = 64, key_dim: int = 4, d_model: int = 32, seed: int = 0,
                        tau: float = GATE_LOGIT_NORMALIZER, bias: float = 0.0, pattern: str = "constant"):
    """The interactive gate-decay explorer of chapter 1: sliders for τ and the bias, a pattern menu.

    Returns a :class:`GateDecayExplorer` (an ipywidgets VBox); display it as a cell's last value.
    Each change redraws :func:`plot_gate_explorer` as a PNG in the widget's Output area.
    ``explorer.update()`` redraws by hand and returns the GateDecayCurves (so tests can call it).
    """
    return _explorer_class()(T=T, key_dim=key_dim, d_model=d_model, seed=seed, tau=tau, bias=bias,
                             pattern=pattern)


@functools.cache
def _explorer_class():
    import ipywidgets as widgets

    class _GateDecayExplorer(widgets.VBox):
        """Sliders (τ, bias), a pattern dropdown, a text summary and the redrawn figure (chapter 1)."""

        def __init__(self, T, key_dim, d_model, seed, tau, bias, pattern):
            if pattern not in PATTERNS:
                raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
            self.sizes = {"T": T, "key_dim": key_dim, "d_model": d_model, "seed": seed}
            style = {"description_width": "initial"}
            layout = widgets.Layout(width="420px")
            self.tau_slider = widgets.FloatSlider(
                value=tau, min=1.0, max=32.0, step=1.0, description="τ (gate normalizer)",
                continuous_update=False, style=style, layout=layout, readout_format=".0f")
            self.bias_slider = widgets.FloatSlider(
                value=bias, min=-4.0, max=8.0, step=0.5, description="gate-logit bias b_α",
                continuous_update=False, style=style, layout=layout, readout_format=".1f")
            self.pattern_dropdown = widgets.Dropdown(
                options=[("constant token", "constant"), ("a reset token at t = T/2", "reset"),
                         ("random tokens", "random")],
                value=pattern, description="input pattern", style=style, layout=layout)
            self.summary = widgets.HTML()
            self.output = widgets.Output(layout=widgets.Layout(min_height="440px"))
            self.png = b""
            self.curves = None
            super().__init__([self.tau_slider, self.bias_slider, self.pattern_dropdown, self.summary,
                              self.output])
            self.error = None
            for control in (self.tau_slider, self.bias_slider, self.pattern_dropdown):
                control.observe(self._on_change, names="value")
            self.update()

        def _on_change(self, change) -> None:
            # A slider callback's exception would only reach the kernel's log, out of the learner's
            # sight: show it where the figure was instead (update() called directly still raises).
            try:
                self.update()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - shown to the learner, kept on self.error
                import traceback

                self.error = exc
                self.output.outputs = ({
                    "output_type": "error", "ename": type(exc).__name__, "evalue": str(exc),
                    "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
                },)

        def update(self, change=None) -> GateDecayCurves:
            """Recompute the curves for the current control values and redraw the figure."""
            import matplotlib.pyplot as plt

            # An error here propagates (and fails a test that calls update()); a callback error is
            # also shown by the kernel.
            curves = gate_decay_curves(tau=self.tau_slider.value, bias=self.bias_slider.value,
                                       pattern=self.pattern_dropdown.value, **self.sizes)
            fig = plot_gate_explorer(curves)
            png = figure_png(fig)
            plt.close(fig)
            alpha = curves.g.exp()
            self.summary.value = (
                f"α_t in [{alpha.min():.3f}, {alpha.max():.3f}] over all channels; "
                f"after T = {curves.b.shape[0]} tokens b_{{T−1}} in [{curves.b[-1].min():.1e}, "
                f"{curves.b[-1].max():.1e}]")
            self.curves, self.png = curves, png
            # Replace the Output's contents in one state update: the image is redrawn in place, with no
            # flicker, and this also works outside a kernel (where `with output:` captures nothing).
            self.output.outputs = ({
                "output_type": "display_data",
                "data": {"image/png": base64.b64encode(png).decode("ascii"),
                         "text/plain": "<gate-decay explorer figure>"},
                "metadata": {"image/png": {"width": int(fig.get_figwidth() * fig.dpi)}},
            },)
            return curves

    return _GateDecayExplorer


def __getattr__(name: str):
    # GateDecayExplorer subclasses an ipywidgets class, so it is built on first use: importing
    # glalearn.viz for its plots does not need ipywidgets.
    if name == "GateDecayExplorer":
        return _explorer_class()
    raise AttributeError(f"module 'glalearn.viz' has no attribute {name!r}")
