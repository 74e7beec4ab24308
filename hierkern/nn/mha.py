"""``hierkern.MultiheadAttention``: a drop-in ``torch.nn.MultiheadAttention`` that skips the padding.

The module *is* a ``torch.nn.MultiheadAttention`` (a subclass): the constructor, parameter names,
initialisation, ``state_dict`` and ``__setstate__`` are torch's own, so checkpoints load both ways and
``isinstance`` checks keep working. Only ``forward`` differs: when the call's masking is nothing but key
padding (valid tokens a prefix of each row) and/or a causal mask, and no attention weights are requested,
it packs the real tokens (``Segments.from_mask``), projects only those, runs ``hierkern.varlen_attention``
and re-pads. Every other call runs torch's own ``forward``, so its results are torch's by construction.

Masks whose values cannot be read for free (on a GPU, where reading them would sync the device, and under
``torch.compile``, where it would break the graph) are planned without reading them: the rows stay padded,
a device-side sort puts each row's valid keys first, and the segment offsets are computed on the device
with the padded width as ``max_seqlen``. That path has no device-to-host copy and traces with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import varlen_attention
from ..layout import Segments
from .masks import Plan, check_tensor, plan_call

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` whose padding- and causal-masked calls skip the padding.

    Construction, parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), initialisation and ``state_dict`` are
    ``torch.nn.MultiheadAttention``'s (this class derives from it), so a torch checkpoint loads here and
    ours loads into torch.

    Args:
        embed_dim: total model dimension ``E``; each of the ``num_heads`` heads gets ``E // num_heads``.
        num_heads: number of attention heads.
        dropout: dropout probability on the attention weights (training only).
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value to every key/value sequence.
        add_zero_attn: append a zero key and value to every key/value sequence.
        kdim: key feature size (``None``: ``embed_dim``).
        vdim: value feature size (``None``: ``embed_dim``).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: factory arguments for the parameters.

    Which path a call takes: ``why_not_fast_path(...)`` gives the reason for given arguments (``None``:
    varlen), and after every call ``last_path`` is ``"varlen"`` or ``"torch"`` and
    ``last_why_not_fast_path`` the reason (``None`` on the varlen path):

    * **varlen** (``hierkern.varlen_attention``, backend ``"auto"``) when ``need_weights=False``, there is
      no ``bias_k``/``bias_v`` and no ``add_zero_attn``, and the only masking is a ``key_padding_mask``
      (bool, or float of any dtype torch takes, holding only 0 and -inf) whose valid keys are a prefix of
      each row and/or causal masking: ``is_causal=True`` (which, as in torch, means "causal" when there
      is no ``key_padding_mask``) or an ``attn_mask`` equal to the causal mask. Causal masking with
      padding takes this path in self-attention only, and with ``L != S`` not at all (torch aligns its
      causal mask top-left, varlen bottom-right).
    * **varlen, sync-free** when the masks are on a GPU or the call is being compiled (reading a mask's
      values would sync the device or break the graph): the same, except that any *bool*
      ``key_padding_mask`` qualifies (prefix or not: a stable device-side sort puts each row's valid keys
      first, so no value is checked on the host), the projections run on all ``N * L`` padded rows, an
      ``attn_mask`` counts as causal only with ``is_causal=True`` (torch's documented promise), and a
      float ``key_padding_mask`` takes torch's path (telling whether it holds only 0 and -inf would read
      it). Offsets are computed on the device; ``max_seqlen`` is the padded width.
    * **torch** (``torch.nn.MultiheadAttention.forward`` itself) otherwise: ``need_weights=True``,
      arbitrary masks (a float mask with other values than 0 and -inf is added to the scores),
      ``add_bias_kv``, ``add_zero_attn``, padding that is not a prefix, nested tensors.

    Mask dtypes are accepted exactly where torch accepts them: bool, or float of the query's dtype; with
    ``need_weights=False`` also float32 (torch adds the two masks and hands the sum to
    ``scaled_dot_product_attention``, which takes float32 or the query's dtype).

    Dropout (training only) on the varlen path is the backend's: the same distribution as torch's, not
    the same random draws. Its seed is a tensor drawn from torch's generator on every call, never a Python
    number read with ``.item()``, so a compiled graph draws a fresh mask each call. On a GPU, the ``triton``
    backend (``"auto"``'s choice) draws it on the device, so a CUDA graph replays fresh masks; the ``cuda``
    backend's op takes ``rng_state`` as a CPU tensor (its C++ binding copies the seed into the launch
    arguments), so a CUDA graph captured with it would replay one mask.

    Semantics differ from torch in exactly one place: on the varlen path, in self-attention
    (``query is key is value``) with a ``key_padding_mask``, the outputs at padded *query* positions are
    zeros (as with torch's own nested-tensor fast path) rather than attention over the valid keys. Every
    other position, and every position of a cross-attention call, equals torch's. Malformed arguments
    raise ``ValueError``/``TypeError`` naming the argument where torch would raise an ``AssertionError``,
    or for a mask dtype it refuses a ``RuntimeError``, deep inside (with ``need_weights=True`` mask dtypes
    are left to torch's own error); ``is_causal=True`` without ``attn_mask`` raises torch's
    ``RuntimeError`` on every path (torch's inference fast path silently ignores the flag instead).

    ``torch.jit.script`` cannot compile this ``forward`` (``Segments`` arguments, planning in Python), so
    scripting this module, or a model holding it, compiles a ``torch.nn.MultiheadAttention`` that shares
    its parameters (``__prepare_scriptable__``): the scripted model runs torch's kernels and gives
    torch's results, and scripts wherever torch's module does (torch 2.13's does not with
    ``bias=False``). torch's scripting puts that module in place of this one inside the eager model too,
    so the eager model runs torch's kernels afterwards. For hierkern's kernels in a compiled model use
    ``torch.compile``.
    """

    # Which path the last forward took ("varlen" or "torch") and why not varlen: class defaults, so modules built,
    # adopted or unpickled without them read None.
    last_path: str | None = None
    last_why_not_fast_path: str | None = None

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def adopt(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """Turn a ``torch.nn.MultiheadAttention`` (exactly that class) into this class in place: the same
        module object, parameter objects and state, so optimisers holding its parameters keep working and
        nothing is re-initialised. Returns ``module``."""
        if type(module) is not nn.MultiheadAttention:
            raise TypeError(
                f"module must be a torch.nn.MultiheadAttention (not a subclass), got {type(module).__name__}"
            )
        module.__class__ = cls
        return module

    def __prepare_scriptable__(self) -> nn.MultiheadAttention:
        """What ``torch.jit.script`` compiles in this module's place: a ``torch.nn.MultiheadAttention``
        holding this module's parameter objects and ``out_proj``, in its train/eval mode. TorchScript
        cannot compile this ``forward`` (``hierkern.Segments`` arguments, planning in Python); torch's
        forward is its scriptable equivalent for every padded call."""
        plain = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device="meta",
        )
        for name, param in self.named_parameters(recurse=False):
            setattr(plain, name, param)
        plain.out_proj = self.out_proj
        return plain.train(self.training)

    # -- public API -----------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        segments: Segments | None = None,
        key_segments: Segments | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Attention of ``query`` over ``key``/``value``; torch's signature plus packed inputs.

        Args:
            query: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``), ``(L, E)`` unbatched, or packed
                ``(total_q, E)`` with ``segments``.
            key: ``(S, N, kdim)`` / ``(N, S, kdim)`` / ``(S, kdim)``, or packed ``(total_k, kdim)``.
            value: like ``key`` with ``vdim`` features.
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched), bool (True = ignore) or float (added to the
                scores; float32 or the query's dtype, as torch takes it).
            need_weights: also return the attention weights (always takes torch's path).
            attn_mask: bool (True = blocked) or float (added) mask, ``(L, S)`` or ``(N * num_heads, L, S)``.
            average_attn_weights: average the returned weights over heads.
            is_causal: torch's hint that ``attn_mask`` is the causal mask; without a ``key_padding_mask``
                and with ``need_weights=False`` causal masking is applied and ``attn_mask`` ignored, as in
                torch. With ``segments``: causal masking inside every segment (bottom-right aligned when a
                query segment and its key segment differ in length), no ``attn_mask`` needed.
            segments: ``hierkern.Segments`` over the packed ``query`` rows: self-attention inside every
                segment, output packed ``(total_q, E)``. Requires ``need_weights=False`` and no masks.
            key_segments: ``Segments`` over the packed ``key``/``value`` rows (cross-attention: query
                segment ``i`` attends to key segment ``i``); ``None`` means ``segments``.

        Returns:
            ``(attn_output, attn_weights)``: ``attn_output`` shaped like ``query`` with ``E`` features;
            ``attn_weights`` ``(N, L, S)`` (``(N, num_heads, L, S)`` unaveraged; no ``N`` unbatched), or
            ``None`` when ``need_weights=False``.
        """
        if segments is not None or key_segments is not None:
            return self._forward_packed(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, segments, key_segments
            )
        plan = self._plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        self.last_why_not_fast_path = plan.reason
        if plan.reason is not None:
            # torch gets the caller's masks untouched, so it picks its own paths (and warns) as it would.
            self.last_path = "torch"
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        self.last_path = "varlen"
        return self._forward_varlen(query, key, value, plan), None

    def why_not_fast_path(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        segments: Segments | None = None,
        key_segments: Segments | None = None,
    ) -> str | None:
        """Why ``forward`` with these arguments (in the current train/eval mode) would not run
        ``hierkern.varlen_attention``; ``None`` when it would. Raises what ``forward`` raises."""
        if segments is not None or key_segments is not None:
            self._check_packed(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, segments, key_segments
            )
            return self._static_reason()
        return self._plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, warn=False).reason

    # -- planning -------------------------------------------------------------------------------------

    def _dropout_p(self) -> float:
        return float(self.dropout) if self.training else 0.0

    def _static_reason(self) -> str | None:
        """Reasons that depend on the module alone."""
        if self.bias_k is not None:
            return "add_bias_kv=True appends a learned key/value that varlen attention does not model"
        if self.add_zero_attn:
            return "add_zero_attn=True appends a zero key/value that varlen attention does not model"
        if self._dropout_p() >= 1.0:
            return f"dropout={self.dropout} drops every attention weight (varlen_attention needs p < 1)"
        return None

    def _check_common(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
        for name, t, features in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.dim() == 0 or t.shape[-1] != features:
                raise ValueError(
                    f"{name} must have {features} features in its last dimension, got shape {tuple(t.shape)}"
                )
        weight = self.out_proj.weight
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != weight.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the module's parameters are {weight.dtype}")
            if t.device != weight.device:
                raise ValueError(f"{name} is on {t.device} but the module's parameters are on {weight.device}")

    def _plan(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, warn: bool = True) -> Plan:
        return plan_call(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, warn)

    # -- the varlen path ------------------------------------------------------------------------------

    def _project(self, q: Tensor, k: Tensor, v: Tensor, self_attention: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections of packed ``(total, features)`` rows, exactly as torch splits its weights."""
        e = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(q, self.q_proj_weight, b_q),
                F.linear(k, self.k_proj_weight, b_k),
                F.linear(v, self.v_proj_weight, b_v),
            )
        if self_attention:
            return F.linear(q, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, e)).unbind(-2)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        return F.linear(q, w_q, b_q), F.linear(k, w_k, b_k), F.linear(v, w_v, b_v)

    def _attend_packed(
        self, q: Tensor, k: Tensor, v: Tensor, seg_q: Segments, seg_k: Segments, causal: bool, self_attention: bool
    ) -> Tensor:
        """Packed ``(total_q, E)``/``(total_k, kdim|vdim)`` rows -> packed ``(total_q, E)`` output."""
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(q, k, v, self_attention)
        out = varlen_attention(
            q.reshape(-1, heads, head_dim),
            k.reshape(-1, heads, head_dim),
            v.reshape(-1, heads, head_dim),
            seg_q,
            seg_k,
            causal=causal,
            dropout_p=self._dropout_p(),
        )
        return F.linear(out.reshape(-1, self.embed_dim), self.out_proj.weight, self.out_proj.bias)

    def _forward_varlen(self, query: Tensor, key: Tensor, value: Tensor, plan: Plan) -> Tensor:
        batched = query.dim() == 3
        self_attention = query is key and key is value

        def batch_major(t: Tensor) -> Tensor:
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        def pack(t: Tensor, seg: Segments) -> Tensor:
            # Unpadded rows need no gather: every row is a whole segment.
            if seg.total == t.shape[0] * t.shape[1]:
                return t.reshape(seg.total, t.shape[-1])
            return seg.pack(t)

        tgt_len = query.shape[1 if (batched and self.batch_first) else 0]
        if plan.order is not None:
            return self._forward_sync_free(
                batch_major(query), batch_major(key), batch_major(value), plan, self_attention, key is value, batched
            )
        q = pack(batch_major(query), plan.seg_q)
        if self_attention:
            k = v = q
        else:
            k = pack(batch_major(key), plan.seg_k)
            v = k if key is value else pack(batch_major(value), plan.seg_k)
        out = self._attend_packed(q, k, v, plan.seg_q, plan.seg_k, plan.causal, self_attention)
        if plan.strip_queries and plan.seg_q.total != plan.seg_q.num_segments * tgt_len:
            out = plan.seg_q.unpack(out, tgt_len)
        else:
            out = out.view(plan.seg_q.num_segments, tgt_len, self.embed_dim)
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _forward_sync_free(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        plan: Plan,
        self_attention: bool,
        key_is_value: bool,
        batched: bool,
    ) -> Tensor:
        """The varlen path on batch-major ``(N, L, E)`` / ``(N, S, kdim|vdim)`` rows laid out by
        ``_sync_free_plan``: keys sorted valid-first by a device gather, no host read anywhere."""
        n, tgt_len = query.shape[0], query.shape[1]

        def valid_first(t: Tensor) -> Tensor:
            return t.gather(1, plan.order[:, :, None].expand(-1, -1, t.shape[-1])).flatten(0, 1)

        if self_attention:
            q = k = v = valid_first(query)
        else:
            q = query.reshape(n * tgt_len, query.shape[-1])
            k = valid_first(key)
            v = k if key_is_value else valid_first(value)
        out = self._attend_packed(q, k, v, plan.seg_q, plan.seg_k, plan.causal, self_attention)
        out = out.view(n, tgt_len, self.embed_dim)
        if plan.strip_queries:
            # The sort's inverse puts every query row back; padded rows become zeros, as on the packed path.
            inverse = torch.argsort(plan.order, dim=1)
            out = out.gather(1, inverse[:, :, None].expand(-1, -1, self.embed_dim))
            out = out.masked_fill(plan.pad[:, :, None], 0.0)
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    # -- packed inputs --------------------------------------------------------------------------------

    def _check_packed(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, segments, key_segments
    ) -> tuple[Segments, Segments]:
        if segments is None:
            raise ValueError("key_segments needs segments (the query segments) as well")
        for name, seg in (("segments", segments), ("key_segments", key_segments)):
            if seg is not None and not isinstance(seg, Segments):
                raise TypeError(f"{name} must be a hierkern.Segments, got {type(seg).__name__}")
        self._check_common(query, key, value)
        seg_k = segments if key_segments is None else key_segments
        for name, t, seg, seg_name in (
            ("query", query, segments, "segments"),
            ("key", key, seg_k, "key_segments"),
            ("value", value, seg_k, "key_segments"),
        ):
            if t.dim() != 2 or t.shape[0] != seg.total:
                raise ValueError(
                    f"with segments=, {name} must be packed ({seg_name}.total={seg.total}, "
                    f"features), got shape {tuple(t.shape)}"
                )
            if seg.device != t.device:
                raise ValueError(f"{seg_name} is on {seg.device} but {name} is on {t.device}")
        if seg_k.num_segments != segments.num_segments:
            raise ValueError(
                f"segments and key_segments must have the same number of segments, got "
                f"{segments.num_segments} and {seg_k.num_segments}"
            )
        if key_segments is None and not (query is key and key is value):
            raise ValueError(
                "segments= without key_segments= is self-attention: pass the same tensor as "
                "query, key and value, or give key_segments"
            )
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                "with segments=, key_padding_mask and attn_mask must be None (the segments "
                "already say which tokens attend to which)"
            )
        if need_weights:
            raise ValueError("with segments=, pass need_weights=False: packed calls do not return weights")
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        return segments, seg_k

    def _forward_packed(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, segments, key_segments
    ) -> tuple[Tensor, None]:
        seg_q, seg_k = self._check_packed(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, segments, key_segments
        )
        reason = self._static_reason()
        self.last_why_not_fast_path = reason
        self_attention = query is key and key is value and key_segments is None
        if reason is None:
            self.last_path = "varlen"
            return self._attend_packed(query, key, value, seg_q, seg_k, is_causal, self_attention), None
        self.last_path = "torch"
        return self._packed_torch_math(query, key, value, seg_q, seg_k, is_causal, self_attention), None

    def _packed_torch_math(
        self, query, key, value, seg_q: Segments, seg_k: Segments, causal: bool, self_attention: bool
    ) -> Tensor:
        """Packed call through torch's math (for ``add_bias_kv``/``add_zero_attn``): pad every segment,
        block the padded keys (and the causal upper triangle, bottom-right aligned) with ``attn_mask``,
        and keep the valid query rows. The appended bias/zero key stays visible to every query, as in
        torch."""
        if seg_q.total == 0:
            # torch's math cannot reshape an empty batch; there is no query to attend from.
            return query.new_zeros(0, self.embed_dim)
        len_q, len_k = max(seg_q.max_len, 1), max(seg_k.max_len, 1)
        lengths_q = seg_q.lengths.long()[:, None, None]
        lengths_k = seg_k.lengths.long()[:, None, None]
        pos_q = torch.arange(len_q, device=query.device)[None, :, None]
        pos_k = torch.arange(len_k, device=query.device)[None, None, :]
        blocked = pos_k >= lengths_k
        if causal:
            blocked = blocked | (pos_k > pos_q + lengths_k - lengths_q)
        blocked = blocked.expand(-1, len_q, -1).repeat_interleave(self.num_heads, dim=0)
        q = seg_q.unpack(query, len_q).transpose(0, 1)
        if self_attention:
            k = v = q  # torch fuses the q/k/v projection when the three are one tensor
        else:
            k = seg_k.unpack(key, len_k).transpose(0, 1)
            v = k if key is value else seg_k.unpack(value, len_k).transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            q,
            k,
            v,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            need_weights=False,
            attn_mask=blocked,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
        )
        return seg_q.pack(out.transpose(0, 1))
