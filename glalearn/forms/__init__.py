"""The GLA forms, all with one signature (DESIGN.md §2); each returns (o, final_state or None)."""

from glalearn.forms.chunk import chunk_gla
from glalearn.forms.parallel import parallel_gla
from glalearn.forms.recurrent import recurrent_gla
from glalearn.forms.two_level import two_level_chunk_gla

__all__ = ["chunk_gla", "parallel_gla", "recurrent_gla", "two_level_chunk_gla"]
