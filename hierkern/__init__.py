"""hierkern: fused attention over ragged, nested text (characters in words, words in sentences)."""

from .backends import AttentionCall, available_backends, backend_names
from .functional import explain, varlen_attention
from .layout import Segments
from .nn.encoder import TransformerEncoder, TransformerEncoderLayer
from .nn.layers import (
    AttentionPooling,
    HierarchicalEncoder,
    LearnedPositionalEncoding,
    PackedTransformerEncoder,
    PackedTransformerEncoderLayer,
    SegmentPooling,
    SinusoidalPositionalEncoding,
)
from .nn.mha import MultiheadAttention
from .patching import PatchReport, patch_model
from .text import CharVocab, TextBatch, collate_fn

__all__ = [
    "AttentionCall",
    "Segments",
    "available_backends",
    "backend_names",
    "explain",
    "varlen_attention",
    "CharVocab",
    "TextBatch",
    "collate_fn",
    "HierarchicalEncoder",
    "PackedTransformerEncoderLayer",
    "PackedTransformerEncoder",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEncoding",
    "AttentionPooling",
    "SegmentPooling",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "patch_model",
    "PatchReport",
]

__version__ = "0.1.0"

# attn_implementation="hierkern" for Hugging Face models: registered here only when transformers is already
# imported, so users without it pay nothing; otherwise hierkern.integrations.transformers.register().
from .integrations import register_if_imported as _register_if_imported  # noqa: E402

_register_if_imported()
