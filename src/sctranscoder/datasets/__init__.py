"""Models and data that ship with sctranscoder and work offline."""

from ._tiny_c2s import TINY_C2S_NAME, tiny_c2s, tiny_c2s_heldout_cells

__all__ = ["TINY_C2S_NAME", "tiny_c2s", "tiny_c2s_heldout_cells"]
