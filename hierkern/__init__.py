"""hierkern: fused attention over ragged, nested text (characters in words, words in sentences)."""

from .backends import AttentionCall, available_backends, backend_names, explain
from .functional import varlen_attention
from .layout import Segments

__all__ = [
    "AttentionCall", "Segments", "available_backends", "backend_names", "explain", "varlen_attention",
]

__version__ = "0.1.0"
