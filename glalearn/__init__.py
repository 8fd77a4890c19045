"""glalearn — an interactive textbook on Gated Linear Attention (Yang et al., ICML 2024).

The library the chapters build and import. The GLA forms share one signature (DESIGN.md §2):

    o, final_state = form(q, k, v, g, scale=None, initial_state=None, output_final_state=False, ...)

with q, k, g: [B, T, H, K], v: [B, T, H, V], g the log forget gate (<= 0).
"""

from __future__ import annotations

import importlib

from glalearn.forms import chunk_gla, parallel_gla, recurrent_gla, two_level_chunk_gla

__version__ = "0.1.0"

# Heavier or optional parts load on first use, so `import glalearn` stays fast and works without Triton.
_LAZY = {
    "flash_gla": ("glalearn.flash", "flash_gla"),
    "check": ("glalearn.checks", "check"),
    "doctor": ("glalearn.diagnostics", "doctor"),
    "load_pretrained": ("glalearn.pretrained", "load_pretrained"),
    "gates": ("glalearn.gates", None),
    "viz": ("glalearn.viz", None),
}

__all__ = ["chunk_gla", "parallel_gla", "recurrent_gla", "two_level_chunk_gla"]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glalearn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
