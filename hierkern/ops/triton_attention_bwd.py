"""Triton varlen attention backward: the dq and dk/dv kernels, their launcher and the ``triton_varlen_bwd`` op.

The kernel family's design (row blocks, windows, non-finite passes, dropout) is
:mod:`hierkern.ops.triton_attention`'s docstring; this module holds its backward half, whose helpers, configs
and launch plumbing it imports from there. Importing it (``hierkern.ops`` does) registers
``hierkern::triton_varlen_bwd`` and, through :mod:`hierkern.ops.registration`, the fakes and autograd of the
pair (the forward op's backward calls this op).

Backward (no atomics, deterministic): ``dq`` programs own query rows and loop over key blocks (they also
write ``D = rowsum(dO * O)``); ``dk``/``dv`` programs own key rows, find each key's segment the same way and
loop over the query blocks that see them, summing the GQA group's query heads in registers. ``P`` is
recomputed from ``lse``; ``dS = P * (dP - D)``. For fp16/bf16, ``D = sum_j P_ij dP_ij`` is summed in float32
by a first pass of the dq programs over their keys, from the same ``P`` and ``dP`` as ``dS``: with near one-hot
rows ``dP - D`` is a small difference, and ``D`` from the output rounded to fp16/bf16 made the dq and dk errors
several times the reference backend's. That pass adds two dots per key block (``Q K^T`` and ``dO V^T``) and a
second read of the block's keys and values to the dq kernel: 5 dots per key block instead of 3. float32 keeps
``rowsum(dO * O)``, exact enough there.
"""

from __future__ import annotations

import torch

from .registration import register_varlen_ops
from .triton_attention import LOG2E, _constexprs, _inner_stride, _run, _seqlen_bucket, _window, triton

__all__ = ["triton_varlen_bwd"]

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from .triton_attention import (
        BWD_DKDV_CONFIGS,
        BWD_DQ_CONFIGS,
        INT32_MAX_C,
        LOG2E_C,
        _add_nonfinite_terms,
        _any_overlap,
        _autotuned,
        _dropout_scale,
        _finite,
        _flag_nonfinite,
        _mma,
        _rng_state,
        _segment_of,
        _to,
        _visible_keys,
    )

    @triton.jit
    def _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, cols, hi, k_lo, k_hi,
                 rows, head, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, DROPOUT: tl.constexpr,
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
            dp *= _dropout_scale(rng_key, rng_ctr, rng_threshold, head, rows[:, None] + cols[None, :] * 0,
                                 cols[None, :] + rows[:, None] * 0, dropout_p)
        return k, visible, p, dp

    @triton.jit
    def _dq_step(dq, start, q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                 head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                 BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, INTERPRETER: tl.constexpr,
                 PRECISION: tl.constexpr):
        """``dq += dS @ K`` for the key block at ``start``."""
        cols = start + tl.arange(0, BLOCK_N)
        k, visible, p, dp = _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, cols,
                                     hi, k_lo, k_hi, rows, head, dims, dim_ok, qk_scale, rng_key, rng_ctr,
                                     rng_threshold, dropout_p, DROPOUT, INTERPRETER, PRECISION)
        ds = _to(tl.where(visible, p * (dp - delta[:, None]), 0.0), k.dtype, INTERPRETER)
        if CAREFUL:
            dq += _mma(ds, _finite(k), INTERPRETER, PRECISION)
            dq = _add_nonfinite_terms(dq, ds, cols, start, tl.minimum(start + BLOCK_N, hi), k_lo, k_hi, K,
                                      stride_kt, kv_head64 * stride_kh, dims, dim_ok)
        else:
            dq += _mma(ds, k, INTERPRETER, PRECISION)
        return dq

    @triton.jit
    def _delta_step(start, q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head,
                    k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p,
                    BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, INTERPRETER: tl.constexpr,
                    PRECISION: tl.constexpr):
        """The key block at ``start``'s share of ``D = sum_j P_ij dP_ij``."""
        _, visible, p, dp = _dq_tile(q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh,
                                     start + tl.arange(0, BLOCK_N), hi, k_lo, k_hi, rows, head, dims, dim_ok,
                                     qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, DROPOUT, INTERPRETER,
                                     PRECISION)
        return tl.sum(tl.where(visible, p * dp, 0.0), 1)

    @triton.jit
    def _attn_bwd_dq_loop(q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows,
                          head, k_lo, k_hi, lo, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold,
                          dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DROPOUT: tl.constexpr, CAREFUL: tl.constexpr, DELTA_PASS: tl.constexpr,
                          SKIP_GAPS: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """``D`` (``DELTA_PASS``: summed over the block's keys, else ``delta`` as given) and ``dq / scale = dS @ K``
        over the block's keys; ``CAREFUL``: ``dS @ K`` as the module docstring says; ``SKIP_GAPS`` as in
        ``_attn_fwd_loop``."""
        if DELTA_PASS:
            for start in range(lo, hi, BLOCK_N):
                if SKIP_GAPS:
                    if _any_overlap(k_lo, k_hi, start, BLOCK_N):
                        delta += _delta_step(start, q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt,
                                             stride_vh, rows, head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key,
                                             rng_ctr, rng_threshold, dropout_p, BLOCK_N, DROPOUT, INTERPRETER,
                                             PRECISION)
                else:
                    delta += _delta_step(start, q, do, lse2, K, V, kv_head64, stride_kt, stride_kh, stride_vt,
                                         stride_vh, rows, head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key,
                                         rng_ctr, rng_threshold, dropout_p, BLOCK_N, DROPOUT, INTERPRETER,
                                         PRECISION)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            if SKIP_GAPS:
                if _any_overlap(k_lo, k_hi, start, BLOCK_N):
                    dq = _dq_step(dq, start, q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt,
                                  stride_vh, rows, head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr,
                                  rng_threshold, dropout_p, BLOCK_N, DROPOUT, CAREFUL, INTERPRETER, PRECISION)
            else:
                dq = _dq_step(dq, start, q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt,
                              stride_vh, rows, head, k_lo, k_hi, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr,
                              rng_threshold, dropout_p, BLOCK_N, DROPOUT, CAREFUL, INTERPRETER, PRECISION)
        return delta, dq

    @triton.jit(do_not_specialize=["window_left", "window_right"])
    def _attn_bwd_dq_kernel(
        Q, K, V, Out, DOut, Lse, Delta, DQ, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        total_q, num_segments, group, head_dim, seqlen_bucket, qk_scale, softmax_scale, dropout_p, window_left,
        window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LEFT: tl.constexpr,
        RIGHT: tl.constexpr,
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
        rng_key, rng_ctr, rng_threshold = _rng_state(RngState, dropout_p, DROPOUT)
        k_lo, k_hi, lo, hi, seg = _visible_keys(CuQ, CuK, num_segments, rows, row_ok, window_left, window_right,
                                                LEFT, RIGHT)

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
            # As in the forward: a left bound leaves gaps only in blocks of several segments.
            if LEFT:
                several = tl.min(seg) != tl.max(seg)
            else:
                several: tl.constexpr = False
            if several:
                delta, dq = _attn_bwd_dq_loop(
                    q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head,
                    k_lo, k_hi, lo, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M,
                    BLOCK_N, BLOCK_D, DROPOUT, CAREFUL, Out.dtype.element_ty != tl.float32, True, INTERPRETER,
                    PRECISION)
            else:
                delta, dq = _attn_bwd_dq_loop(
                    q, do, lse2, delta, K, V, kv_head64, stride_kt, stride_kh, stride_vt, stride_vh, rows, head,
                    k_lo, k_hi, lo, hi, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M,
                    BLOCK_N, BLOCK_D, DROPOUT, CAREFUL, Out.dtype.element_ty != tl.float32, False, INTERPRETER,
                    PRECISION)
            if not CAREFUL:
                _flag_nonfinite(NonFinite, tl.sum(dq, 1))
        tl.store(Delta + head64 * total_q + rows, delta, mask=row_ok)
        tl.store(DQ + rows64[:, None] * stride_dqt + head64 * stride_dqh + dims[None, :],
                 _to(dq * softmax_scale, DQ.dtype.element_ty, INTERPRETER), mask=row_mask)

    @triton.jit
    def _dkdv_step(dk, dv, start, k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, cols,
                   head, q_lo, q_hi, hi, total_q, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold,
                   dropout_p, BLOCK_M: tl.constexpr, DROPOUT: tl.constexpr, CAREFUL: tl.constexpr,
                   INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """``dk += dS^T @ Q`` and ``dv += P^T @ dO`` for query head ``head``'s query block at ``start``."""
        head64 = head.to(tl.int64)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        row_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + rows64[:, None] * stride_qt + head64 * stride_qh + dims[None, :], mask=row_mask, other=0.0)
        do = tl.load(DOut + rows64[:, None] * stride_dot + head64 * stride_doh + dims[None, :], mask=row_mask,
                     other=0.0)
        lse2 = tl.load(Lse + head64 * total_q + rows, mask=row_ok, other=0.0) * LOG2E_C
        delta = tl.load(Delta + head64 * total_q + rows, mask=row_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), INTERPRETER, PRECISION) * qk_scale
        visible = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = _mma(v, tl.trans(do), INTERPRETER, PRECISION)
        if DROPOUT:
            scale = _dropout_scale(rng_key, rng_ctr, rng_threshold, head, rows[None, :] + cols[:, None] * 0,
                                   cols[:, None] + rows[None, :] * 0, dropout_p)
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
            dk = _add_nonfinite_terms(dk, ds_t, rows, start, rows_hi, q_lo, q_hi, Q, stride_qt, head64 * stride_qh,
                                      dims, dim_ok)
        else:
            dv += _mma(p_kept, do, INTERPRETER, PRECISION)
            dk += _mma(ds_t, q, INTERPRETER, PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_loop(k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, cols, kv_head,
                            q_lo, q_hi, lo, hi, total_q, group, dims, dim_ok, qk_scale, rng_key, rng_ctr,
                            rng_threshold, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, CAREFUL: tl.constexpr,
                            SKIP_GAPS: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
        """``dk / scale = dS^T @ Q`` and ``dv = P^T @ dO`` over the query blocks ``[lo, hi)`` of every query
        head of the group; ``CAREFUL``: both products as the module docstring says; ``SKIP_GAPS``: query blocks
        that see none of the block's keys are skipped."""
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for g in range(0, group):
            head = kv_head * group + g
            for start in range(lo, hi, BLOCK_M):
                if SKIP_GAPS:
                    if _any_overlap(q_lo, q_hi, start, BLOCK_M):
                        dk, dv = _dkdv_step(dk, dv, start, k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh,
                                            stride_dot, stride_doh, cols, head, q_lo, q_hi, hi, total_q, dims,
                                            dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M,
                                            DROPOUT, CAREFUL, INTERPRETER, PRECISION)
                else:
                    dk, dv = _dkdv_step(dk, dv, start, k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot,
                                        stride_doh, cols, head, q_lo, q_hi, hi, total_q, dims, dim_ok, qk_scale,
                                        rng_key, rng_ctr, rng_threshold, dropout_p, BLOCK_M, DROPOUT, CAREFUL,
                                        INTERPRETER, PRECISION)
        return dk, dv

    @triton.jit(do_not_specialize=["window_left", "window_right"])
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, RngState, NonFinite,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total_q, total_k, num_segments, group, head_dim, seqlen_bucket, qk_scale, softmax_scale, dropout_p,
        window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        LEFT: tl.constexpr, RIGHT: tl.constexpr,
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
        rng_key, rng_ctr, rng_threshold = _rng_state(RngState, dropout_p, DROPOUT)
        # The transpose of _visible_keys: row r sees key c iff c - window_right <= r + k_end - q_end <=
        # c + window_left, so key c is seen by the rows [anti - window_right, anti + window_left] of its
        # segment, anti = c - k_end + q_end being the row whose diagonal it is.
        seg = _segment_of(CuK, cols, num_segments)
        q_lo = tl.load(CuQ + seg)
        q_hi = tl.load(CuQ + seg + 1)
        anti = cols.to(tl.int64) - tl.load(CuK + seg + 1) + q_hi
        if RIGHT:
            q_lo = tl.maximum(q_lo, anti - window_right).to(tl.int32)
        if LEFT:
            q_hi = tl.minimum(q_hi, anti + window_left + 1).to(tl.int32)
        q_lo = tl.where(col_ok, tl.minimum(q_lo, q_hi), q_hi)
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
            # The transpose of the forward's gaps: under a right bound, the rows that see the keys of several
            # segments can leave gaps (a query segment longer than its keys plus the bound sees its first keys
            # from late rows). Skipped under two-sided windows only: a second loop copy costs causal dk/dv with
            # dropout its spill-free 8-warp config (_resident_registers), and causal blocks have gaps only
            # across segments with more queries than keys, which they visit masked as they always have.
            if LEFT and RIGHT:
                several = tl.min(seg) != tl.max(seg)
            else:
                several: tl.constexpr = False
            if several:
                dk, dv = _attn_bwd_dkdv_loop(
                    k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, cols, kv_head, q_lo,
                    q_hi, lo, hi, total_q, group, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold,
                    dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT, CAREFUL, True, INTERPRETER, PRECISION)
            else:
                dk, dv = _attn_bwd_dkdv_loop(
                    k, v, Q, DOut, Lse, Delta, stride_qt, stride_qh, stride_dot, stride_doh, cols, kv_head, q_lo,
                    q_hi, lo, hi, total_q, group, dims, dim_ok, qk_scale, rng_key, rng_ctr, rng_threshold,
                    dropout_p, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT, CAREFUL, False, INTERPRETER, PRECISION)
            if not CAREFUL:
                _flag_nonfinite(NonFinite, tl.sum(dk, 1) + tl.sum(dv, 1))
        tl.store(DK + cols64[:, None] * stride_dkt + kv_head64 * stride_dkh + dims[None, :],
                 _to(dk * softmax_scale, DK.dtype.element_ty, INTERPRETER), mask=col_mask)
        tl.store(DV + cols64[:, None] * stride_dvt + kv_head64 * stride_dvh + dims[None, :],
                 _to(dv, DV.dtype.element_ty, INTERPRETER), mask=col_mask)

    _attn_bwd_dq = _autotuned("bwd_dq", _attn_bwd_dq_kernel, BWD_DQ_CONFIGS)
    _attn_bwd_dkdv = _autotuned("bwd_dkdv", _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS)


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------

# As triton_attention._fwd_args: the launcher's whole interface to the kernels (tests/test_triton_aot.py).

def _bwd_dq_args(dout, q, k, v, out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale,
                 window_left, window_right, dropout_p, rng_state, nonfinite) -> tuple[tuple, dict]:
    """The dq kernel also writes ``delta`` ``(H, total_q)`` float32 for the dk/dv kernel."""
    args = (q, k, v, out, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse,
            nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            q.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_q), softmax_scale * LOG2E, softmax_scale, dropout_p,
            *_window(window_left, window_right))
    return args, _constexprs(q.shape[2], *_window(window_left, window_right), dropout_p > 0.0, q.dtype)


def _bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale,
                   window_left, window_right, dropout_p, rng_state, nonfinite) -> tuple[tuple, dict]:
    args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, rng_state if dropout_p > 0.0 else lse,
            nonfinite,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            q.shape[0], k.shape[0], cu_seqlens_q.shape[0] - 1, q.shape[1] // k.shape[1], q.shape[2],
            _seqlen_bucket(max_seqlen_k), softmax_scale * LOG2E, softmax_scale, dropout_p,
            *_window(window_left, window_right))
    return args, _constexprs(q.shape[2], *_window(window_left, window_right), dropout_p > 0.0, q.dtype)


def _launch_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                window_left, window_right, dropout_p, rng_state, grads=None):
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
                                             max_seqlen_q, softmax_scale, window_left, window_right, dropout_p,
                                             rng_state, nonfinite))
    _run(_attn_bwd_dkdv, grid_k, *_bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_k, softmax_scale, window_left, window_right, dropout_p,
                                                 rng_state, nonfinite))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Custom op: torch.library.triton_op; the pair's fakes and autograd
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.triton_op("hierkern::triton_varlen_bwd", mutates_args=())
    def triton_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, window_left: int, window_right: int, dropout_p: float,
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
                           softmax_scale, window_left, window_right, dropout_p, rng_state)

    # Fakes and autograd of the pair, as every compiled backend's (a backward that calls this op, which
    # refuses a second differentiation in words).
    register_varlen_ops("hierkern::triton_varlen_fwd", "hierkern::triton_varlen_bwd", "triton")
