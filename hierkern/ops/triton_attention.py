"""Triton varlen attention for many tiny segments and long ones: the kernel family's design, the shared device
helpers, the forward kernel and op, and the backend. The backward kernels and op are
:mod:`hierkern.ops.triton_attention_bwd` (split off to keep each file readable).

Work split. Every kernel tiles the packed token axis into blocks of consecutive rows and finds each row's
segment on the device (a binary search over ``cu_seqlens`` inside the kernel: no host sync, no scratch that
grows with the number of segments). A block of ``BLOCK_M`` query rows then attends to the union of its rows'
key ranges, masked per row to the row's own segment (block-diagonal inside the tile), looping over that union
in ``BLOCK_N`` key blocks, flash-style. So

* a block of 5-character words holds ~25 whole words and touches ~BLOCK_M keys: one or two key blocks;
* a long segment is cut into query blocks that run in parallel programs, each looping over its keys: long
  segments never serialise on one program, and the grid (``cdiv(total, BLOCK)`` x heads) comes from host ints.

Why row blocks rather than tiles that own whole segments (the first design's lead): once each row finds its own
segment, every row belongs to exactly one program in every kernel, which is all that an atomic-free,
deterministic forward and backward need; it also caps every program at BLOCK_M rows whatever the lengths (a
tile owning the segments that start in it holds up to 2 * BLOCK_M - 1 rows) and lets a long segment's query
blocks run as ordinary programs instead of a second program class with its own schedule. The price: a segment
cut by a block boundary has its keys read by both blocks (at most one extra partial key block per program),
and the backward reads q, k, v and dO in two passes where a whole-segment tile could fuse dq, dk and dv for
short segments in one. That fusion is the next optimisation to measure on a GPU.

Windows (FlashAttention's ``window_size``, bottom-right aligned): row ``i`` of a segment with ``Lq`` queries and
``Lk`` keys sees the contiguous keys ``[i + Lk - Lq - window_left, i + Lk - Lq + window_right]`` of its segment,
a negative bound being none (causal is ``(-1, 0)``). Each row's range replaces the segment's as the mask, so a
window changes no loop but its bounds. Whether each side is bounded is a constexpr (the full and causal kernels
compile without the bound they lack, as under the former ``CAUSAL`` flag); the bounds are runtime ints. The
hull of a block's ranges can have gaps when the block spans segments (``_any_overlap``): such blocks, and only
they, run a loop that skips the key (or query) blocks in the gaps, so that a single-segment block's loop keeps no
branch that would stop pipelining (dk/dv only under two-sided windows; causal dk/dv visits its rare gaps masked,
as before).

Non-finite values. A NaN or an inf in ``q`` or ``k`` reaches only its own row or column of the scores, which
the visibility select drops for the rows that do not see it, and ``dO V^T`` likewise. The four products that
sum over a masked axis (``P V``, ``dS K``, ``P^T dO``, ``dS^T Q``) would multiply a masked weight of 0 by an inf
into a NaN in rows that never saw the token. Every kernel therefore runs twice per call: a fast pass, the plain
kernel plus one check of its output tile's row sums that sets a flag if it holds a NaN or an inf (a leak
always leaves one), then a careful pass whose programs return at once unless the flag is set. When it is, the
careful pass recomputes every tile, feeding those four dots finite values and adding each non-finite value's
IEEE contribution (``w * x``: inf for a weight > 0, NaN for a weight of 0, then IEEE's sums) for the rows that
see its token only; rows that do not see it get the fast pass's bits. A separate launch rather than a branch
in the loop: the careful code would raise the fast kernels' registers by up to ~90 (occupancy) though it almost
never runs. The price on clean inputs is a memset of the flag, a row-sum reduction per program and one extra
launch per kernel whose programs each read one int.

Head offsets (``head * stride_h``, ``head * total_q`` into ``lse`` and ``D``) are int64, like token offsets: in a
head-major view ``head * stride_h`` reaches heads x tokens x head_dim, past 2^31 while token offsets are small.

Dropout draws the project's one Philox layout (csrc/common/philox.h, hierkern/philox.py): Philox4x32-10 with
counter (query token, key token, head, offset_lo), both tokens packed indices, and key (seed_lo, seed_hi ^
offset_hi); a weight is kept iff the first word is >= floor(float32(p) * 2^32). So forward and backward
regenerate the same mask without storing it, and every backend drops the same weights for the same
``rng_state``.

Under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module is imported) the kernels run on CPU
tensors with numpy, with small tiles and operands upcast to float32 before ``tl.dot`` (the interpreter's
bfloat16 dot is wrong); the GPU path keeps half-precision operands.
"""

from __future__ import annotations

import torch

from ..backends import Backend, Capabilities, VarlenArgs, register_backend

__all__ = ["TritonBackend", "triton_varlen_fwd"]

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the backend registers as unavailable below
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = None

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1

if triton is not None:
    INTERPRET = bool(triton.knobs.runtime.interpret)
    LOG2E_C = tl.constexpr(LOG2E)
    INT32_MAX_C = tl.constexpr(_INT32_MAX)

    # (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward and dq kernels tile queries by BLOCK_M and loop
    # over keys by BLOCK_N; the dk/dv kernel tiles keys by BLOCK_N and loops over queries by BLOCK_M.
    # Word-length segments want small key blocks (the union of a query block's key ranges is ~BLOCK_M keys);
    # long segments want big tiles. The autotuner picks per (head_dim, max_seqlen bucket, dtype, window bounds,
    # dropout) among the configs that _prune_by_registers keeps.
    FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ]
    BWD_DQ_CONFIGS = FWD_CONFIGS
    BWD_DKDV_CONFIGS = [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    ]
    # The interpreter costs ~3 ms per loop iteration per program whatever the tile, and tests use layouts
    # built around 16-token tiles, so one small config exercises every multi-block path cheaply.
    INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # The autotuner adds every tensor argument's dtype to the key.
    AUTOTUNE_KEY = ["head_dim", "seqlen_bucket", "LEFT", "RIGHT", "DROPOUT"]

# 32-bit registers per thread that a config's resident tiles may take (of 255): the rest is for addresses,
# masks and the compiler. tests/test_triton_aot.py checks that no kept config spills.
REGISTER_BUDGET = 128


def _gap_loop(kind: str, left: bool, right: bool) -> bool:
    """Whether a kernel also holds the loop that skips the gaps between its blocks' ranges (``_any_overlap``):
    the forward and dq kernels under a left bound; the dk/dv kernel under both bounds only (see its kernel)."""
    return left and (right or kind != "bwd_dkdv")


def _resident_registers(kind: str, block_m: int, block_n: int, num_warps: int, block_d: int, elem_bytes: int,
                        dropout: bool, gap_loop: bool = False) -> float:
    """Registers per thread held by a config's live tiles: fp32 accumulators, the operand tile that stays
    in registers (q for forward/dq, k and v for dk/dv) and the (BLOCK_M, BLOCK_N) score tiles."""
    score_tiles = 2 + (2 if dropout else 0)  # s and p; dropout adds the Philox counters and mask
    if gap_loop and kind == "bwd_dkdv":
        # Measured (tests/test_triton_aot.py): the dk/dv kernel's second loop holds about one more score tile
        # (255 registers and spills for 64-key blocks at 8 warps with dropout, against 224 with one loop).
        score_tiles += 1
    if elem_bytes == 4:
        elem_bytes = 8  # 3xTF32 keeps a high and a low tf32 part of every float32 operand
    if kind == "bwd_dkdv":
        resident = block_n * block_d * (2 * 4 + 2 * elem_bytes) / 4
    else:
        resident = block_m * block_d * (4 + elem_bytes) / 4
    return (resident + block_m * block_n * score_tiles) / (32 * num_warps)


def _prune_by_registers(kind: str):
    """Autotune pruning: drop configs whose live tiles would spill; keep the smallest if none fits."""
    def prune(configs, named_args, **kwargs):
        elem_bytes = named_args["Q"].element_size()
        gap_loop = _gap_loop(kind, kwargs.get("LEFT", False), kwargs.get("RIGHT", False))

        def need(c):
            return _resident_registers(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       kwargs["BLOCK_D"], elem_bytes, kwargs["DROPOUT"], gap_loop)
        fits = [c for c in configs if need(c) <= REGISTER_BUDGET]
        return fits or [min(configs, key=need)]
    return prune


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key for segment length: the next power of two, capped where tiling stops changing."""
    return min(1 << max(int(max_seqlen) - 1, 0).bit_length(), 4096)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _segment_of(cu_seqlens, idx, num_segments):
        """Segment of each token in ``idx``: the largest ``s < S`` with ``cu_seqlens[s] <= idx``.

        Binary lifting over the offsets (cached in L1/L2 across a block), so zero-length segments are skipped
        and no per-token segment-id array is ever materialised.
        """
        step = tl.full((), 1, tl.int32)
        while step * 2 <= num_segments:
            step = step * 2
        seg = tl.zeros_like(idx)
        while step > 0:
            cand = seg + step
            ok = cand < num_segments
            start = tl.load(cu_seqlens + cand, mask=ok, other=0)
            seg = tl.where(ok & (start <= idx), cand, seg)
            step = step // 2
        return seg

    @triton.jit
    def _mma(a, b, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """``a @ b`` accumulated in float32; the interpreter gets float32 operands (its bf16 dot is wrong)."""
        if INTERPRETER:
            res = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            res = tl.dot(a, b, input_precision=PRECISION)
        return res

    @triton.jit
    def _to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """Round float32 ``x`` to ``dtype`` to nearest even.

        The GPU does this in one instruction; the interpreter truncates to bfloat16, so there the rounding
        is done on the bits first (the truncation that follows is then exact).
        """
        if dtype == tl.float32:
            res = x
        elif INTERPRETER and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            res = bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            res = x.to(dtype)
        return res

    @triton.jit
    def _flag_nonfinite(NonFinite, row_sums):
        """Set the launch's flag (every writer writes 1) when a tile's row sums show a NaN or an inf: one in a row
        makes its sum non-finite, and a finite sum that overflows costs only a needless careful pass. Row sums
        rather than the tile: a smaller reduction, and ptxas spilled for the whole-tile one."""
        if tl.max(tl.where(tl.abs(row_sums) < float("inf"), 0, 1)) != 0:
            tl.store(NonFinite, 1)

    @triton.jit
    def _finite(x):
        """``x`` with its NaNs and infinities replaced by 0."""
        return tl.where(tl.abs(x) < float("inf"), x, 0.0)

    @triton.jit
    def _add_nonfinite_terms(acc, w, w_tokens, lo, hi, sees_lo, sees_hi, B, stride_bt, b_head_offset, dims,
                             dim_ok):
        """``acc += w @ b`` for the terms that a dot fed with ``_finite(b)`` left out, as IEEE has them.

        ``w`` (rows x the tokens ``w_tokens``) holds the weights the dot used and ``b`` is ``B``'s rows for tokens
        ``[lo, hi)``. For each token whose row of ``b`` holds a NaN or an inf, the rows that see the token
        (``sees_lo <= token < sees_hi``) get ``w[:, token] * b[token, :]`` in its non-finite columns: +-inf for a
        positive weight, NaN for a zero one (a dropped or underflowed probability), and then inf - inf or NaN
        plus anything as IEEE adds them. Every other row keeps exactly what the dot gave it. A token at a time:
        this runs only in the careful pass, and holds no tile beyond ``acc`` and ``w``.
        """
        for token in range(lo, hi):
            b = tl.load(B + tl.cast(token, tl.int64) * stride_bt + b_head_offset + dims, mask=dim_ok,
                        other=0.0).to(tl.float32)
            bad = ~(tl.abs(b) < float("inf"))
            if tl.max(tl.where(bad, 1, 0)) != 0:
                w_token = tl.sum(tl.where(w_tokens[None, :] == token, w.to(tl.float32), 0.0), 1)
                sees = (token >= sees_lo) & (token < sees_hi)
                acc += tl.where(sees[:, None] & bad[None, :], w_token[:, None] * b[None, :], 0.0)
        return acc

    @triton.jit
    def _rng_state(RngState, dropout_p, DROPOUT: tl.constexpr):
        """csrc/common/philox.h's dropout layout from ``rng_state = [seed, offset]``, once per program: the
        64-bit Philox key ``(seed_lo, seed_hi ^ offset_hi)`` as tl.philox splits its seed (low word first),
        the counter word ``offset_lo`` and the keep threshold ``floor(float32(p) * 2^32)``, clamped to
        0xFFFFFFFF (dropout_threshold; ``dropout_p`` arrives as float32 and the product is exact in float64)."""
        if DROPOUT:
            seed = tl.load(RngState)
            offset = tl.load(RngState + 1)
            key = seed ^ ((offset >> 32) << 32)
            ctr = (offset & 0xFFFFFFFF).to(tl.uint32)
            # tl.cast: the interpreter passes dropout_p as a Python float. The clamp's bound must be a float64
            # constant: a literal would be float32, which rounds 2^32 - 1 up to 2^32.
            scaled = tl.minimum(tl.cast(dropout_p, tl.float64) * 4294967296.0,
                                tl.full((), 4294967295.0, tl.float64))
            threshold = scaled.to(tl.uint32)
        else:
            key = 0
            ctr = 0
            threshold = 0
        return key, ctr, threshold

    @triton.jit
    def _dropout_scale(rng_key, rng_ctr, rng_threshold, head, queries, keys, dropout_p):
        """Dropout's factor on (query token, key token), both packed indices, identical in forward and backward
        and to the cpu and cuda kernels': Philox4x32-10 on counter (query, key, head, offset_lo), kept iff the
        first word (uint32) >= the threshold. 0 or 1 / (1 - p): a factor rather than a select, so that a
        dropped weight times an inf is NaN in dP as it is in the forward's P @ V."""
        zeros = queries * 0
        rand, _, _, _ = tl.philox(rng_key, queries, keys, zeros + head, zeros.to(tl.uint32) + rng_ctr)
        return tl.where(rand >= rng_threshold, 1.0 / (1.0 - dropout_p), 0.0)

    @triton.jit
    def _visible_keys(cu_q, cu_k, num_segments, rows, row_ok, window_left, window_right, LEFT: tl.constexpr,
                      RIGHT: tl.constexpr):
        """Per query row, the packed key range ``[k_lo, k_hi)`` it sees (``k_lo == k_hi`` when none: padding rows,
        keyless segments, a window past the segment's keys), and the block's key range ``[lo, hi)``: the hull
        of its rows' ranges, empty (``lo >= hi``) when no row sees a key.

        The window aligns bottom-right: query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees local
        key ``j`` iff ``i + Lk - Lq - window_left <= j <= i + Lk - Lq + window_right``, a bound applying only
        when its side is bounded (``LEFT`` / ``RIGHT``). In packed indices the row's diagonal key is
        ``row + k_end - q_end``; int64, since the window ints reach 2^31 - 2. Also returns each row's segment.
        """
        seg = _segment_of(cu_q, rows, num_segments)
        q_end = tl.load(cu_q + seg + 1)
        k_lo = tl.load(cu_k + seg)
        k_hi = tl.load(cu_k + seg + 1)
        diag = rows.to(tl.int64) + k_hi - q_end
        if RIGHT:
            k_hi = tl.minimum(k_hi, diag + window_right + 1).to(tl.int32)
        if LEFT:
            k_lo = tl.maximum(k_lo, diag - window_left).to(tl.int32)
        k_hi = tl.where(row_ok, tl.maximum(k_hi, k_lo), k_lo)
        has_keys = k_hi > k_lo
        lo = tl.min(tl.where(has_keys, k_lo, INT32_MAX_C), 0)
        hi = tl.max(tl.where(has_keys, k_hi, 0), 0)
        return k_lo, k_hi, lo, hi, seg

    @triton.jit
    def _any_overlap(lo, hi, start, BLOCK: tl.constexpr):
        """Whether any of the (possibly empty) ranges ``[lo, hi)`` meets ``[start, start + BLOCK)``. The hull of a
        block's ranges can have gaps when they come from several segments: under a left bound for rows (a short
        query segment sees only the last of many keys), under a right bound for keys (a short key segment is
        seen only by the last of many queries). Blocks of several segments then run a loop copy that skips the
        blocks in the gaps (the forward and dq under a left bound, dk/dv under two bounds: see that kernel).
        Else each segment's ranges start at its first key (or end at its last row), the hull has no gaps, and
        the loops go without this test, whose branch would stop software pipelining."""
        return tl.max(tl.where((lo < start + BLOCK) & (hi > start) & (hi > lo), 1, 0)) != 0

    @triton.jit
    def _attn_fwd_step(m_i, l_i, acc, start, q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                       head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                       BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, CAREFUL: tl.constexpr,
                       INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """The online softmax's update by the key block at ``start``."""
        cols = start + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)
        kv_mask = (cols < hi)[:, None] & dim_ok[None, :]
        k = tl.load(K + cols64[:, None] * stride_kt + kv_head64 * stride_kh + dims[None, :], mask=kv_mask,
                    other=0.0)
        s = _mma(q, tl.trans(k), INTERPRETER, PRECISION) * qk_scale
        visible = (cols[None, :] >= k_lo[:, None]) & (cols[None, :] < k_hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shifting by 0 instead keeps exp2 free of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p *= _dropout_scale(rng_key, rng_ctr, rng_threshold, head, rows[:, None] + cols[None, :] * 0,
                                cols[None, :] + rows[:, None] * 0, dropout_p)
        v = tl.load(V + cols64[:, None] * stride_vt + kv_head64 * stride_vh + dims[None, :], mask=kv_mask,
                    other=0.0)
        p = _to(p, v.dtype, INTERPRETER)
        if CAREFUL:
            acc = acc * alpha[:, None] + _mma(p, _finite(v), INTERPRETER, PRECISION)
            acc = _add_nonfinite_terms(acc, p, cols, start, tl.minimum(start + BLOCK_N, hi), k_lo, k_hi, V,
                                       stride_vt, kv_head64 * stride_vh, dims, dim_ok)
        else:
            acc = acc * alpha[:, None] + _mma(p, v, INTERPRETER, PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _attn_fwd_loop(q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head, k_lo, k_hi, lo,
                       hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, SKIP_GAPS: tl.constexpr,
                       INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax of a query block over its keys ``[lo, hi)``: the row max ``m`` (base 2), the row sum
        ``l`` and the unnormalised output. ``CAREFUL``: ``P @ V`` as the module docstring says. ``SKIP_GAPS``:
        key blocks that no row's range meets are skipped (see ``_any_overlap``)."""
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            if SKIP_GAPS:
                if _any_overlap(k_lo, k_hi, start, BLOCK_N):
                    m_i, l_i, acc = _attn_fwd_step(
                        m_i, l_i, acc, start, q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                        head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                        BLOCK_N, DROPOUT, CAREFUL, INTERPRETER, PRECISION)
            else:
                m_i, l_i, acc = _attn_fwd_step(
                    m_i, l_i, acc, start, q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                    head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                    BLOCK_N, DROPOUT, CAREFUL, INTERPRETER, PRECISION)
        return m_i, l_i, acc

    @triton.jit(do_not_specialize=["window_left", "window_right"])
    def _attn_fwd_kernel(
        Q, K, V, Out, Lse, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total_q, num_segments, group, head_dim, seqlen_bucket, qk_scale, dropout_p, window_left, window_right,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LEFT: tl.constexpr,
        RIGHT: tl.constexpr,
        DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    ):
        if CAREFUL:
            if tl.load(NonFinite) == 0:
                return
        head = tl.program_id(1)
        # Head offsets in int64, like token offsets: head * stride_h alone passes 2^31 in a head-major view.
        head64 = head.to(tl.int64)
        kv_head64 = (head // group).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < total_q
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        rng_key, rng_ctr, rng_threshold = _rng_state(RngState, dropout_p, DROPOUT)
        k_lo, k_hi, lo, hi, seg = _visible_keys(CuQ, CuK, num_segments, rows, row_ok, window_left, window_right,
                                                LEFT, RIGHT)

        rows64 = rows.to(tl.int64)
        q = tl.load(Q + rows64[:, None] * stride_qt + head64 * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        # Every kernel guards a tile that sees nothing (lo >= hi) explicitly rather than trusting an empty range
        # and predication to leave its zeros alone.
        if lo < hi:
            # Only rows of several segments under a left bound can leave gaps to skip (_any_overlap); a separate
            # loop for them keeps the test (a branch that stops software pipelining) out of every other loop.
            if LEFT:
                several = tl.min(seg) != tl.max(seg)
            else:
                several: tl.constexpr = False
            if several:
                m_i, l_i, acc = _attn_fwd_loop(
                    q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head, k_lo, k_hi, lo, hi,
                    dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                    DROPOUT, CAREFUL, True, INTERPRETER, PRECISION)
            else:
                m_i, l_i, acc = _attn_fwd_loop(
                    q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head, k_lo, k_hi, lo, hi,
                    dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D,
                    DROPOUT, CAREFUL, False, INTERPRETER, PRECISION)
            if not CAREFUL:
                _flag_nonfinite(NonFinite, tl.sum(acc, 1))

        # Rows with keys divide even when l = 0 (every visible score -inf: 0/0 = NaN, as IEEE has it); rows
        # without keys are zeros and -inf by selection.
        has_keys = k_hi > k_lo
        l_i = tl.where(has_keys, l_i, 1.0)
        out = tl.where(has_keys[:, None], acc / l_i[:, None], 0.0)
        lse = tl.where(has_keys, (m_i + tl.log2(l_i)) / LOG2E_C, float("-inf"))
        tl.store(Out + rows64[:, None] * stride_ot + head64 * stride_oh + dims[None, :],
                 _to(out, Out.dtype.element_ty, INTERPRETER), mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(Lse + head64 * total_q + rows, lse, mask=row_ok)

    def _autotuned(kind: str, kernel, configs):
        if INTERPRET:
            configs = INTERPRET_CONFIGS
        return triton.autotune(configs=configs, key=AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_by_registers(kind)})(kernel)

    _attn_fwd = _autotuned("fwd", _attn_fwd_kernel, FWD_CONFIGS)


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------

def _inner_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index ``(tokens, heads)`` by stride but read the head dimension contiguously."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _compile_flags(dtype: torch.dtype) -> dict:
    """Constexprs fixed by the call rather than tuned: interpreter workarounds and float32 precision.

    float32 uses tf32 tensor cores only when torch allows it; otherwise 3xTF32 (float32-accurate, still on
    tensor cores: an "ieee" FMA dot spills at every useful tile size). The interpreter computes in float32.
    """
    if INTERPRET:
        precision = "ieee"
    elif torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "tf32x3"
    return {"INTERPRETER": INTERPRET, "PRECISION": precision}


def _block_d(head_dim: int) -> int:
    """Head dims are padded inside the kernel to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def _window(window_left: int, window_right: int) -> tuple[int, int]:
    """The window as the kernels take it: -1 for a side without a bound, a negative bound or one past any int32
    key count (which bounds nothing) included, so that both ints are int32 for the JIT's signature."""
    return tuple(w if 0 <= w < _INT32_MAX else -1 for w in (window_left, window_right))


def _constexprs(head_dim: int, window_left: int, window_right: int, dropout: bool, dtype: torch.dtype) -> dict:
    """``LEFT`` / ``RIGHT``: whether a side of the window is bounded. Constexprs, so that the full and causal
    kernels ((-1, -1) and (-1, 0)) compile without the bound they lack, as they did with a ``CAUSAL`` flag, and
    only a left bound (forward, dq) or a right bound (dk/dv) adds the loops that skip gaps. The bounds
    themselves are runtime ints (not specialised: see the kernels' ``do_not_specialize``), so that every
    window size of a kind shares one compiled kernel."""
    return dict(BLOCK_D=_block_d(head_dim), LEFT=window_left >= 0, RIGHT=window_right >= 0, DROPOUT=dropout,
                **_compile_flags(dtype))


# The argument builders (this one, _bwd_dq_args and _bwd_dkdv_args in triton_attention_bwd) are the launches'
# whole interface to the kernels: the launchers call them, and tests/test_triton_aot.py compiles from them
# with the JIT's own specialisation of their values. Each returns the positional arguments and the constexprs
# other than the autotuned config's and CAREFUL (see _run).

def _fwd_args(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, window_left, window_right,
              dropout_p, rng_state, nonfinite) -> tuple[tuple, dict]:
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse, nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            q.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_q), softmax_scale * LOG2E, dropout_p, *_window(window_left, window_right))
    return args, _constexprs(q.shape[2], *_window(window_left, window_right), dropout_p > 0.0, q.dtype)


def _run(kernel, grid, args: tuple, constexprs: dict) -> None:
    """The fast pass, then the careful one, whose programs return at once unless a fast program flagged a NaN
    or an inf (the flag, ``nonfinite``, is zeroed by the launcher). Both passes share the autotuner's key, so the
    careful pass runs the config the fast one was tuned to and gives clean rows the same bits."""
    torch.library.wrap_triton(kernel)[grid](*args, **constexprs, CAREFUL=False)
    torch.library.wrap_triton(kernel)[grid](*args, **constexprs, CAREFUL=True)


def _launch_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                window_right, dropout_p, rng_state, out=None, lse=None):
    """Run the forward kernel. Arguments as ``triton_varlen_fwd``; ``out`` ``(total_q, H, D)`` and ``lse``
    ``(H, total_q)`` float32 may be given (tests pass NaN-filled ones), else they are allocated.

    Returns:
        ``(out, lse)``, every element written by the kernel.
    """
    q, k, v = _inner_stride(q), _inner_stride(k), _inner_stride(v)
    # The kernels read offsets with unit stride; any stride is valid input (a copy of S + 1 ints, no sync).
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, num_heads, head_dim = q.shape
    out = q.new_empty((total_q, num_heads, head_dim)) if out is None else out
    lse = q.new_empty((num_heads, total_q), dtype=torch.float32) if lse is None else lse
    if total_q == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(total_q, meta["BLOCK_M"]), num_heads)

    nonfinite = torch.zeros((), dtype=torch.int32, device=q.device)
    _run(_attn_fwd, grid, *_fwd_args(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale,
                                     window_left, window_right, dropout_p, rng_state, nonfinite))
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Custom op: torch.library.triton_op (torch.compile traces into the kernels); its fake and autograd are
# registered with the backward op's (triton_attention_bwd, through hierkern.ops.registration)
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.triton_op("hierkern::triton_varlen_fwd", mutates_args=())
    def triton_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, window_left: int, window_right: int, dropout_p: float,
                          rng_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused varlen attention forward (inputs validated by ``hierkern.varlen_attention``).

        Args:
            q: ``(total_q, H, D)`` float16/bfloat16/float32, ``D <= 128``.
            k, v: ``(total_k, H_kv, D)``, ``H % H_kv == 0``.
            cu_seqlens_q, cu_seqlens_k: int32 ``(S + 1,)`` offsets on q's device.
            max_seqlen_q, max_seqlen_k: longest segments (host ints; they only pick autotune buckets).
            softmax_scale: multiplies ``q @ k^T``.
            window_left, window_right: the keys each query sees, as FlashAttention's ``window_size``: query ``i``
                of a segment with ``Lq`` queries and ``Lk`` keys sees key ``j`` iff ``i + Lk - Lq - window_left
                <= j <= i + Lk - Lq + window_right``, a negative bound being none: causal is ``(-1, 0)``, full
                attention ``(-1, -1)``. A row that sees no key gives zeros and ``lse = -inf``.
            dropout_p: probability of dropping an attention weight.
            rng_state: int64 ``(2,)`` ``[seed, offset]`` on q's device when ``dropout_p > 0``.

        Returns:
            ``out`` ``(total_q, H, D)`` in q's dtype and ``lse`` ``(H, total_q)`` float32.
        """
        return _launch_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           window_left, window_right, dropout_p, rng_state)


# ---------------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------------

class TritonBackend(Backend):
    """The Triton kernels as a ``hierkern`` backend: CUDA tensors (and CPU tensors under the interpreter).

    ``"auto"`` picks it for CUDA calls only: on CPU tensors it runs in Triton's numpy interpreter, which is
    for tests, so it must be named explicitly there.
    """

    name = "triton"
    priority = 20
    capabilities = Capabilities(
        devices=("cuda", "cpu") if triton is not None and INTERPRET else ("cuda",),
        dtypes=SUPPORTED_DTYPES, max_head_dim=MAX_HEAD_DIM,
        min_cuda_capability=(8, 0),  # bfloat16 tensor cores
        auto_devices=("cuda",),
        device_notes={"cpu": "the Triton kernels run CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 "
                             "set before importing hierkern)"},
        # Drawn on the device: no host sync, and safe to capture in a CUDA graph.
        rng_on_device=True)

    def unavailable_reason(self) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not INTERPRET and not torch.cuda.is_available():
            return ("no CUDA device is visible and TRITON_INTERPRET=1 was not set before importing hierkern, "
                    "so the Triton kernels cannot run here")
        return None

    def __call__(self, args: VarlenArgs):
        return torch.ops.hierkern.triton_varlen_fwd(*args.op_args())


register_backend(TritonBackend())
