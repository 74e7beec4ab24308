"""The seed model as a competent PyTorch user writes it today: padded, twice.

``PaddedHierarchicalEncoder`` is ``hierkern.HierarchicalEncoder(pooling="mean", positional="sinusoidal")``
built from torch's own modules: two ``nn.TransformerEncoder`` stacks driven by key padding masks. Its
parameter names are hierkern's (``char_embed``, ``char_encoder.layers.<i>.*``, ``char_encoder.norm``,
``word_encoder.*``), so one ``state_dict`` loads into both and the benchmark compares the same function.

The padding lives where such a user keeps it: the data loader hands over character ids already padded to
``(words, longest word)`` and the masks (``PaddedBatch``, built once, untimed); inside the model the pooled
word vectors are scattered into a ``(sentences, longest sentence, E)`` batch, as any padded two-stage model
must do between its stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import hierkern


@dataclass
class PaddedBatch:
    """What a padded data loader yields for a ``hierkern.TextBatch``.

    Attributes:
        char_ids: ``(W, Lw)`` int64, padded with 0.
        char_pad: ``(W, Lw)`` bool, True = padding (``src_key_padding_mask``).
        word_slot: ``(total_words,)`` int64: the flat index of each word in the ``(S, Ls)`` sentence batch.
        word_pad: ``(S, Ls)`` bool, True = padding.
    """

    char_ids: torch.Tensor
    char_pad: torch.Tensor
    word_slot: torch.Tensor
    word_pad: torch.Tensor

    @classmethod
    def of(cls, batch: hierkern.TextBatch) -> PaddedBatch:
        words, sentences = batch.words, batch.sentences
        char_ids = words.unpack(batch.char_ids)
        slot = sentences.segment_ids() * sentences.max_len + sentences.positions()
        return cls(char_ids, words.padding_mask(), slot, sentences.padding_mask())

    def pack_words(self, padded: torch.Tensor) -> torch.Tensor:
        """``(S, Ls, E)`` -> ``(total_words, E)``, the real words in order."""
        return padded.flatten(0, 1)[self.word_slot]


def sinusoidal_table(length: int, dim: int, device, base: float = 10000.0) -> torch.Tensor:
    """``(length, dim)`` float32: the encodings of positions ``0..length-1``, interleaved sin/cos exactly as
    ``hierkern.SinusoidalPositionalEncoding``."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(base) / dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)


class PaddedHierarchicalEncoder(nn.Module):
    """Character transformer per padded word, masked mean pooling, word transformer per padded sentence.

    Arguments mirror ``hierkern.HierarchicalEncoder`` (mean pooling, sinusoidal positions that restart in
    every word and sentence, pre-norm stacks ending in a LayerNorm, post-norm stacks without one).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_heads: int,
        char_layers: int,
        word_layers: int,
        *,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
        norm_first: bool = True,
    ):
        super().__init__()
        self.dim = dim
        ff = 4 * dim if dim_feedforward is None else dim_feedforward
        self.char_embed = nn.Embedding(vocab_size, dim)
        self.embed_dropout = nn.Dropout(dropout)

        def stack(num_layers: int) -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(
                dim, num_heads, ff, dropout, activation, batch_first=True, norm_first=norm_first
            )
            norm = nn.LayerNorm(dim) if norm_first and num_layers > 0 else None
            # enable_nested_tensor (the default) lets eval + no_grad post-norm stacks run torch's nested
            # fast path; torch turns it off by itself for pre-norm layers.
            return nn.TransformerEncoder(layer, num_layers, norm, enable_nested_tensor=not norm_first)

        self.char_encoder = stack(char_layers)
        self.word_encoder = stack(word_layers)
        # Positions are a fixed function of the padded length: one table, grown on demand, not a buffer (so
        # the state_dict stays hierkern's).
        self._table = torch.empty(0, dim)

    def _positions(self, length: int, device) -> torch.Tensor:
        if self._table.shape[0] < length or self._table.device != device:
            self._table = sinusoidal_table(max(length, 64), self.dim, device)
        return self._table[:length]

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """Contextual word vectors, padded: ``(S, Ls, E)`` (padded slots hold unspecified values)."""
        x = self.char_embed(batch.char_ids)
        x = self.embed_dropout(x + self._positions(x.shape[1], x.device).to(x.dtype))
        x = self.char_encoder(x, src_key_padding_mask=batch.char_pad)
        # Masked mean over each word's characters: the fast path already zeroes padded rows, the pre-norm
        # path leaves arbitrary values there.
        keep = (~batch.char_pad).to(x.dtype)[..., None]
        words = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        num, length = batch.word_pad.shape
        sentences = words.new_zeros(num * length, self.dim).index_copy(0, batch.word_slot, words)
        x = sentences.view(num, length, self.dim)
        x = self.embed_dropout(x + self._positions(length, x.device).to(x.dtype))
        return self.word_encoder(x, src_key_padding_mask=batch.word_pad)
