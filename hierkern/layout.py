"""Packed ragged layout: one level of grouping of packed tokens into segments.

A ``Segments`` object describes how ``total`` packed tokens split into ``S`` consecutive segments
(characters into words, words into sentences). It holds FlashAttention's ``cu_seqlens``:

* ``offsets``: int32 ``(S + 1,)``, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == total``;
* ``max_len``: the longest segment, a host ``int`` so that kernel launches never need a device sync;
* ``total``: the number of packed tokens, a host ``int``.

Zero-length segments are legal. Validation (and the single device->host copy it needs for CUDA offsets)
happens once, at construction; every later use is sync-free.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["Segments", "check_offsets", "host_readable"]

LengthsLike = Sequence[int] | torch.Tensor


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs nothing: a CPU tensor in eager mode. A CUDA tensor would need a
    device sync, and under ``torch.compile`` a host read breaks the graph."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_offsets(offsets: torch.Tensor, name: str = "offsets", total: int | None = None) -> None:
    """Validate a host-readable offsets tensor; raise ``ValueError``/``TypeError`` naming ``name``.

    Reads values, so call it only on CPU tensors or where a device sync is acceptable.
    """
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with at least one element (S + 1 >= 1), got shape {tuple(offsets.shape)}")
    values = offsets.detach().cpu()
    if int(values[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(values[0])}")
    if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
        bad = int(torch.nonzero(values[1:] < values[:-1])[0])
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{bad + 1}]={int(values[bad + 1])} "
            f"< {name}[{bad}]={int(values[bad])}"
        )
    if int(values[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"{name}[-1]={int(values[-1])} does not fit in int32 offsets")
    if total is not None and int(values[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {int(values[-1])}")


def _check_length_arg(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")


class Segments:
    """One level of ragged grouping over packed tokens.

    Args:
        offsets: int tensor ``(S + 1,)`` (``cu_seqlens``); converted to int32.
        max_len: the longest segment; computed from ``offsets`` when ``None``.
        total: ``offsets[-1]``; read from ``offsets`` when ``None``.
        validate: check ``offsets`` (one device->host copy for CUDA tensors).

    Prefer the constructors ``Segments.from_lengths`` and ``Segments.from_mask``.
    """

    __slots__ = ("offsets", "max_len", "total", "_segment_ids", "_positions")

    def __init__(
        self, offsets: torch.Tensor, max_len: int | None = None, total: int | None = None, *, validate: bool = True
    ):
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
        # At most one device->host copy, shared by validation and the host-side max_len / total.
        host = offsets.detach().cpu() if (validate or max_len is None or total is None) else None
        if validate:
            check_offsets(host, "offsets", total)
        offsets = offsets.to(torch.int32).contiguous()  # kernels read offsets with unit stride
        if max_len is None:
            max_len = int(host.diff().max()) if host.numel() > 1 else 0
        _check_length_arg(max_len, "max_len")
        if total is not None:
            _check_length_arg(total, "total")
        if host is not None and host.numel() > 1 and int(host.diff().max()) > max_len:
            raise ValueError(f"max_len={max_len} is smaller than the longest segment ({int(host.diff().max())})")
        self.offsets = offsets
        self.max_len = max_len
        self.total = int(host[-1]) if total is None else total
        self._segment_ids = None
        self._positions = None

    # -- constructors ---------------------------------------------------------------------------------

    @classmethod
    def from_lengths(cls, lengths: LengthsLike, device: torch.device | str | None = None) -> Segments:
        """Segments from per-segment lengths (a list of ints or a 1-D integer tensor; zeros allowed)."""
        if isinstance(lengths, torch.Tensor):
            if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
                raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
            if lengths.dim() != 1:
                raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
            host = lengths.detach().to("cpu", torch.int64)
            device = lengths.device if device is None else device
        else:
            try:
                items = list(lengths)
            except TypeError:
                raise TypeError(
                    f"lengths must be a list of ints or a 1-D integer tensor, got {type(lengths).__name__}"
                ) from None
            for item in items:
                if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                    raise TypeError(f"lengths must contain ints, got {type(item).__name__}")
            host = torch.tensor([int(item) for item in items], dtype=torch.int64)
        if host.numel() and int(host.min()) < 0:
            raise ValueError(f"lengths must be non-negative, got {int(host.min())} at index {int(torch.argmin(host))}")
        offsets = torch.zeros(host.numel() + 1, dtype=torch.int64)
        torch.cumsum(host, 0, out=offsets[1:])
        if int(offsets[-1]) > torch.iinfo(torch.int32).max:
            raise ValueError("the total length does not fit in int32 offsets")
        max_len = int(host.max()) if host.numel() else 0
        offsets = offsets.to(torch.int32)
        return cls(offsets if device is None else offsets.to(device), max_len, int(offsets[-1]), validate=False)

    @classmethod
    def from_mask(cls, key_padding_mask: torch.Tensor) -> Segments:
        """Segments from a ``(B, L)`` padding mask (True = padding, as ``nn.MultiheadAttention``).

        The valid tokens of each row must form a prefix of the row; anything else is a ``ValueError``.
        """
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if key_padding_mask.dim() != 2:
            raise ValueError(f"key_padding_mask must have shape (B, L), got {tuple(key_padding_mask.shape)}")
        valid = ~key_padding_mask
        # A prefix mask is non-increasing along each row: valid tokens never follow padding. The verdict
        # and the lengths come to the host in one copy (one sync for a CUDA mask).
        not_prefix = (valid[:, 1:] & ~valid[:, :-1]).any()
        host = torch.cat([valid.sum(1), not_prefix.long()[None]]).cpu()
        if bool(host[-1]):
            raise ValueError(
                "key_padding_mask must mark a prefix of each row as valid (padding only at the end of a row)"
            )
        return cls.from_lengths(host[:-1], device=key_padding_mask.device)

    # -- properties -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def num_segments(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int32 ``(S,)`` segment lengths, on the offsets' device."""
        return self.offsets.diff()

    def to(self, device: torch.device | str) -> Segments:
        return Segments(self.offsets.to(device), self.max_len, self.total, validate=False)

    def segment_ids(self) -> torch.Tensor:
        """int64 ``(total,)``: the segment each packed token belongs to."""
        if self._segment_ids is None:
            self._segment_ids = torch.repeat_interleave(
                torch.arange(self.num_segments, device=self.device), self.lengths.long(), output_size=self.total
            )
        return self._segment_ids

    def positions(self) -> torch.Tensor:
        """int64 ``(total,)``: each token's position inside its segment (restarts at 0 per segment)."""
        if self._positions is None:
            ids = self.segment_ids()
            self._positions = torch.arange(self.total, device=self.device) - self.offsets.long()[ids]
        return self._positions

    # -- packing --------------------------------------------------------------------------------------

    def _padded_len(self, padded_len: int | None) -> int:
        if padded_len is None:
            return self.max_len
        _check_length_arg(padded_len, "padded_len")
        if padded_len < self.max_len:
            raise ValueError(f"padded_len={padded_len} is smaller than the longest segment ({self.max_len})")
        return padded_len

    def _flat_index(self, padded_len: int) -> torch.Tensor:
        return self.segment_ids() * padded_len + self.positions()

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``(S, L, *) -> (total, *)``: gather the valid tokens, ``L >= max_len``. Differentiable."""
        if not isinstance(padded, torch.Tensor):
            raise TypeError(f"padded must be a torch.Tensor, got {type(padded).__name__}")
        if padded.dim() < 2 or padded.shape[0] != self.num_segments:
            raise ValueError(f"padded must have shape (S={self.num_segments}, L, ...), got {tuple(padded.shape)}")
        if padded.shape[1] < self.max_len:
            raise ValueError(f"padded has L={padded.shape[1]} positions but the longest segment has {self.max_len}")
        if padded.device != self.device:
            raise ValueError(f"padded is on {padded.device} but the segments are on {self.device}")
        length = padded.shape[1]
        flat = padded.reshape(self.num_segments * length, *padded.shape[2:])
        return flat[self._flat_index(length)]

    def unpack(self, packed: torch.Tensor, padded_len: int | None = None) -> torch.Tensor:
        """``(total, *) -> (S, max_len, *)`` (or ``padded_len``), zeros where padded. Differentiable."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dim() < 1 or packed.shape[0] != self.total:
            raise ValueError(f"packed must have shape (total={self.total}, ...), got {tuple(packed.shape)}")
        if packed.device != self.device:
            raise ValueError(f"packed is on {packed.device} but the segments are on {self.device}")
        length = self._padded_len(padded_len)
        out = packed.new_zeros(self.num_segments * length, *packed.shape[1:])
        out = out.index_put((self._flat_index(length),), packed)
        return out.view(self.num_segments, length, *packed.shape[1:])

    def padding_mask(self, padded_len: int | None = None) -> torch.Tensor:
        """``(S, L)`` bool, True = padding (``nn.MultiheadAttention``'s ``key_padding_mask``)."""
        length = self._padded_len(padded_len)
        ar = torch.arange(length, device=self.device)
        return ar[None, :] >= self.lengths.long()[:, None]

    def __repr__(self) -> str:
        return (
            f"Segments(num_segments={self.num_segments}, total={self.total}, max_len={self.max_len}, "
            f"device={self.device})"
        )
