"""Layers over packed ragged tokens: encoder layers, positional encodings, pooling, and the hierarchical
char -> word -> sentence encoder.

Every layer takes packed tokens ``(total, E)`` plus the ``hierkern.Segments`` that group them; attention
never crosses a segment boundary. The encoder layers are the drop-ins of ``encoder.py`` called on packed
tokens; attention pooling calls ``hierkern.varlen_attention`` directly: one fused call per layer, whatever
the backend. These modules hold parameters and do projections, norms and reductions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import varlen_attention
from ..layout import Segments
from ..ops.dropout import apply_dropout
from .encoder import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "PackedTransformerEncoderLayer",
    "PackedTransformerEncoder",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEncoding",
    "AttentionPooling",
    "SegmentPooling",
    "segment_mean",
    "segment_max",
    "prepend_token",
    "HierarchicalEncoder",
    "POOLING_MODES",
]

POOLING_MODES = ("cls", "mean", "max", "attention")


def _check_packed(x: torch.Tensor, segments: Segments, name: str = "x") -> None:
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a hierkern.Segments, got {type(segments).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(
            f"{name} must be a packed (total, embed_dim) tensor, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.shape[0] != segments.total:
        raise ValueError(f"{name} has {x.shape[0]} tokens but segments covers {segments.total}")


class PackedTransformerEncoderLayer(TransformerEncoderLayer):
    """``hierkern.TransformerEncoderLayer`` called on packed tokens only: ``forward(src, segments)``.

    The same module as the drop-in (torch's parameter names, initialisation and results; the math lives
    there), with ``batch_first=True`` and no padded form.

    Args:
        d_model: width ``E``.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout after attention and feed-forward (and on the attention weights).
        activation: ``"relu"``, ``"gelu"`` or a callable.
        layer_norm_eps: LayerNorm epsilon.
        norm_first: pre-norm instead of post-norm.
        bias: learn biases in the linear layers and norms.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable = F.relu,
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first=True,
            norm_first=norm_first,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, src: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``src`` ``(total, E)`` packed by ``segments`` -> ``(total, E)``."""
        return super().forward(src, segments=segments)


class PackedTransformerEncoder(TransformerEncoder):
    """A stack of ``num_layers`` copies of ``encoder_layer`` plus an optional final norm over packed tokens,
    named like ``nn.TransformerEncoder`` (``layers.<i>.``, ``norm``): ``forward(src, segments)``."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None):
        # Nested tensors are torch's padded-input path, which a packed-only encoder never takes.
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor=False)

    def forward(self, src: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``src`` ``(total, E)`` packed by ``segments`` -> ``(total, E)``."""
        return super().forward(src, segments=segments)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal encodings of each token's position *inside its segment* (restarts at 0).

    ``pe[t, 2i] = sin(p_t / base^(2i/dim))``, ``pe[t, 2i+1] = cos(...)``, as in "Attention Is All You Need".
    No length limit: the encodings of positions ``0..n-1`` are computed once per device and dtype into a
    table that grows (doubling) when a longer segment arrives, and each call gathers rows of it by
    ``Segments.positions()``. A gather moves ``total * dim`` values; recomputing would also evaluate
    ``total * dim`` sines and cosines on every call.

    Args:
        dim: encoding width (even).
        base: wavelength base.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim}")
        self.dim = dim
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (device, dtype) -> (n, dim) table; not a buffer, so state_dict and .to() stay as they were.
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(>= length, dim)`` encodings of positions ``0, 1, ...`` in ``dtype`` on ``inv_freq``'s device.

        Computed in float32 (as the encodings always were) and rounded to ``dtype`` once.
        """
        key = (self.inv_freq.device, dtype)
        table = self._tables.get(key)
        if table is None or table.shape[0] < length:
            rows = max(64, 1 << max(length - 1, 0).bit_length())
            positions = torch.arange(rows, dtype=self.inv_freq.dtype, device=self.inv_freq.device)
            angles = positions[:, None] * self.inv_freq
            table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).to(dtype)
            self._tables[key] = table
        return table

    def forward(self, segments: Segments, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(total, dim)`` encodings for the packed tokens of ``segments``, in ``dtype`` (default float32)."""
        return self.table(segments.max_len, dtype).index_select(0, segments.positions())


class LearnedPositionalEncoding(nn.Module):
    """A learned vector per position inside a segment (restarts at 0 in every segment).

    Args:
        max_len: positions ``0..max_len-1`` are learned; a longer segment is a ``ValueError``.
        dim: encoding width.
    """

    def __init__(self, max_len: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, dim, device=device, dtype=dtype)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, segments: Segments) -> torch.Tensor:
        """``(total, dim)`` encodings for the packed tokens of ``segments``."""
        if segments.max_len > self.max_len:
            raise ValueError(
                f"a segment has {segments.max_len} tokens but LearnedPositionalEncoding has max_len={self.max_len}"
            )
        return self.embedding(segments.positions())


class _SegmentMean(torch.autograd.Function):
    """Mean of contiguous segments: ``torch.segment_reduce`` forward, a row gather backward.

    ``index_add`` of the tokens into their segments (the obvious way) takes ~150 ms on a 2-core CPU for ~5k
    tokens of width 256, ~100x ``segment_reduce`` over the same contiguous rows; ``segment_reduce``'s own
    backward is ~5x slower than gathering the scaled output gradient (``grad[segment_ids]``). The backward
    is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        inv_counts = 1.0 / lengths.clamp(min=1).to(x.dtype)[:, None]
        ctx.save_for_backward(ids, inv_counts)
        # An empty segment sums to zero (segment_reduce's "sum" starts from 0).
        return torch.segment_reduce(x, "sum", lengths=lengths) * inv_counts

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, inv_counts = ctx.saved_tensors
        return (grad * inv_counts).index_select(0, ids), None, None


def segment_mean(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Mean of each segment's tokens: ``(total, E)`` -> ``(S, E)``; an empty segment gives zeros."""
    _check_packed(x, segments)
    return _SegmentMean.apply(x, segments.lengths, segments.segment_ids())


def segment_max(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Elementwise max over each segment's tokens: ``(total, E)`` -> ``(S, E)``; an empty segment gives
    zeros. Ties share the gradient (``scatter_reduce``'s rule)."""
    _check_packed(x, segments)
    index = segments.segment_ids()[:, None].expand(-1, x.shape[1])
    # include_self=False: the zero fill is only what an empty segment keeps, never a max candidate.
    return x.new_zeros(segments.num_segments, x.shape[1]).scatter_reduce(0, index, x, "amax", include_self=False)


class AttentionPooling(nn.Module):
    """Pool each segment with one learned query attending to that segment's tokens.

    A cross-attention with one query per segment: ``cu_seqlens_q = arange(S + 1)``, ``cu_seqlens_k`` = the
    segment offsets, through ``varlen_attention``. The query is learned directly in head space (projecting
    one constant vector would only reparametrise it). An empty segment gives ``out_proj``'s bias.

    Args:
        embed_dim: width ``E``.
        num_heads: heads; ``E % num_heads == 0``.
        bias: learn projection biases.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim, **factory) / math.sqrt(self.head_dim))
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``x`` ``(total, E)`` packed by ``segments`` -> ``(S, E)``."""
        _check_packed(x, segments)
        num = segments.num_segments
        k, v = self.kv_proj(x).view(x.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        q = self.query.to(x.dtype).expand(num, -1, -1)
        cu_seqlens_q = torch.arange(num + 1, dtype=torch.int32, device=x.device)
        out = varlen_attention(q, k, v, cu_seqlens_q, segments, max_seqlen_q=min(num, 1), max_seqlen_k=segments.max_len)
        return self.out_proj(out.reshape(num, self.embed_dim))


class SegmentPooling(nn.Module):
    """Reduce each segment of packed tokens to one vector: ``"mean"``, ``"max"`` or ``"attention"``.

    (``"cls"`` pooling is not a reduction: ``HierarchicalEncoder`` prepends a CLS token to each word and
    reads its output.)

    Args:
        mode: ``"mean"``, ``"max"`` or ``"attention"``.
        embed_dim, num_heads: for ``"attention"`` only.
    """

    def __init__(self, mode: str, embed_dim: int | None = None, num_heads: int | None = None):
        super().__init__()
        if mode not in ("mean", "max", "attention"):
            raise ValueError(f"mode must be 'mean', 'max' or 'attention', got {mode!r}")
        self.mode = mode
        if mode == "attention":
            if embed_dim is None or num_heads is None:
                raise ValueError("attention pooling needs embed_dim and num_heads")
            self.attention = AttentionPooling(embed_dim, num_heads)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """``(total, E)`` -> ``(S, E)``."""
        if self.mode == "mean":
            return segment_mean(x, segments)
        if self.mode == "max":
            return segment_max(x, segments)
        return self.attention(x, segments)


def prepend_token(ids: torch.Tensor, segments: Segments, token_id: int) -> tuple[torch.Tensor, Segments]:
    """Insert ``token_id`` at the start of every segment, vectorised.

    Args:
        ids: ``(total,)`` packed token ids.
        segments: their grouping, ``S`` segments.
        token_id: the id to insert.

    Returns:
        ``(ids', segments')``: ``(total + S,)`` ids and the grown segments (every segment one longer).
    """
    num = segments.num_segments
    offsets = segments.offsets + torch.arange(num + 1, dtype=torch.int32, device=segments.device)
    out = ids.new_full((segments.total + num,), token_id)
    out[_shifted_index(segments)] = ids
    return out, Segments(offsets, segments.max_len + 1 if num else 0, segments.total + num, validate=False)


def _shifted_index(segments: Segments) -> torch.Tensor:
    """Where each original token lands once one token is prepended to every segment."""
    return torch.arange(segments.total, device=segments.device) + segments.segment_ids() + 1


class HierarchicalEncoder(nn.Module):
    """Character -> word -> sentence encoder over a ``hierkern.TextBatch``, with no padding.

    A character transformer runs over each word's characters in isolation and pools them into a word
    vector; a word transformer refines each sentence's word vectors in context. Positions restart in every
    word and every sentence. Every parameter takes part in ``forward`` (so DDP needs no
    ``find_unused_parameters``).

    Args:
        vocab_size: number of character ids (``len(vocab)``).
        dim: model width.
        num_heads: attention heads in both stages.
        char_layers: encoder layers of the character stage.
        word_layers: encoder layers of the word stage.
        pooling: ``"cls"`` (a word-CLS token is prepended to each word; its output is the word vector),
            ``"mean"``, ``"max"`` or ``"attention"`` (a learned query per word over its characters).
        dim_feedforward: feed-forward width; ``None`` means ``4 * dim``.
        dropout: dropout in the layers and on the embeddings.
        activation: ``"relu"``, ``"gelu"`` or a callable.
        norm_first: pre-norm layers (with a final LayerNorm after each stage) or post-norm.
        positional: ``"sinusoidal"`` or ``"learned"``.
        max_word_len: longest word a learned character position table covers (``"learned"`` only).
        max_sentence_len: longest sentence (in words) a learned word position table covers.
        cls_id: the word-CLS id (``CharVocab.CLS``).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_heads: int,
        char_layers: int,
        word_layers: int,
        pooling: str = "cls",
        *,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
        norm_first: bool = True,
        positional: str = "sinusoidal",
        max_word_len: int = 64,
        max_sentence_len: int = 512,
        cls_id: int = 2,
    ):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional must be 'sinusoidal' or 'learned', got {positional!r}")
        if pooling == "cls" and not 0 <= cls_id < vocab_size:
            raise ValueError(f"cls_id={cls_id} is not a valid id for vocab_size={vocab_size}")
        self.config = dict(
            vocab_size=vocab_size,
            dim=dim,
            num_heads=num_heads,
            char_layers=char_layers,
            word_layers=word_layers,
            pooling=pooling,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            norm_first=norm_first,
            positional=positional,
            max_word_len=max_word_len,
            max_sentence_len=max_sentence_len,
            cls_id=cls_id,
        )
        self.pooling, self.cls_id, self.dim = pooling, cls_id, dim
        ff = 4 * dim if dim_feedforward is None else dim_feedforward

        self.char_embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.char_embed.weight, std=dim**-0.5)
        if positional == "sinusoidal":
            self.char_pos = SinusoidalPositionalEncoding(dim)
            self.word_pos = SinusoidalPositionalEncoding(dim)
        else:
            # +1: the CLS token takes position 0 of a word.
            self.char_pos = LearnedPositionalEncoding(max_word_len + (pooling == "cls"), dim)
            self.word_pos = LearnedPositionalEncoding(max_sentence_len, dim)
        self.embed_dropout = nn.Dropout(dropout)

        def stack(num_layers: int) -> PackedTransformerEncoder:
            layer = PackedTransformerEncoderLayer(dim, num_heads, ff, dropout, activation, norm_first=norm_first)
            norm = nn.LayerNorm(dim) if norm_first and num_layers > 0 else None
            return PackedTransformerEncoder(layer, num_layers, norm)

        self.char_encoder = stack(char_layers)
        self.pool = None if pooling == "cls" else SegmentPooling(pooling, dim, num_heads)
        self.word_encoder = stack(word_layers)

    def _check_batch(self, batch) -> None:
        # Imported here: text.py is the data side and must not be needed to build layers.
        from ..text import TextBatch

        if not isinstance(batch, TextBatch):
            raise TypeError(f"batch must be a hierkern.TextBatch, got {type(batch).__name__}")
        if batch.device != self.char_embed.weight.device:
            raise ValueError(f"batch is on {batch.device} but the encoder is on {self.char_embed.weight.device}")

    @staticmethod
    def _positions(encoding: nn.Module, segments: Segments, dtype: torch.dtype) -> torch.Tensor:
        # Sinusoidal tables are gathered in the model's dtype (no full-size conversion per call); learned
        # ones are parameters in the model's dtype already.
        if isinstance(encoding, SinusoidalPositionalEncoding):
            return encoding(segments, dtype)
        return encoding(segments).to(dtype)

    def encode_chars(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The character stage.

        Args:
            batch: a ``TextBatch`` on the encoder's device.

        Returns:
            ``(char_states, word_vectors)``: ``(total_chars, dim)`` contextual character states (CLS
            tokens removed) and ``(total_words, dim)`` pooled word vectors.
        """
        self._check_batch(batch)
        words = batch.words
        if self.pooling == "cls":
            ids, segs = prepend_token(batch.char_ids, words, self.cls_id)
        else:
            ids, segs = batch.char_ids, words
        x = self.char_embed(ids)
        x = apply_dropout(self.embed_dropout, x + self._positions(self.char_pos, segs, x.dtype))
        x = self.char_encoder(x, segs)
        if self.pooling == "cls":
            return x[_shifted_index(words)], x[segs.offsets[:-1].long()]
        return x, self.pool(x, words)

    def embed_words(self, batch) -> torch.Tensor:
        """Char-stage word vectors ``(total_words, dim)``: each depends on its own characters only."""
        return self.encode_chars(batch)[1]

    def contextualize(self, word_vectors: torch.Tensor, sentences: Segments) -> torch.Tensor:
        """The word stage: ``(total_words, dim)`` packed by ``sentences`` -> ``(total_words, dim)``."""
        positions = self._positions(self.word_pos, sentences, word_vectors.dtype)
        x = apply_dropout(self.embed_dropout, word_vectors + positions)
        return self.word_encoder(x, sentences)

    def forward(self, batch) -> torch.Tensor:
        """Contextual word vectors ``(total_words, dim)``, packed by ``batch.sentences``."""
        return self.contextualize(self.embed_words(batch), batch.sentences)
