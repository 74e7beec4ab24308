"""Modules over packed ragged tokens."""

from .encoder import TransformerEncoder, TransformerEncoderLayer
from .layers import (
    AttentionPooling,
    HierarchicalEncoder,
    LearnedPositionalEncoding,
    PackedTransformerEncoder,
    PackedTransformerEncoderLayer,
    SegmentPooling,
    SinusoidalPositionalEncoding,
    segment_max,
    segment_mean,
)
from .mha import MultiheadAttention

__all__ = [
    "AttentionPooling",
    "HierarchicalEncoder",
    "LearnedPositionalEncoding",
    "PackedTransformerEncoder",
    "PackedTransformerEncoderLayer",
    "SegmentPooling",
    "SinusoidalPositionalEncoding",
    "segment_max",
    "segment_mean",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerEncoder",
]
