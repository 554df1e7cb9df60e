"""Preprocessing: turn an AnnData into what a cell-sentence model reads."""

from ._cell_sentences import cell_sentences

__all__ = ["cell_sentences"]
