"""The GLA Transformer and its Transformer++ baseline, one block code, two token mixers (chapter 8).

Both models are the same stack of pre-norm blocks

    x = x + Mixer(RMSNorm(x))          GatedLinearAttention (GLA) or causal softmax attention with RoPE
    x = x + SwiGLU(RMSNorm(x))         the FFN: W_down (silu(x W_gate) ⊙ x W_up)

between a token embedding and a final RMSNorm + linear head. Only the mixer differs, so the loss
curves of chapter 9 compare the mixers and nothing else. The Transformer++ recipe (RoPE, SwiGLU,
RMSNorm, no biases) is the paper's baseline.

Generation: GLA decodes recurrently, carrying one state [B, H, d_k, d_v] per layer: O(1) memory and
work per token. The Transformer re-runs its parallel form over the (cropped) context each token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from glalearn import fused
from glalearn.layers import BACKENDS, GatedLinearAttention


# ----------------------------------------------------------------------------- configurations
@dataclass
class LMConfig:
    """What both language models share (chapter 8). ``ffn_hidden`` None means 8/3 · d_model rounded up to 16."""

    vocab_size: int = 65
    d_model: int = 256
    n_layers: int = 6
    num_heads: int = 4
    ffn_hidden: int | None = None
    context_length: int = 256
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Kernel size of a causal depthwise convolution over the mixer's input (0: none). Zoology's recall
    # models put one beside every mixer; chapter 10 uses it so that binding a value to the key just
    # before it is not what a mixer has to learn first. Parallel forms only: no recurrent step.
    short_conv: int = 0
    model_type: str = field(default="", init=False)

    def __post_init__(self):
        if self.ffn_hidden is None:
            self.ffn_hidden = 16 * math.ceil(8 * self.d_model / 3 / 16)
        for name in ("vocab_size", "d_model", "n_layers", "num_heads", "ffn_hidden", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.short_conv, bool) or not isinstance(self.short_conv, int) or self.short_conv < 0:
            raise ValueError(f"short_conv must be an int >= 0 (a kernel size, 0 for none), got {self.short_conv!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GLAConfig(LMConfig):
    """A GLA language model (chapter 8): the paper's layer with ``expand_k``, ``expand_v``, gate and backend."""

    expand_k: float = 0.5
    expand_v: float = 1.0
    gate: str = "vector"
    backend: str = "auto"
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64
    # Kernel size of the layer's own SiLU convolutions on q, k and v (GatedLinearAttention.qkv_conv; 0: none).
    qkv_conv: int = 0
    # The output gate's bias b_r and its starting value (GatedLinearAttention.output_gate_bias; None: no bias).
    output_gate_bias: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self.model_type = "gla"


@dataclass
class TransformerConfig(LMConfig):
    """The Transformer++ baseline (chapter 8): softmax attention with RoPE (base ``rope_base``)."""

    rope_base: float = 10000.0

    def __post_init__(self):
        super().__post_init__()
        self.model_type = "transformer"
        if (self.d_model // self.num_heads) % 2 or self.d_model % self.num_heads:
            raise ValueError(f"d_model / num_heads must be an even int for RoPE, got {self.d_model}/{self.num_heads}")


def config_from_dict(data: dict) -> LMConfig:
    """Rebuild a GLAConfig or TransformerConfig from ``to_dict()`` output (as stored in config.json)."""
    data = dict(data)
    kind = data.pop("model_type", None)
    classes = {"gla": GLAConfig, "transformer": TransformerConfig}
    if kind not in classes:
        raise ValueError(f"config model_type must be 'gla' or 'transformer', got {kind!r}")
    cls = classes[kind]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind} config fields: {sorted(unknown)}")
    return cls(**data)


# ----------------------------------------------------------------------------- the pieces
def _eps(norm: nn.RMSNorm) -> float:
    """The ε an nn.RMSNorm uses (None there means float32's machine epsilon, as for float32 inputs)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


class SwiGLU(nn.Module):
    """The FFN of Transformer++ and GLA: x -> W_down(silu(x W_gate) ⊙ x W_up). [..., d] -> [..., d].

    Fused (``fused``: None = on CUDA, see glalearn.fused): one product of x with W_gate and W_up stacked,
    then one kernel for silu(a) ⊙ b and W_down, whose backward recomputes silu(a) ⊙ b (chapter 9).
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.fused: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fused_enabled(self.fused, x):
            ab = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
            return fused.swiglu_down(ab, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim / 2] of rotary position embeddings for integer positions [T] (chapter 8)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) of x [B, H, T, D] by the angles of their position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Softmax attention with RoPE through ``scaled_dot_product_attention`` (chapter 8). [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, num_heads: int, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = num_heads, d_model // num_heads, rope_base
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (p(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope_angles(torch.arange(T, device=x.device), self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-norm block: x + Mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). [B, T, d] -> [B, T, d]."""

    def __init__(self, mixer: nn.Module, config: LMConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = mixer
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.short_conv = config.short_conv
        if self.short_conv:
            self.conv = nn.Conv1d(config.d_model, config.d_model, self.short_conv, groups=config.d_model,
                                  padding=self.short_conv - 1, bias=False)
        self.fused: bool | None = None  # the norms by glalearn.fused.rms_norm (None: on CUDA)

    def _norm(self, norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        if fused.fused_enabled(self.fused, x):  # one pass, written in the dtype the products read
            return fused.rms_norm(x, norm.weight, _eps(norm))
        return norm(x)

    def _convolve(self, h: torch.Tensor) -> torch.Tensor:
        """h + the causal depthwise convolution of h (token t sees t - kernel + 1 .. t): [B, T, d]."""
        T = h.shape[1]
        return h + self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2)

    def forward(self, x: torch.Tensor, state=None, output_final_state: bool = False):
        h = self._norm(self.mixer_norm, x)
        if self.short_conv:
            if state is not None:
                raise NotImplementedError("a block with short_conv > 0 cannot continue from a state: the "
                                          "convolution's window over the previous segment is not cached")
            h = self._convolve(h)
        if output_final_state or state is not None:
            h, state = self.mixer(h, state=state, output_final_state=True)
        else:
            h = self.mixer(h)
        if fused.fused_enabled(self.fused, x):  # the residual add and the FFN's norm in one pass
            x, h = fused.add_rms_norm(x, self.dropout(h), self.ffn_norm.weight, _eps(self.ffn_norm))
        else:
            x = x + self.dropout(h)
            h = self.ffn_norm(x)
        x = x + self.dropout(self.ffn(h))
        return (x, state) if output_final_state else x

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        """One token through the block (GLA only): x_t [B, d], state [B, H, d_k, d_v]."""
        if self.short_conv:
            raise NotImplementedError("recurrent steps of a model with short_conv > 0 are not supported: "
                                      "use the parallel forward (the convolution's window is not cached)")
        h, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + h
        return x_t + self.ffn(self.ffn_norm(x_t)), state


class CausalLM(nn.Module):
    """Embedding, blocks, final RMSNorm and head: input_ids [B, T] -> logits [B, T, vocab] (chapter 8).

    ``fused`` (None: on CUDA; ``set_fused`` sets it everywhere) runs the norms, the FFN, the GLA layer
    on the flash backend and the loss through glalearn.fused (chapter 9); the CPU keeps the PyTorch
    modules. ``check_targets`` lets ``loss`` check the target values (a host sync on a GPU).
    """

    config: LMConfig
    fused: bool | None = None
    check_targets: bool = True

    def __init__(self, config: LMConfig, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(m, config) for m in mixers)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for module in self.modules():  # biases that must not start at zero (the GLA output gate's b_r)
            if hasattr(module, "init_output_gate_bias"):
                module.init_output_gate_bias()
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.tokenizer = None  # attached by load_pretrained / the trainer

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Number of trainable parameters (tied weights counted once)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (not include_embeddings and name.startswith(("embed.", "lm_head."))):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32, torch.uint8, torch.int16):
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {got}")

    def set_fused(self, fused_setting: bool | None) -> CausalLM:
        """Set ``fused`` (True, False or None = on CUDA) on the model and all its blocks. Returns self."""
        fused.fused_enabled(fused_setting, torch.empty(0))  # validates the value
        self.fused = fused_setting
        for module in self.modules():
            if hasattr(module, "fused") and module is not self:
                module.fused = fused_setting
        return self

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normalized hidden states [B, T, d_model] that the head maps to logits.

        For tasks that score a few positions only (MQAR, chapter 10): ``lm_head(h[mask])`` costs the
        head's product for those positions instead of all B·T of them.
        """
        self._check_ids(input_ids)
        x = self.dropout(self.embed(input_ids.long()))
        for block in self.blocks:
            x = block(x)
        if fused.fused_enabled(self.fused, x):
            return fused.rms_norm(x, self.norm.weight, _eps(self.norm))
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, T, vocab] (float32 under autocast too) for input_ids [B, T]; with ``targets``
        [B, T] the mean cross-entropy instead (``loss``; inside forward so that wrappers such as
        DDP and FSDP see the head's weight used)."""
        h = self.hidden_states(input_ids)
        if targets is None:
            return self.lm_head(h).float()
        if fused.fused_enabled(self.fused, h):  # chunks of tokens: the logits are never held whole
            return fused.linear_cross_entropy(h, self.lm_head.weight, targets, check_targets=self.check_targets)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of predicting targets [B, T] from input_ids [B, T].

        Targets equal to -100 are not counted (F.cross_entropy's ignore_index)."""
        return self(input_ids, targets=targets)

    # ------------------------------------------------------------------ generation
    def _next_token_logits(self, ids: torch.Tensor, cache):
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after input_ids [B, T0] -> [B, T0 + max_new_tokens] (chapter 9).

        temperature 0 picks the most likely token; top_k keeps the k most likely; ``seed`` makes the
        samples reproducible (a private generator: the global RNG is untouched).
        """
        self._check_ids(input_ids)
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token to condition on, got T = 0")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.config.vocab_size} or None, got {top_k}")
        device = next(self.parameters()).device
        ids = input_ids.to(device).long()
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.seed() if seed is None else seed)
        logits, cache = self._next_token_logits(ids, None)
        out = [ids]
        for i in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, cache = self._next_token_logits(nxt, cache)
        return torch.cat(out, dim=1)


class GLAForCausalLM(CausalLM):
    """The GLA language model (chapter 8): pre-norm blocks of GatedLinearAttention and SwiGLU.

    forward(input_ids [B, T]) -> logits [B, T, vocab]; ``step`` decodes one token with per-layer
    states [B, H, d_k, d_v]; ``generate`` prefills the prompt in parallel, then decodes recurrently.
    """

    def __init__(self, config: GLAConfig):
        if not isinstance(config, GLAConfig):
            raise TypeError(f"config must be a GLAConfig, got {type(config).__name__}")
        mixers = [GatedLinearAttention(config.d_model, config.num_heads, config.expand_k, config.expand_v,
                                       gate=config.gate, backend=config.backend,
                                       gate_low_rank_dim=config.gate_low_rank_dim,
                                       gate_logit_normalizer=config.gate_logit_normalizer,
                                       norm_eps=config.norm_eps, chunk_size=config.chunk_size,
                                       qkv_conv=config.qkv_conv, output_gate_bias=config.output_gate_bias)
                  for _ in range(config.n_layers)]
        super().__init__(config, mixers)

    def set_backend(self, backend: str) -> GLAForCausalLM:
        """Switch every layer to another backend (the weights are the same for all). Returns self."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for block in self.blocks:
            block.mixer.backend = backend
        self.config.backend = backend
        return self

    def init_states(self, batch_size: int, device=None) -> list[torch.Tensor]:
        """One zero state [B, H, d_k, d_v] per layer."""
        return [b.mixer.init_state(batch_size, device) for b in self.blocks]

    def prefill(self, input_ids: torch.Tensor, states: list[torch.Tensor] | None = None):
        """Run a prompt in parallel: (logits [B, T, vocab], states after it, one per layer)."""
        self._check_ids(input_ids)
        x = self.embed(input_ids.long())
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, state=None if states is None else states[i], output_final_state=True)
            new_states.append(s)
        return self.lm_head(self.norm(x)).float(), new_states

    def step(self, token_ids: torch.Tensor, states: list[torch.Tensor] | None = None):
        """One token recurrently (chapter 9): token_ids [B] -> (logits [B, vocab], new states)."""
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be [B], got shape {tuple(token_ids.shape)}")
        if states is None:
            states = self.init_states(token_ids.shape[0], token_ids.device)
        x = self.embed(token_ids.long())
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.lm_head(self.norm(x)).float(), new_states

    def _next_token_logits(self, ids, cache):
        if cache is None:
            logits, states = self.prefill(ids)
            return logits[:, -1], states
        return self.step(ids[:, -1], cache)


class TransformerForCausalLM(CausalLM):
    """The Transformer++ baseline (chapter 8): the same blocks with RoPE softmax attention as the mixer.

    ``generate`` re-runs the parallel form over the last ``context_length`` tokens for every new token.
    """

    def __init__(self, config: TransformerConfig):
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        mixers = [CausalSelfAttention(config.d_model, config.num_heads, config.rope_base)
                  for _ in range(config.n_layers)]
        super().__init__(config, mixers)

    def _next_token_logits(self, ids, cache):
        context = ids if cache is None else torch.cat([cache, ids], dim=1)
        return self(context[:, -self.config.context_length:])[:, -1], context


def build_model(config: LMConfig | dict) -> CausalLM:
    """GLAForCausalLM or TransformerForCausalLM for a config (or its dict form)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if isinstance(config, GLAConfig):
        return GLAForCausalLM(config)
    if isinstance(config, TransformerConfig):
        return TransformerForCausalLM(config)
    raise TypeError(f"config must be a GLAConfig or TransformerConfig, got {type(config).__name__}")


def flops_per_token(config: LMConfig, T: int) -> dict:
    """Forward FLOPs per token at sequence length T, by part (chapter 8): 2 per multiply-add.

    Matmuls of the projections and FFN, plus the token mixing: softmax attention 2·2·T/2·d per layer
    on average over a causal sequence (scores and values), GLA's chunkwise form with chunk C = 64
    2·2·(C/2)·d_k-ish for the intra-chunk part plus 2·2·d_k·d_v per head for the state.
    """
    d, L, hidden = config.d_model, config.n_layers, config.ffn_hidden
    ffn = 2 * 3 * d * hidden
    head = 2 * d * config.vocab_size
    if isinstance(config, GLAConfig):
        K, V = int(d * config.expand_k), int(d * config.expand_v)
        proj = 2 * d * (2 * K + 2 * V) + 2 * V * d + 2 * (d * config.gate_low_rank_dim + config.gate_low_rank_dim * K)
        C = min(64, T)
        dk, dv = K // config.num_heads, V // config.num_heads
        # intra-chunk: scores (C/2 keys on average, d_k each) and P·V; inter: q·S and the state update.
        mixing = config.num_heads * (2 * (C / 2) * dk + 2 * (C / 2) * dv + 2 * dk * dv * 2)
    else:
        proj = 2 * 4 * d * d
        mixing = 2 * 2 * (T / 2) * d
    return {"projections": L * proj, "mixing": L * mixing, "ffn": L * ffn, "head": head,
            "total": L * (proj + mixing + ffn) + head}
