"""``hierkern.TransformerEncoderLayer`` / ``hierkern.TransformerEncoder``: drop-in ``torch.nn`` encoders that
run every layer on the real tokens only.

Both classes *are* torch's (subclasses): the constructor, parameter names, initialisation (the same random
draws for the same seed) and ``state_dict`` are torch's own, so checkpoints load both ways. ``forward`` takes
torch's arguments. When the masking is key padding whose valid tokens are a prefix of each row and/or
causal masking, the encoder packs the real tokens once on entry (``Segments.pack``), runs every layer on the
packed ``(total, E)`` rows (projections, ``hierkern.varlen_attention``, feed-forward, norms and dropout
alike) and re-pads once on exit. Any other call runs torch's own ``forward``.

Padded positions of the output are zeros on the varlen path (torch's training path computes values there
that no valid position reads; its nested-tensor inference path returns zeros, passed through the final
``norm`` when there is one).

Packing reads the mask on the host once per call (a device sync for a CUDA mask). Under ``torch.compile``,
where that read would break the graph, the rows stay padded instead and every layer's attention takes
``hierkern.MultiheadAttention``'s sync-free path (a bool mask, sorted on the device), so
``torch.compile(fullgraph=True)`` traces the whole stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layout import Segments
from ..ops.dropout import apply_dropout, apply_dropout_add
from .masks import canonical_mask, check_mask, is_causal_mask, prefix_padding, uniform_segments
from .mha import MultiheadAttention

__all__ = ["TransformerEncoderLayer", "TransformerEncoder"]


@dataclass
class _Plan:
    """How a padded call runs. ``reason is None``: the varlen path with ``causal`` masking, packed by
    ``segments``, or (``key_padding_mask`` set) on the padded rows."""

    reason: str | None
    segments: Segments | None = None
    causal: bool = False
    # Under torch.compile: no packing; the bool key padding mask goes to every layer's attention, whose
    # sync-free path handles it on the device. ``mask`` is the caller's causal mask, passed along with it.
    key_padding_mask: Tensor | None = None
    mask: Tensor | None = None


def _torch_twin(module: nn.Module, torch_cls: type) -> nn.Module:
    """A ``torch_cls`` instance sharing ``module``'s parameters, buffers and submodules, for
    ``torch.jit.script``: TorchScript cannot compile hierkern's ``forward`` (``Segments`` arguments, planning
    in Python), and torch's is its scriptable equivalent. The submodule table is a copy, so the scripting
    pass (which replaces submodules by what *their* ``__prepare_scriptable__`` returns, in place) leaves
    the eager module as it was."""
    twin = torch_cls.__new__(torch_cls)
    twin.__dict__.update(module.__dict__)
    twin._modules = dict(module._modules)
    for name in ("last_path", "last_why_not_fast_path"):
        twin.__dict__.pop(name, None)
    return twin


def _check_packed(src, segments) -> None:
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a hierkern.Segments, got {type(segments).__name__}")
    if not isinstance(src, Tensor) or src.dim() != 2:
        raise ValueError(
            f"with segments=, src must be a packed (total, d_model) tensor, got "
            f"{tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__}"
        )
    if src.shape[0] != segments.total:
        raise ValueError(f"src has {src.shape[0]} tokens but segments covers {segments.total}")
    if segments.device != src.device:
        raise ValueError(f"segments is on {segments.device} but src is on {src.device}")


def _plan_padded(
    src: Tensor,
    mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool | None,
    batch_first: bool,
    num_heads: int,
    mask_name: str,
) -> _Plan:
    """Validate a padded self-attention call (``src`` ``(L, N, E)``/``(N, L, E)``/``(L, E)``) and choose its
    path. Reads the masks on the host (once per call; a device sync for CUDA masks), except under
    ``torch.compile``."""
    if not isinstance(src, Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    if src.is_nested:
        return _Plan("nested-tensor input runs torch's own nested path (hierkern's packed form is segments=)")
    if src.dim() not in (2, 3):
        raise ValueError(f"src must be (L, E) unbatched or 3-D batched, got shape {tuple(src.shape)}")
    batched = src.dim() == 3
    n = src.shape[0 if batch_first else 1] if batched else 1
    length = src.shape[1 if batch_first else 0] if batched else src.shape[0]
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
    if key_padding_mask is not None:
        check_mask("src_key_padding_mask", key_padding_mask)
        expected = (n, length) if batched else (length,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"src_key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != src.device:
            raise ValueError(f"src_key_padding_mask is on {key_padding_mask.device} but src is on {src.device}")
    if mask is not None:
        check_mask(mask_name, mask)
        shapes = [(length, length), (n * num_heads, length, length)]
        if tuple(mask.shape) not in shapes:
            raise ValueError(f"{mask_name} must have shape {shapes[0]} or {shapes[1]}, got {tuple(mask.shape)}")
        if mask.device != src.device:
            raise ValueError(f"{mask_name} is on {mask.device} but src is on {src.device}")

    # Under torch.compile a host read of a mask is a graph break: no mask is inspected there (is_causal is
    # trusted, and a key padding mask goes to the attention's sync-free path instead of packing).
    compiling = torch.compiler.is_compiling()
    # As torch's layers hand the masks to MultiheadAttention: with is_causal and no key padding the causal
    # flag replaces the mask; otherwise the mask is what masks.
    if mask is None:
        if is_causal:
            return _Plan(f"is_causal=True without {mask_name}: torch's path raises its own error")
        causal = False
    elif is_causal and (key_padding_mask is None or compiling):
        # With padding, torch documents is_causal as the caller's promise that the mask is causal.
        causal = True
    elif compiling:
        return _Plan(
            f"under torch.compile, telling whether {mask_name} is the causal mask would read it on "
            f"the host (pass is_causal=True if it is)"
        )
    elif is_causal_mask(canonical_mask(mask, src.dtype)):
        causal = True
    else:
        return _Plan(f"{mask_name} is neither None nor the causal mask")
    if key_padding_mask is None:
        return _Plan(None, uniform_segments(n, length, src.device), causal)
    if compiling:
        if key_padding_mask.dtype != torch.bool:
            return _Plan(
                "under torch.compile, telling whether a float src_key_padding_mask holds only 0 and -inf "
                "would read it on the host (pass a bool mask)"
            )
        # Packing would need the token count on the host: the rows stay padded instead.
        return _Plan(None, None, causal, key_padding_mask=key_padding_mask, mask=mask if causal else None)
    pad = prefix_padding(canonical_mask(key_padding_mask, src.dtype).reshape(n, length))
    if pad is None:
        return _Plan(
            "src_key_padding_mask is not prefix padding (0/False for a prefix of each row, -inf/True after it)"
        )
    return _Plan(None, Segments.from_mask(pad), causal)


def _run(plan: _Plan, src: Tensor, batch_first: bool, fn: Callable[[Tensor, Callable], Tensor]) -> Tensor:
    """Run ``fn(x, attention)`` (a layer or the stack; ``attention(self_attn)`` is a self-attention call) as
    ``plan`` says: on the packed rows, or (sync-free) on the padded rows, zeroing the padded positions after."""

    def attention(attn: MultiheadAttention) -> Callable[[Tensor], Tensor]:
        return _attention(attn, plan)

    if plan.key_padding_mask is None:
        return _through_packed(src, plan.segments, batch_first, lambda x: fn(x, attention))
    out = fn(src, attention)
    pad = plan.key_padding_mask if (src.dim() == 2 or batch_first) else plan.key_padding_mask.t()
    return out.masked_fill(pad[..., None], 0.0)


def _attention(attn: MultiheadAttention, plan: _Plan) -> Callable[[Tensor], Tensor]:
    """``x -> self-attention of x`` as ``plan`` says: inside the packed segments, or over the padded rows with
    the key padding mask (``MultiheadAttention``'s sync-free path under torch.compile)."""
    if plan.key_padding_mask is None:
        return lambda x: attn(x, x, x, need_weights=False, is_causal=plan.causal, segments=plan.segments)[0]
    return lambda x: attn(
        x, x, x, key_padding_mask=plan.key_padding_mask, need_weights=False, attn_mask=plan.mask, is_causal=plan.causal
    )[0]


def _through_packed(src: Tensor, segments: Segments, batch_first: bool, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Pack the padded ``src`` by ``segments``, apply ``fn`` to the ``(total, E)`` rows, re-pad with zeros."""
    batched = src.dim() == 3
    x = (src if batch_first else src.transpose(0, 1)) if batched else src.unsqueeze(0)
    n, length = x.shape[0], x.shape[1]
    dense = segments.total == n * length  # no padding: a view, no gather
    out = fn(x.reshape(n * length, x.shape[-1]) if dense else segments.pack(x))
    out = out.view(n, length, out.shape[-1]) if dense else segments.unpack(out, length)
    if not batched:
        return out.squeeze(0)
    return out if batch_first else out.transpose(0, 1)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    r"""``torch.nn.TransformerEncoderLayer`` whose padding- and causal-masked calls skip the padding.

    Construction, parameters (``self_attn.*``, ``linear1``, ``linear2``, ``norm1``, ``norm2``), initialisation
    and ``state_dict`` are torch's (this class derives from it; ``self_attn`` is a
    ``hierkern.MultiheadAttention``, itself a ``torch.nn.MultiheadAttention``).

    Args:
        d_model: width ``E``.
        nhead: attention heads (``d_model % nhead == 0``).
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout after attention and feed-forward, inside the feed-forward and on the attention
            weights (training only).
        activation: ``"relu"``, ``"gelu"`` or a callable.
        layer_norm_eps: LayerNorm epsilon.
        batch_first: ``(N, L, E)`` instead of ``(L, N, E)``.
        norm_first: pre-norm ``x + sa(norm1(x))`` instead of post-norm ``norm1(x + sa(x))``.
        bias: biases in the linear layers and norms.
        device, dtype: factory arguments.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, segments=None)``: with
    ``segments`` (a ``hierkern.Segments``) ``src`` is packed ``(total, E)`` and attention stays inside each
    segment (``is_causal``: causal inside each); otherwise torch's call. ``last_path`` says which path the
    last call took (``"varlen"`` or ``"torch"``), ``last_why_not_fast_path`` why not varlen.
    """

    # Which path the last forward took ("varlen" or "torch") and why not varlen: class defaults, so modules built,
    # adopted or unpickled without them read None.
    last_path: str | None = None
    last_why_not_fast_path: str | None = None

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = nn.functional.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        if isinstance(activation, str) and activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
        if not isinstance(activation, str) and not callable(activation):
            raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
        super().__init__(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        # Retyped, not rebuilt: the parameters (and the random draws that initialised them) stay torch's.
        MultiheadAttention.adopt(self.self_attn)

    @classmethod
    def adopt(cls, layer: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        """Turn a ``torch.nn.TransformerEncoderLayer`` (exactly that class) into this class in place: the same
        module object, parameter objects and state (optimisers holding them keep working). Its ``self_attn``
        is adopted too when it is a plain ``torch.nn.MultiheadAttention``. Returns ``layer``."""
        if type(layer) is not nn.TransformerEncoderLayer:
            raise TypeError(
                f"layer must be a torch.nn.TransformerEncoderLayer (not a subclass), got {type(layer).__name__}"
            )
        if type(layer.self_attn) is nn.MultiheadAttention:
            MultiheadAttention.adopt(layer.self_attn)
        layer.__class__ = cls
        return layer

    def __prepare_scriptable__(self) -> nn.TransformerEncoderLayer:
        return _torch_twin(self, nn.TransformerEncoderLayer)

    def _static_reason(self) -> str | None:
        """Why no call of this layer could take the varlen path (``None``: calls may)."""
        if not isinstance(self.self_attn, MultiheadAttention):
            return f"self_attn is a {type(self.self_attn).__name__}, not a hierkern.MultiheadAttention"
        return self.self_attn._static_reason()

    def _plan(self, src, src_mask, src_key_padding_mask, is_causal) -> _Plan:
        reason = self._static_reason()
        if reason is not None:
            return _Plan(reason)
        return _plan_padded(
            src,
            src_mask,
            src_key_padding_mask,
            is_causal,
            self.self_attn.batch_first,
            self.self_attn.num_heads,
            "src_mask",
        )

    def why_not_fast_path(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> str | None:
        """Why ``forward`` with these arguments would not run the varlen path; ``None`` when it would."""
        return self._plan(src, src_mask, src_key_padding_mask, is_causal).reason

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        segments: Segments | None = None,
    ) -> Tensor:
        r"""One encoder layer.

        Args:
            src: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``), ``(L, E)`` unbatched, or packed
                ``(total, E)`` with ``segments``.
            src_mask: ``(L, L)`` or ``(N * nhead, L, L)`` attention mask (bool: True = blocked; float: added).
            src_key_padding_mask: ``(N, L)`` (``(L,)`` unbatched), bool (True = padding) or float.
            is_causal: torch's hint that ``src_mask`` is the causal mask; with ``segments``, causal masking
                inside every segment.
            segments: ``hierkern.Segments`` over the packed ``src`` rows (no masks then).

        Returns:
            Shaped like ``src``. On the varlen path padded positions are zeros.
        """
        if segments is not None:
            if src_mask is not None or src_key_padding_mask is not None:
                raise ValueError(
                    "with segments=, src_mask and src_key_padding_mask must be None (the segments "
                    "already say which tokens attend to which)"
                )
            if not isinstance(is_causal, bool):
                raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
            _check_packed(src, segments)
            if not isinstance(self.self_attn, MultiheadAttention):
                raise TypeError(
                    f"segments= needs self_attn to be a hierkern.MultiheadAttention, got "
                    f"{type(self.self_attn).__name__}"
                )
            self.last_path, self.last_why_not_fast_path = "varlen", None
            return self._block(src, _attention(self.self_attn, _Plan(None, segments, is_causal)))
        plan = self._plan(src, src_mask, src_key_padding_mask, is_causal)
        self.last_why_not_fast_path = plan.reason
        if plan.reason is not None:
            self.last_path = "torch"
            return super().forward(
                src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal
            )
        self.last_path = "varlen"
        return _run(
            plan, src, self.self_attn.batch_first, lambda x, attention: self._block(x, attention(self.self_attn))
        )

    def _block(self, x: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        """torch's layer with ``attend`` as the self-attention: on packed ``(total, E)`` rows, or on padded
        rows (everything but the attention works token by token). Its three dropouts run hierkern's kernel
        (``hierkern.ops.dropout``), the two on the residual branches fused with the residual add."""
        if self.norm_first:
            x = apply_dropout_add(x, self.dropout1, attend(self.norm1(x)))
            return apply_dropout_add(x, self.dropout2, self._feed_forward(self.norm2(x)))
        x = self.norm1(apply_dropout_add(x, self.dropout1, attend(x)))
        return self.norm2(apply_dropout_add(x, self.dropout2, self._feed_forward(x)))

    def _feed_forward(self, x: Tensor) -> Tensor:
        """torch's ``_ff_block`` up to its last dropout, which ``_block`` fuses with the residual add."""
        return self.linear2(apply_dropout(self.dropout, self.activation(self.linear1(x))))


class TransformerEncoder(nn.TransformerEncoder):
    r"""``torch.nn.TransformerEncoder`` that strips the padding once, runs every layer on the real tokens, and
    re-pads once.

    Args:
        encoder_layer: the layer to clone ``num_layers`` times. A ``torch.nn.TransformerEncoderLayer``'s clones
            become ``hierkern.TransformerEncoderLayer`` (the argument itself is left untouched).
        num_layers: number of layers.
        norm: optional final norm (applied to the packed rows on the varlen path).
        enable_nested_tensor: torch's flag, kept for its path (other masks, nested input).
        mask_check: torch's flag, likewise.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None, *, segments=None)``:

    * **varlen** when every layer is a ``hierkern.TransformerEncoderLayer`` with the same ``batch_first``,
      and the masking is a ``src_key_padding_mask`` (bool, or float holding only 0 and -inf) whose valid
      tokens are a prefix of each row and/or causal masking (``mask`` equal to the causal mask, or
      ``is_causal=True`` with a ``mask``), in training and inference. One host read of the masks per call
      (a device sync for CUDA masks); padded positions of the output are zeros. Under ``torch.compile``
      a bool ``src_key_padding_mask`` (prefix or not) keeps the rows padded and each attention runs the
      sync-free varlen path, and ``mask`` counts as causal only with ``is_causal=True``: no host read.
    * **torch** (``torch.nn.TransformerEncoder.forward``, whose layers are still hierkern's and choose their
      own paths) otherwise.
    * **packed**: ``segments`` (a ``hierkern.Segments``) with ``src`` packed ``(total, E)``; ``is_causal``
      means causal inside each segment.

    ``last_path`` is ``"varlen"`` or ``"torch"`` after each call, ``last_why_not_fast_path`` why not varlen.
    """

    # Which path the last forward took ("varlen" or "torch") and why not varlen: class defaults, so modules built,
    # adopted or unpickled without them read None.
    last_path: str | None = None
    last_why_not_fast_path: str | None = None

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        if not isinstance(encoder_layer, nn.Module):
            raise TypeError(f"encoder_layer must be an nn.Module, got {type(encoder_layer).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module or None, got {type(norm).__name__}")
        super().__init__(
            encoder_layer, num_layers, norm=norm, enable_nested_tensor=enable_nested_tensor, mask_check=mask_check
        )
        for layer in self.layers:
            if type(layer) is nn.TransformerEncoderLayer:
                TransformerEncoderLayer.adopt(layer)

    @classmethod
    def adopt(cls, encoder: nn.TransformerEncoder) -> TransformerEncoder:
        """Turn a ``torch.nn.TransformerEncoder`` (exactly that class) into this class in place, adopting its
        plain ``torch.nn.TransformerEncoderLayer`` layers too. Returns ``encoder``."""
        if type(encoder) is not nn.TransformerEncoder:
            raise TypeError(
                f"encoder must be a torch.nn.TransformerEncoder (not a subclass), got {type(encoder).__name__}"
            )
        for layer in encoder.layers:
            if type(layer) is nn.TransformerEncoderLayer:
                TransformerEncoderLayer.adopt(layer)
        encoder.__class__ = cls
        return encoder

    def __prepare_scriptable__(self) -> nn.TransformerEncoder:
        twin = _torch_twin(self, nn.TransformerEncoder)
        twin.layers = nn.ModuleList(self.layers)  # its own list: scripting replaces the layers in it
        return twin

    def _static_reason(self) -> str | None:
        if len(self.layers) == 0:
            return "no layers"
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, TransformerEncoderLayer):
                return f"layers[{i}] is a {type(layer).__name__}, not a hierkern.TransformerEncoderLayer"
            reason = layer._static_reason()
            if reason is not None:
                return f"layers[{i}]: {reason}"
            if layer.self_attn.batch_first != self.layers[0].self_attn.batch_first:
                return f"layers[{i}] and layers[0] disagree on batch_first"
        return None

    def _plan(self, src, mask, src_key_padding_mask, is_causal) -> _Plan:
        reason = self._static_reason()
        if reason is not None:
            return _Plan(reason)
        attn = self.layers[0].self_attn
        return _plan_padded(src, mask, src_key_padding_mask, is_causal, attn.batch_first, attn.num_heads, "mask")

    def why_not_fast_path(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> str | None:
        """Why ``forward`` with these arguments would not run the varlen path; ``None`` when it would."""
        return self._plan(src, mask, src_key_padding_mask, is_causal).reason

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
        *,
        segments: Segments | None = None,
    ) -> Tensor:
        r"""The stack of layers, then ``norm``.

        Args:
            src: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``), ``(L, E)`` unbatched, or packed
                ``(total, E)`` with ``segments``.
            mask: ``(L, L)`` or ``(N * nhead, L, L)`` attention mask (bool: True = blocked; float: added).
            src_key_padding_mask: ``(N, L)`` (``(L,)`` unbatched), bool (True = padding) or float.
            is_causal: torch's hint that ``mask`` is the causal mask (``None``: detected, as torch does).
            segments: ``hierkern.Segments`` over the packed ``src`` rows (no masks then).

        Returns:
            Shaped like ``src``. On the varlen path padded positions are zeros.
        """
        if segments is not None:
            if mask is not None or src_key_padding_mask is not None:
                raise ValueError(
                    "with segments=, mask and src_key_padding_mask must be None (the segments "
                    "already say which tokens attend to which)"
                )
            if is_causal is not None and not isinstance(is_causal, bool):
                raise TypeError(f"is_causal must be a bool or None, got {type(is_causal).__name__}")
            _check_packed(src, segments)
            for i, layer in enumerate(self.layers):
                if not isinstance(layer, TransformerEncoderLayer):
                    raise TypeError(
                        f"segments= needs hierkern.TransformerEncoderLayer layers, but layers[{i}] is "
                        f"a {type(layer).__name__}"
                    )
            self.last_path, self.last_why_not_fast_path = "varlen", None
            plan = _Plan(None, segments, bool(is_causal))
            return self._stack(src, lambda attn: _attention(attn, plan))
        plan = self._plan(src, mask, src_key_padding_mask, is_causal)
        self.last_why_not_fast_path = plan.reason
        if plan.reason is not None:
            self.last_path = "torch"
            return super().forward(src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        self.last_path = "varlen"
        return _run(plan, src, self.layers[0].self_attn.batch_first, self._stack)

    def _stack(self, x: Tensor, attention: Callable[[MultiheadAttention], Callable[[Tensor], Tensor]]) -> Tensor:
        """Every layer, then ``norm``; ``attention(self_attn)`` is each layer's self-attention call."""
        for layer in self.layers:
            x = layer._block(x, attention(layer.self_attn))
        return x if self.norm is None else self.norm(x)
