"""The GLA layer of the paper (§4.4), built from the forms of chapters 1-4 (chapter 8).

For a token x_t (a row of d_model numbers) and H heads of key width d_k = K / H, value width d_v = V / H:

    q_t, k_t = x_t W_Q, x_t W_K                      K = expand_k · d_model   (0.5)
    v_t      = x_t W_V                               V = expand_v · d_model   (1.0)
    g_t      = logsigmoid(x_t W_1 W_2 + b) / τ       the data-dependent log forget gate, rank 16, τ = 16
    o_t      = GLA(q, k, v, g)_t                     any form: recurrent, chunk, two-level, flash
    r_t      = x_t W_r                               the output gate
    y_t      = (RMSNorm_head(o_t) ⊙ swish(r_t)) W_O  per-head normalization, Swish output gate

The `gate` argument swaps the gate for the ablations of chapter 10: "vector" (GLA: one gate per key
channel, data-dependent), "scalar" (one data-dependent gate per head, broadcast over the key channels),
"fixed" (RetNet's data-independent per-head decays 1 - 2^(-5-h)) and "none" (g = 0: plain linear
attention). Every gate runs on every backend, since all of them are just a g tensor.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from glalearn import fused
from glalearn.forms import chunk_gla, recurrent_gla, two_level_chunk_gla
from glalearn.forms.chunk import ChunkGLAFunction
from glalearn.forms.recurrent import recurrent_step
from glalearn.gates import GATE_LOGIT_NORMALIZER, GATE_LOW_RANK_DIM, LowRankGate, retnet_log_decay

BACKENDS = ("recurrent", "chunk", "two_level", "flash", "auto")
GATES = ("vector", "scalar", "fixed", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The PyTorch forms' precision for activations of ``dtype``: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32

# On this kind of CPU the two-level form with the split diagonal is the fastest exact form: measured
# at the shipped model's shapes (B=8, T=256, H=4, d_k=32, d_v=64, float32, forward+backward) it beats
# chunk_gla; see chapter 8 and `python -m glalearn.bench forms`.
CPU_FORM = "two_level"


def _two_level_split(q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    return two_level_chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, chunk_size=chunk_size,
                               sub_chunk_size=min(16, chunk_size), diagonal="split")


def flash_available() -> bool:
    """True when `glalearn.flash_gla` (the Triton kernel of chapter 7) can be imported."""
    try:
        _flash_form()
    except (ImportError, AttributeError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def _flash_form():
    import glalearn.flash

    return glalearn.flash.flash_gla


def resolve_backend(backend: str, device: torch.device) -> str:
    """The form a backend name runs on ``device`` (chapter 8): "auto" -> "flash" on CUDA, else CPU_FORM.

    On CUDA without the Triton kernel, "auto" falls back to "two_level" with a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if flash_available():
            return "flash"
        warnings.warn("backend='auto': glalearn.flash_gla is not available, using 'two_level' on CUDA",
                      stacklevel=3)
        return "two_level"
    return CPU_FORM


def gla_form(backend: str):
    """The function behind a (resolved) backend name; all share the signature of DESIGN.md §2."""
    if backend == "recurrent":
        return recurrent_gla
    if backend == "chunk":
        return chunk_gla
    if backend == "two_level":
        return _two_level_split
    if backend == "flash":
        try:
            return _flash_form()
        except (ImportError, AttributeError) as err:
            raise RuntimeError(
                "backend='flash' needs glalearn.flash_gla, the Triton kernel of chapter 7, which could not be "
                f"imported ({err}). Use backend='chunk', 'two_level' or 'auto' instead."
            ) from err
    raise ValueError(f"backend must be one of {BACKENDS[:-1]} (after resolving 'auto'), got {backend!r}")


class GatedLinearAttention(nn.Module):
    """The GLA token mixer of the paper, §4.4 (chapter 8).

    Input x [B, T, d_model] -> output [B, T, d_model]. ``forward(x, state=None, output_final_state=False)``
    runs the whole sequence with the chosen backend; ``step(x_t, state)`` runs one token recurrently
    with the state S [B, H, d_k, d_v] (float32) carried between calls.

    Args:
        d_model: width of the residual stream.
        num_heads: H.
        expand_k, expand_v: key / value width as a fraction of d_model (0.5 and 1.0 in the paper).
        gate: "vector" (GLA), "scalar", "fixed" or "none" (chapter 10's ablation).
        backend: "recurrent", "chunk", "two_level", "flash" or "auto".
        gate_low_rank_dim, gate_logit_normalizer: the gate's rank (16) and τ (16).
        norm_eps: epsilon of the per-head RMSNorm.
        chunk_size: C of the "chunk" and "two_level" backends.
        qkv_conv: kernel size of a causal depthwise convolution followed by SiLU on each of q, k and v
            right after their projections (0: none), as flash-linear-attention's ``use_short_conv`` and
            Zoology's recall models place it. Parallel forms only (no recurrent step).
        output_gate_bias: None (the output gate r_t = swish(x_t W_r), as flash-linear-attention has it)
            or a number: the paper's r_t = swish(x_t W_r + b_r) with b_r starting at that value. With
            small weights and no bias, swish(x W_r) ≈ x W_r / 2 is a near-zero factor of random sign on
            every channel the layer reads from its state, which stalls learning to recall (chapter 10);
            b_r = 1 lets the read value through (swish(1) ≈ 0.73) from the first step.

    ``check_inputs`` (default True) lets the forms validate their inputs; the trainer turns it off on a
    GPU, where each value check is a host-device synchronisation, and the "chunk" backend then calls
    the chunk form's autograd function directly (the same numbers, no checks).
    """

    def __init__(self, d_model: int, num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate: str = "vector", backend: str = "auto", gate_low_rank_dim: int = GATE_LOW_RANK_DIM,
                 gate_logit_normalizer: float = GATE_LOGIT_NORMALIZER, norm_eps: float = 1e-5,
                 chunk_size: int = 64, qkv_conv: int = 0, output_gate_bias: float | None = None):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("d_model", d_model), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("expand_k", expand_k), ("expand_v", expand_v)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim < num_heads or value_dim < num_heads:
            raise ValueError(f"the key width d_model*expand_k = {key_dim} and the value width d_model*expand_v = "
                             f"{value_dim} must each be at least num_heads = {num_heads} (one channel per head)")
        if num_heads < 1 or key_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"num_heads must divide the key width d_model*expand_k = {key_dim} and the value width "
                f"d_model*expand_v = {value_dim}, got num_heads={num_heads}"
            )
        self.d_model, self.num_heads, self.gate, self.backend = d_model, num_heads, gate, backend
        self.key_dim, self.value_dim = key_dim, value_dim
        self.chunk_size, self.check_inputs = chunk_size, True
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.scale = self.head_k_dim ** -0.5
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        if gate == "vector":
            self.gate_proj = LowRankGate(d_model, key_dim, gate_low_rank_dim, gate_logit_normalizer)
        elif gate == "scalar":
            self.gate_proj = LowRankGate(d_model, num_heads, gate_low_rank_dim, gate_logit_normalizer)
        elif gate == "fixed":
            self.register_buffer("fixed_log_decay", retnet_log_decay(num_heads), persistent=False)
        if isinstance(qkv_conv, bool) or not isinstance(qkv_conv, int) or qkv_conv < 0:
            raise ValueError(f"qkv_conv must be an int >= 0 (a kernel size, 0 for none), got {qkv_conv!r}")
        self.qkv_conv = qkv_conv
        if qkv_conv:
            self.q_conv, self.k_conv, self.v_conv = (
                nn.Conv1d(width, width, qkv_conv, groups=width, padding=qkv_conv - 1, bias=False)
                for width in (key_dim, key_dim, value_dim))
        if output_gate_bias is not None and not (isinstance(output_gate_bias, (int, float))
                                                 and math.isfinite(output_gate_bias)):
            raise ValueError(f"output_gate_bias must be None or a finite number, got {output_gate_bias!r}")
        self.output_gate_bias = None if output_gate_bias is None else float(output_gate_bias)
        self.output_gate = nn.Linear(d_model, value_dim, bias=output_gate_bias is not None)
        self.init_output_gate_bias()
        self.head_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        # The flash backend's fused gate and norm + output gate (glalearn.fused): None or True uses them,
        # False runs the PyTorch pieces around the kernel (the same numbers up to rounding).
        self.fused: bool | None = None

    # ------------------------------------------------------------------ the pieces
    def log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """g [..., H, d_k] (<= 0) for tokens x [..., d_model], for the chosen gate variant: float32, or
        float64 for float64 x (a layer in float64 computes in float64 throughout)."""
        lead = x.shape[:-1]
        H, dk = self.num_heads, self.head_k_dim
        dtype = _compute_dtype(x.dtype)
        if self.gate == "vector":
            return self.gate_proj(x).to(dtype).reshape(*lead, H, dk)
        if self.gate == "scalar":
            return self.gate_proj(x).to(dtype).reshape(*lead, H, 1).expand(*lead, H, dk)
        if self.gate == "fixed":
            return self.fixed_log_decay.to(x.device, dtype)[:, None].expand(*lead, H, dk)
        return x.new_zeros((*lead, H, dk), dtype=dtype)

    def project(self, x: torch.Tensor, keep_dtype: bool = False) -> tuple[torch.Tensor, ...]:
        """q, k, g [..., H, d_k] and v [..., H, d_v] for tokens x [..., d_model].

        q, k, v are float32 for the PyTorch forms (float64 for float64 x); with ``keep_dtype`` they stay in the dtype the
        projections produce (bfloat16 under autocast), which the flash kernels take directly: their
        products then run on bf16 tensor cores instead of in exact float32, and q, k, v, o move half
        the bytes. g is always float32 (a log gate's precision decides the decay over a whole chunk).
        """
        lead = x.shape[:-1]
        H = self.num_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_conv:
            q, k, v = (self._causal_silu_conv(conv, t) for conv, t in
                       ((self.q_conv, q), (self.k_conv, k), (self.v_conv, v)))
        q = q.reshape(*lead, H, self.head_k_dim)
        k = k.reshape(*lead, H, self.head_k_dim)
        v = v.reshape(*lead, H, self.head_v_dim)
        if not keep_dtype:
            dtype = _compute_dtype(q.dtype)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return q, k, v, self.log_gate(x)

    def init_output_gate_bias(self) -> None:
        """Set b_r to its starting value (the model calls this after its generic init zeroes biases)."""
        if self.output_gate_bias is not None:
            nn.init.constant_(self.output_gate.bias, self.output_gate_bias)

    @staticmethod
    def _causal_silu_conv(conv: nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        """silu(causal depthwise conv of t [B, T, width] over time): token t sees t - kernel + 1 .. t."""
        if t.dim() != 3:
            raise NotImplementedError("qkv_conv > 0 needs whole sequences [B, T, d]: the convolution's window "
                                      "is not cached for recurrent steps")
        T = t.shape[1]
        return nn.functional.silu(conv(t.transpose(1, 2))[..., :T].transpose(1, 2))

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, Swish output gate and output projection: o [..., H, d_v] -> [..., d_model]."""
        o = self.head_norm(o.to(x.dtype)).reshape(*x.shape[:-1], self.value_dim)
        return self.o_proj(o * nn.functional.silu(self.output_gate(x)))

    # ------------------------------------------------------------------ whole sequence and one step
    def _check_x(self, name: str, x, rank: int, layout: str) -> None:
        """The layer's input in its own words: a tensor of shape ``layout``, a floating dtype the weights
        take (theirs, or bf16/fp16 under autocast), finite values (scanned only when ``check_inputs``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
        if x.dim() != rank or x.shape[-1] != self.d_model:
            raise ValueError(f"{name} must be {layout.replace('d_model', f'd_model={self.d_model}')}, "
                             f"got shape {tuple(x.shape)}")
        weight = self.q_proj.weight.dtype
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (float32, bfloat16 or float16 hidden states; float64 "
                            f"for a layer in float64), got {x.dtype}; token ids go through an embedding first")
        if x.dtype != weight and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} is {x.dtype} but the layer's weights are {weight}: cast {name} "
                            f"({name}.to({weight})), convert the layer (layer.to({x.dtype})), or run it under "
                            "torch.autocast")
        if self.check_inputs and x.numel() and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"{name} must be finite, but {name}[{', '.join(map(str, bad))}] = {x[tuple(bad)].item()} "
                             "(the input of the GLA layer: look at what produced it)")

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, output_final_state: bool = False):
        """y [B, T, d_model] for x [B, T, d_model]; with ``output_final_state`` also S_T [B, H, d_k, d_v].

        ``state`` (S_0, [B, H, d_k, d_v] float32) continues a sequence, e.g. after a prompt.
        """
        self._check_x("x", x, 3, "[B, T, d_model]")
        backend = resolve_backend(self.backend, x.device)
        if backend == "flash" and self.fused is not False:
            return self._fused_flash_forward(x, state, output_final_state)
        # The kernels take bf16/fp16 q, k, v as they come (float32 state and gates inside); the PyTorch
        # forms compute in float32.
        q, k, v, g = self.project(x, keep_dtype=backend == "flash")
        # The forms choose their own precision (float32 states, matmul_dtype): autocast stays outside.
        with torch.autocast(x.device.type, enabled=False):
            if backend == "chunk" and not self.check_inputs and x.shape[1] > 0:
                o, final = ChunkGLAFunction.apply(q, k, v, g, state, self.scale, self.chunk_size,
                                                  output_final_state)
            else:
                kwargs = {"chunk_size": self.chunk_size} if backend in ("chunk", "two_level") else {}
                o, final = gla_form(backend)(q, k, v, g, scale=self.scale, initial_state=state,
                                             output_final_state=output_final_state, **kwargs)
        y = self.finish(x, o)
        return (y, final) if output_final_state else y

    def _fused_flash_forward(self, x: torch.Tensor, state: torch.Tensor | None, output_final_state: bool):
        """``forward`` on the flash backend with the fused pieces of chapter 9 (glalearn.fused).

        The same computation as ``project`` + kernel + ``finish``, with fewer passes over memory: q, k, v
        stay in the projections' dtype; the gate's logsigmoid / τ is one kernel that writes float32 g
        from the bf16 projection; RMSNorm_head(o) ⊙ swish(r) is one kernel that reads the kernel's o and
        the gate projection r and writes what W_O reads (no float32 copies of o or r in between).
        """
        lead, H = x.shape[:-1], self.num_heads
        q = self.q_proj(x).reshape(*lead, H, self.head_k_dim)
        k = self.k_proj(x).reshape(*lead, H, self.head_k_dim)
        v = self.v_proj(x).reshape(*lead, H, self.head_v_dim)
        if self.gate in ("vector", "scalar"):
            gate = self.gate_proj
            g = fused.log_gate(gate.up(gate.down(x)), gate.normalizer)
            g = g.reshape(*lead, H, self.head_k_dim) if self.gate == "vector" else \
                g.reshape(*lead, H, 1).expand(*lead, H, self.head_k_dim)
        else:
            g = self.log_gate(x)
        with torch.autocast(x.device.type, enabled=False):
            o, final = gla_form("flash")(q, k, v, g, scale=self.scale, initial_state=state,
                                         output_final_state=output_final_state)
        eps = self.head_norm.eps if self.head_norm.eps is not None else torch.finfo(torch.float32).eps
        y = self.o_proj(fused.norm_swish_gate(o, self.output_gate(x), self.head_norm.weight, eps))
        return (y, final) if output_final_state else y

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        """S_0 = 0, [B, H, d_k, d_v] float32."""
        return torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token recurrently (chapters 1 and 9): x_t [B, d_model], S [B, H, d_k, d_v] -> (y_t, S').

        O(1) work and memory per token however long the sequence: the state is all the layer keeps.
        """
        self._check_x("x_t", x_t, 2, "[B, d_model]")
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device)
        q, k, v, g = (t.to(state.dtype) for t in self.project(x_t))  # the state sets the precision
        o, state = recurrent_step(state, q, k, v, g, self.scale)
        return self.finish(x_t, o), state

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, d_k={self.head_k_dim}, d_v={self.head_v_dim}, gate={self.gate!r}, "
                f"backend={self.backend!r}")
