"""Triton varlen attention, forward and backward, for many tiny segments and long ones.

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

Backward (no atomics, deterministic): ``dq`` programs own query rows and loop over key blocks (they also
write ``D = rowsum(dO * O)``); ``dk``/``dv`` programs own key rows, find each key's segment the same way and
loop over the query blocks that see them, summing the GQA group's query heads in registers. ``P`` is
recomputed from ``lse``; ``dS = P * (dP - D)``. For fp16/bf16, ``D = sum_j P_ij dP_ij`` is summed in float32
by a first pass of the dq programs over their keys, from the same ``P`` and ``dP`` as ``dS``: with near one-hot
rows ``dP - D`` is a small difference, and ``D`` from the output rounded to fp16/bf16 made the dq and dk errors
several times the reference backend's. That pass adds two dots per key block (``Q K^T`` and ``dO V^T``) and a
second read of the block's keys and values to the dq kernel: 5 dots per key block instead of 3. float32 keeps
``rowsum(dO * O)``, exact enough there.

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

Dropout uses Philox keyed by the seed with counters (query token, key position in its segment, head, offset),
so forward and backward regenerate the same mask without storing it.

Under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module is imported) the kernels run on CPU
tensors with numpy, with small tiles and operands upcast to float32 before ``tl.dot`` (the interpreter's
bfloat16 dot is wrong); the GPU path keeps half-precision operands.
"""

from __future__ import annotations

import torch

from ..backends import Backend, Capabilities, VarlenArgs, register_backend

__all__ = ["TritonBackend", "triton_varlen_fwd", "triton_varlen_bwd"]

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
    # long segments want big tiles. The autotuner picks per (head_dim, max_seqlen bucket, dtype, causal,
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
    AUTOTUNE_KEY = ["head_dim", "seqlen_bucket", "CAUSAL", "DROPOUT"]

# 32-bit registers per thread that a config's resident tiles may take (of 255): the rest is for addresses,
# masks and the compiler. tests/test_triton_aot.py checks that no kept config spills.
REGISTER_BUDGET = 128


def _resident_registers(kind: str, block_m: int, block_n: int, num_warps: int, block_d: int, elem_bytes: int,
                        dropout: bool) -> float:
    """Registers per thread held by a config's live tiles: fp32 accumulators, the operand tile that stays
    in registers (q for forward/dq, k and v for dk/dv) and the (BLOCK_M, BLOCK_N) score tiles."""
    score_tiles = 2 + (2 if dropout else 0)  # s and p; dropout adds the Philox counters and mask
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

        def need(c):
            return _resident_registers(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       kwargs["BLOCK_D"], elem_bytes, kwargs["DROPOUT"])
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
    def _rng_state(RngState, DROPOUT: tl.constexpr):
        """Philox seed and counter offset, read once per program."""
        if DROPOUT:
            seed = tl.load(RngState)
            offset = tl.load(RngState + 1).to(tl.int32)
        else:
            seed = 0
            offset = 0
        return seed, offset

    @triton.jit
    def _dropout_scale(seed, offset, head, query, key_pos, dropout_p):
        """Dropout's factor on (query token, key position within its segment), identical in forward and
        backward: 0 or 1 / (1 - p). A factor rather than a select, so that a dropped weight times an inf is
        NaN in dP as it is in the forward's P @ V."""
        rand, _, _, _ = tl.philox(seed, query, key_pos, query * 0 + head, query * 0 + offset)
        return tl.where(tl.uint_to_uniform_float(rand) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)

    @triton.jit
    def _visible_keys(cu_q, cu_k, num_segments, rows, row_ok, CAUSAL: tl.constexpr):
        """Per query row, the packed key range ``[k_lo, k_hi)`` it sees (empty for padding rows), and the
        block's key range ``[lo, hi)``: the union over its rows, empty (``lo >= hi``) when no row sees a key.

        Causal aligns bottom-right: query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees local
        key ``j`` iff ``j <= i + Lk - Lq``, i.e. packed key ``c < row + 1 + k_end - q_end``.
        """
        seg = _segment_of(cu_q, rows, num_segments)
        q_end = tl.load(cu_q + seg + 1)
        k_lo = tl.load(cu_k + seg)
        k_hi = tl.load(cu_k + seg + 1)
        if CAUSAL:
            k_hi = tl.minimum(k_hi, rows + 1 + k_hi - q_end)
        k_hi = tl.where(row_ok, k_hi, k_lo)
        has_keys = k_hi > k_lo
        lo = tl.min(tl.where(has_keys, k_lo, INT32_MAX_C), 0)
        hi = tl.max(tl.where(has_keys, k_hi, 0), 0)
        return k_lo, k_hi, lo, hi

    @triton.jit
    def _attn_fwd_loop(q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head, k_lo, k_hi, lo,
                       hi, dims, dim_ok, qk_scale, seed, rng_offset, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr,
                       PRECISION: tl.constexpr):
        """Online softmax of a query block over its keys ``[lo, hi)``: the row max ``m`` (base 2), the row sum
        ``l`` and the unnormalised output. ``CAREFUL``: ``P @ V`` as the module docstring says."""
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
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
                p *= _dropout_scale(seed, rng_offset, head, rows[:, None] + cols[None, :] * 0,
                                    cols[None, :] - k_lo[:, None], dropout_p)
            v = tl.load(V + cols64[:, None] * stride_vt + kv_head64 * stride_vh + dims[None, :], mask=kv_mask,
                        other=0.0)
            p = _to(p, v.dtype, INTERPRETER)
            if CAREFUL:
                acc = acc * alpha[:, None] + _mma(p, _finite(v), INTERPRETER, PRECISION)
                acc = _add_nonfinite_terms(acc, p, cols, start, tl.minimum(start + BLOCK_N, hi), k_lo, k_hi, V,
                                           stride_vt, kv_head64 * stride_vh, dims, dim_ok)
            else:
                acc = acc * alpha[:, None] + _mma(p, v, INTERPRETER, PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, Lse, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total_q, num_segments, group, head_dim, seqlen_bucket, qk_scale, dropout_p,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
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
        seed, rng_offset = _rng_state(RngState, DROPOUT)
        k_lo, k_hi, lo, hi = _visible_keys(CuQ, CuK, num_segments, rows, row_ok, CAUSAL)

        rows64 = rows.to(tl.int64)
        q = tl.load(Q + rows64[:, None] * stride_qt + head64 * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        # Every kernel guards a tile that sees nothing (lo >= hi) explicitly rather than trusting an empty range
        # and predication to leave its zeros alone.
        if lo < hi:
            m_i, l_i, acc = _attn_fwd_loop(
                q, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head, k_lo, k_hi, lo, hi,
                dims, dim_ok, qk_scale, seed, rng_offset, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT, CAREFUL,
                INTERPRETER, PRECISION)
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

    @triton.jit
    def _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, cols, hi, k_lo, k_hi,
                 rows, head, dims, dim_ok, qk_scale, seed, rng_offset, dropout_p, DROPOUT: tl.constexpr,
                 INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """One key block of a query block's backward: the keys, the visible (row, key) pairs, ``P`` (0 where
        not visible) and ``dP`` with dropout's factor (anything where not visible)."""
        cols64 = cols.to(tl.int64)
        kv_mask = (cols < hi)[:, None] & dim_ok[None, :]
        k = tl.load(K + cols64[:, None] * stride_kt + kv_head64 * stride_kh + dims[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + cols64[:, None] * stride_vt + kv_head64 * stride_vh + dims[None, :], mask=kv_mask,
                    other=0.0)
        s = _mma(q, tl.trans(k), INTERPRETER, PRECISION) * qk_scale
        visible = (cols[None, :] >= k_lo[:, None]) & (cols[None, :] < k_hi[:, None])
        # Rows without keys have lse = -inf but also no visible column: the select drops their inf.
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), INTERPRETER, PRECISION)
        if DROPOUT:
            dp *= _dropout_scale(seed, rng_offset, head, rows[:, None] + cols[None, :] * 0,
                                 cols[None, :] - k_lo[:, None], dropout_p)
        return k, visible, p, dp

    @triton.jit
    def _attn_bwd_dq_loop(q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                          head, k_lo, k_hi, lo, hi, dims, dim_ok, qk_scale, seed, rng_offset, dropout_p,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr,
                          PRECISION: tl.constexpr):
        """``dq / scale = dS @ K`` over the block's keys; ``CAREFUL``: ``dS @ K`` as the module docstring says."""
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k, visible, p, dp = _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh,
                                         cols, hi, k_lo, k_hi, rows, head, dims, dim_ok, qk_scale, seed,
                                         rng_offset, dropout_p, DROPOUT, INTERPRETER, PRECISION)
            ds = _to(tl.where(visible, p * (dp - delta[:, None]), 0.0), k.dtype, INTERPRETER)
            if CAREFUL:
                dq += _mma(ds, _finite(k), INTERPRETER, PRECISION)
                dq = _add_nonfinite_terms(dq, ds, cols, start, tl.minimum(start + BLOCK_N, hi), k_lo, k_hi, K,
                                          stride_kt, kv_head64 * stride_kh, dims, dim_ok)
            else:
                dq += _mma(ds, k, INTERPRETER, PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, Out, DOut, Lse, Delta, DQ, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        total_q, num_segments, group, head_dim, seqlen_bucket, qk_scale, softmax_scale, dropout_p,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    ):
        if CAREFUL:
            if tl.load(NonFinite) == 0:
                return
        head = tl.program_id(1)
        head64 = head.to(tl.int64)
        kv_head64 = (head // group).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < total_q
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        seed, rng_offset = _rng_state(RngState, DROPOUT)
        k_lo, k_hi, lo, hi = _visible_keys(CuQ, CuK, num_segments, rows, row_ok, CAUSAL)

        rows64 = rows.to(tl.int64)
        row_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + rows64[:, None] * stride_qt + head64 * stride_qh + dims[None, :], mask=row_mask,
                    other=0.0)
        do = tl.load(DOut + rows64[:, None] * stride_dot + head64 * stride_doh + dims[None, :], mask=row_mask,
                     other=0.0)
        lse2 = tl.load(Lse + head64 * total_q + rows, mask=row_ok, other=0.0) * LOG2E_C

        # D = rowsum(dO * O) = sum_j P_ij dP_ij, written for the dk/dv kernel, which runs next. dS = P * (dP - D)
        # is a small difference for near one-hot rows: an O rounded to fp16/bf16 would swamp it, so for those D
        # is summed in float32 from the very P and dP that dS uses, in a first pass over the keys. A float32 O
        # is as exact as a recomputed one (and that pass would double the 3xTF32 dots' register pressure).
        delta = tl.zeros((BLOCK_M,), tl.float32)
        if Out.dtype.element_ty == tl.float32:
            o = tl.load(Out + rows64[:, None] * stride_ot + head64 * stride_oh + dims[None, :], mask=row_mask,
                        other=0.0)
            delta = tl.sum(do * o, 1)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if lo < hi:
            if Out.dtype.element_ty != tl.float32:
                for start in range(lo, hi, BLOCK_N):
                    _, visible, p, dp = _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt,
                                                 stride_vh, start + tl.arange(0, BLOCK_N), hi, k_lo, k_hi, rows,
                                                 head, dims, dim_ok, qk_scale, seed, rng_offset, dropout_p, DROPOUT,
                                                 INTERPRETER, PRECISION)
                    delta += tl.sum(tl.where(visible, p * dp, 0.0), 1)
            dq = _attn_bwd_dq_loop(q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh,
                                   rows, head, k_lo, k_hi, lo, hi, dims, dim_ok, qk_scale, seed, rng_offset,
                                   dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT, CAREFUL, INTERPRETER, PRECISION)
            if not CAREFUL:
                _flag_nonfinite(NonFinite, tl.sum(dq, 1))
        tl.store(Delta + head64 * total_q + rows, delta, mask=row_ok)
        tl.store(DQ + rows64[:, None] * stride_dqt + head64 * stride_dqh + dims[None, :],
                 _to(dq * softmax_scale, DQ.dtype.element_ty, INTERPRETER), mask=row_mask)

    @triton.jit
    def _attn_bwd_dkdv_loop(k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, cols, kv_head,
                            k_start, q_lo, q_hi, lo, hi, total_q, group, dims, dim_ok, qk_scale, seed, rng_offset,
                            dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr,
                            PRECISION: tl.constexpr):
        """``dk / scale = dS^T @ Q`` and ``dv = P^T @ dO`` over the query blocks ``[lo, hi)`` of every query
        head of the group; ``CAREFUL``: both products as the module docstring says."""
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for g in range(0, group):
            head = kv_head * group + g
            head64 = head.to(tl.int64)
            for start in range(lo, hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < hi
                rows64 = rows.to(tl.int64)
                row_mask = row_ok[:, None] & dim_ok[None, :]
                q = tl.load(Q + rows64[:, None] * stride_qt + head64 * stride_qh + dims[None, :], mask=row_mask,
                            other=0.0)
                do = tl.load(DOut + rows64[:, None] * stride_dot + head64 * stride_doh + dims[None, :],
                             mask=row_mask, other=0.0)
                lse2 = tl.load(Lse + head64 * total_q + rows, mask=row_ok, other=0.0) * LOG2E_C
                delta = tl.load(Delta + head64 * total_q + rows, mask=row_ok, other=0.0)
                s_t = _mma(k, tl.trans(q), INTERPRETER, PRECISION) * qk_scale
                visible = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
                p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
                dp_t = _mma(v, tl.trans(do), INTERPRETER, PRECISION)
                if DROPOUT:
                    scale = _dropout_scale(seed, rng_offset, head, rows[None, :] + cols[:, None] * 0,
                                           cols[:, None] - k_start[:, None] + rows[None, :] * 0, dropout_p)
                    p_kept = p_t * scale
                    dp_t *= scale
                else:
                    p_kept = p_t
                p_kept = _to(p_kept, do.dtype, INTERPRETER)
                ds_t = _to(tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0), q.dtype, INTERPRETER)
                if CAREFUL:
                    rows_hi = tl.minimum(start + BLOCK_M, hi)
                    dv += _mma(p_kept, _finite(do), INTERPRETER, PRECISION)
                    dv = _add_nonfinite_terms(dv, p_kept, rows, start, rows_hi, q_lo, q_hi, DOut, stride_dot,
                                              head64 * stride_doh, dims, dim_ok)
                    dk += _mma(ds_t, _finite(q), INTERPRETER, PRECISION)
                    dk = _add_nonfinite_terms(dk, ds_t, rows, start, rows_hi, q_lo, q_hi, Q, stride_qt,
                                              head64 * stride_qh, dims, dim_ok)
                else:
                    dv += _mma(p_kept, do, INTERPRETER, PRECISION)
                    dk += _mma(ds_t, q, INTERPRETER, PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total_q, total_k, num_segments, group, head_dim, seqlen_bucket, qk_scale, softmax_scale, dropout_p,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    ):
        if CAREFUL:
            if tl.load(NonFinite) == 0:
                return
        kv_head = tl.program_id(1)
        kv_head64 = kv_head.to(tl.int64)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < total_k
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        seed, rng_offset = _rng_state(RngState, DROPOUT)
        seg = _segment_of(CuK, cols, num_segments)
        k_start = tl.load(CuK + seg)
        q_lo = tl.load(CuQ + seg)
        q_hi = tl.load(CuQ + seg + 1)
        if CAUSAL:
            # The transpose of _visible_keys: key c is seen by rows r >= c - k_end + q_end.
            q_lo = tl.maximum(q_lo, cols - tl.load(CuK + seg + 1) + q_hi)
        q_lo = tl.where(col_ok, q_lo, q_hi)
        seen = q_hi > q_lo
        lo = tl.min(tl.where(seen, q_lo, INT32_MAX_C), 0)
        hi = tl.max(tl.where(seen, q_hi, 0), 0)

        cols64 = cols.to(tl.int64)
        col_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + cols64[:, None] * stride_kt + kv_head64 * stride_kh + dims[None, :], mask=col_mask,
                    other=0.0)
        v = tl.load(V + cols64[:, None] * stride_vt + kv_head64 * stride_vh + dims[None, :], mask=col_mask,
                    other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        if lo < hi:
            dk, dv = _attn_bwd_dkdv_loop(k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh,
                                         cols, kv_head, k_start, q_lo, q_hi, lo, hi, total_q, group, dims, dim_ok,
                                         qk_scale, seed, rng_offset, dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT,
                                         CAREFUL, INTERPRETER, PRECISION)
            if not CAREFUL:
                _flag_nonfinite(NonFinite, tl.sum(dk, 1) + tl.sum(dv, 1))
        tl.store(DK + cols64[:, None] * stride_dkt + kv_head64 * stride_dkh + dims[None, :],
                 _to(dk * softmax_scale, DK.dtype.element_ty, INTERPRETER), mask=col_mask)
        tl.store(DV + cols64[:, None] * stride_dvt + kv_head64 * stride_dvh + dims[None, :],
                 _to(dv, DV.dtype.element_ty, INTERPRETER), mask=col_mask)

    def _autotuned(kind: str, kernel, configs):
        if INTERPRET:
            configs = INTERPRET_CONFIGS
        return triton.autotune(configs=configs, key=AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_by_registers(kind)})(kernel)

    _attn_fwd = _autotuned("fwd", _attn_fwd_kernel, FWD_CONFIGS)
    _attn_bwd_dq = _autotuned("bwd_dq", _attn_bwd_dq_kernel, BWD_DQ_CONFIGS)
    _attn_bwd_dkdv = _autotuned("bwd_dkdv", _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS)


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


def _constexprs(head_dim: int, causal: bool, dropout: bool, dtype: torch.dtype) -> dict:
    return dict(BLOCK_D=_block_d(head_dim), CAUSAL=causal, DROPOUT=dropout, **_compile_flags(dtype))


# The three argument builders are the launches' whole interface to the kernels: the launchers call them, and
# tests/test_triton_aot.py compiles from them with the JIT's own specialisation of their values. Each returns
# the positional arguments and the constexprs other than the autotuned config's and CAREFUL (see _run).

def _fwd_args(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, dropout_p,
              rng_state, nonfinite) -> tuple[tuple, dict]:
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse, nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            q.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_q), softmax_scale * LOG2E, dropout_p)
    return args, _constexprs(q.shape[2], causal, dropout_p > 0.0, q.dtype)


def _bwd_dq_args(dout, q, k, v, out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale,
                 causal, dropout_p, rng_state, nonfinite) -> tuple[tuple, dict]:
    """The dq kernel also writes ``delta`` ``(H, total_q)`` float32 for the dk/dv kernel."""
    args = (q, k, v, out, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse,
            nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            q.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_q), softmax_scale * LOG2E, softmax_scale, dropout_p)
    return args, _constexprs(q.shape[2], causal, dropout_p > 0.0, q.dtype)


def _bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale,
                   causal, dropout_p, rng_state, nonfinite) -> tuple[tuple, dict]:
    args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse,
            nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            q.shape[0], k.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_k), softmax_scale * LOG2E, softmax_scale, dropout_p)
    return args, _constexprs(q.shape[2], causal, dropout_p > 0.0, q.dtype)


def _run(kernel, grid, args: tuple, constexprs: dict) -> None:
    """The fast pass, then the careful one, whose programs return at once unless a fast program flagged a NaN
    or an inf (the flag, ``nonfinite``, is zeroed by the launcher). Both passes share the autotuner's key, so the
    careful pass runs the config the fast one was tuned to and gives clean rows the same bits."""
    torch.library.wrap_triton(kernel)[grid](*args, **constexprs, CAREFUL=False)
    torch.library.wrap_triton(kernel)[grid](*args, **constexprs, CAREFUL=True)


def _launch_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                dropout_p, rng_state, out=None, lse=None):
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
                                     causal, dropout_p, rng_state, nonfinite))
    return out, lse


def _launch_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                dropout_p, rng_state, grads=None):
    """Run the dq kernel (which also writes D) then the dk/dv kernel.

    Arguments as ``triton_varlen_bwd``; ``grads`` may give the ``(dq, dk, dv)`` buffers (tests pass NaN-filled
    ones), else they are allocated.

    Returns:
        ``(dq, dk, dv)``, every element written by the kernels.
    """
    dout, q, k, v, out = (_inner_stride(t) for t in (dout, q, k, v, out))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, num_heads, _ = q.shape
    total_k, num_kv_heads, _ = k.shape
    dq, dk, dv = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)) if grads is None else grads
    if total_q == 0 or total_k == 0:
        # No query sees a key: every gradient is exactly zero and the kernels would have nothing to loop over.
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = q.new_empty((num_heads, total_q), dtype=torch.float32)

    def grid_q(meta):
        return (triton.cdiv(total_q, meta["BLOCK_M"]), num_heads)

    def grid_k(meta):
        return (triton.cdiv(total_k, meta["BLOCK_N"]), num_kv_heads)

    # One flag for both kernels: a NaN or an inf met by dq's fast pass also sends dk/dv through their careful
    # pass, which costs only in that rare case.
    nonfinite = torch.zeros((), dtype=torch.int32, device=q.device)
    _run(_attn_bwd_dq, grid_q, *_bwd_dq_args(dout, q, k, v, out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, softmax_scale, causal, dropout_p, rng_state, nonfinite))
    _run(_attn_bwd_dkdv, grid_k, *_bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_k, softmax_scale, causal, dropout_p, rng_state,
                                                 nonfinite))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Custom ops: torch.library.triton_op (torch.compile traces into the kernels), fakes, autograd
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.triton_op("hierkern::triton_varlen_fwd", mutates_args=())
    def triton_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, dropout_p: float,
                          rng_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused varlen attention forward (inputs validated by ``hierkern.varlen_attention``).

        Args:
            q: ``(total_q, H, D)`` float16/bfloat16/float32, ``D <= 128``.
            k, v: ``(total_k, H_kv, D)``, ``H % H_kv == 0``.
            cu_seqlens_q, cu_seqlens_k: int32 ``(S + 1,)`` offsets on q's device.
            max_seqlen_q, max_seqlen_k: longest segments (host ints; they only pick autotune buckets).
            softmax_scale: multiplies ``q @ k^T``.
            causal: bottom-right aligned causal mask.
            dropout_p: probability of dropping an attention weight.
            rng_state: int64 ``(2,)`` ``[seed, offset]`` on q's device when ``dropout_p > 0``.

        Returns:
            ``out`` ``(total_q, H, D)`` in q's dtype and ``lse`` ``(H, total_q)`` float32.
        """
        return _launch_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           causal, dropout_p, rng_state)

    @triton_varlen_fwd.register_fake
    def _triton_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, causal, dropout_p, rng_state):
        total_q, num_heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((num_heads, total_q), dtype=torch.float32)

    @torch.library.triton_op("hierkern::triton_varlen_bwd", mutates_args=())
    def triton_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, dropout_p: float,
                          rng_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of ``triton_varlen_fwd``; ``P`` is recomputed from ``q``, ``k`` and ``lse``.

        Args:
            dout: ``(total_q, H, D)`` gradient of ``out``.
            q, k, v, out, lse: the forward's inputs and outputs (``out`` is read for float32 only).
            Other arguments as ``triton_varlen_fwd`` (the same ``rng_state`` regenerates the dropout mask).

        Returns:
            ``dq`` ``(total_q, H, D)``, ``dk`` and ``dv`` ``(total_k, H_kv, D)``, in the inputs' dtype.
        """
        return _launch_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, causal, dropout_p, rng_state)

    @triton_varlen_bwd.register_fake
    def _triton_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, softmax_scale, causal, dropout_p, rng_state):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "double backward (differentiating the gradients of varlen_attention, e.g. after "
            "torch.autograd.grad(..., create_graph=True)) is not supported by the triton backend; use "
            "backend='reference' for it")

    # An explicit formula, so that a second differentiation says what is missing instead of torch's generic
    # "no autograd formula" (and can never silently return zeros).
    triton_varlen_bwd.register_autograd(_no_double_backward)

    def _setup_context(ctx, inputs, output):
        (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p,
         rng_state) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
        ctx.params = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p)
        # lse is a by-product for callers (and the backward), not a differentiable output.
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p = ctx.params
        dq, dk, dv = torch.ops.hierkern.triton_varlen_bwd(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            causal, dropout_p, rng_state)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    triton_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


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
        dtypes=SUPPORTED_DTYPES, max_head_dim=MAX_HEAD_DIM, windows=("none", "causal"),
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
        return torch.ops.hierkern.triton_varlen_fwd(args.q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k,
                                                    args.max_seqlen_q, args.max_seqlen_k, args.softmax_scale,
                                                    args.window_size == (-1, 0), args.dropout_p, args.rng_state)


register_backend(TritonBackend())
