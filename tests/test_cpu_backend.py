"""The fused C++ CPU kernel (``backend="cpu"``, ``torch.ops.hierkern.varlen_fwd/varlen_bwd``).

Forward against the float64 loop oracle, gradients against float64 reference autograd, on every adversarial
layout; low precision is bounded relative to the reference's own error in that dtype (docs/design.md, Testing).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern.backends import AttentionCall, get_backend, select_backend
from hierkern.reference import varlen_attention_reference

from cuda_oracles import dense_attention, keep_mask
from helpers import Layout, adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err

CPU = get_backend("cpu")
needs_kernel = pytest.mark.skipif(
    CPU.unavailable_reason() is not None, reason=f"CPU kernel unavailable: {CPU.unavailable_reason()}"
)

LAYOUTS = adversarial_layouts() + [
    Layout("long-500+", (3, 517, 0, 2, 640)),
    Layout("long-cross", (600, 1, 4), (520, 7, 0)),
    # Either side of the kernel's path thresholds (csrc/cpu: forward lanes below 32 keys, blocked backward
    # from 16), self and cross, with causal rows that see no key (lq > lk).
    Layout("cpu-path-boundaries", (7, 8, 9, 15, 16, 17, 31, 32, 33)),
    Layout("cpu-path-boundaries-cross", (40, 31, 3, 17), (31, 33, 8, 15)),
]
# (heads, kv heads, head dim): MHA and GQA on unrolled head dims, MQA with an odd head dim (generic path).
MHA, GQA, MQA = (4, 4, 32), (4, 2, 64), (3, 1, 7)
# Every head layout in float32; each other dtype on the layouts that stress it, to keep the suite quick (forward
# and gradients alike).
CASES = [
    (torch.float32, MHA),
    (torch.float32, GQA),
    (torch.float32, MQA),
    (torch.float64, GQA),
    (torch.bfloat16, MHA),
    (torch.bfloat16, MQA),
    (torch.float16, GQA),
]


def _case_id(case):
    dtype, (heads, kv_heads, head_dim) = case
    return f"{str(dtype).split('.')[1]}-h{heads}-kv{kv_heads}-d{head_dim}"


LOW_PRECISION = (torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _one_thread():
    """The oracles run thousands of tiny torch ops; with an OpenMP team on a busy 2-core machine each op waits
    for a descheduled thread (~250x slower). The kernel's split across threads is checked on its own, by
    test_results_independent_of_thread_count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _window(causal):
    """The ops' (window_left, window_right) for varlen_attention's causal flag."""
    return (-1, 0) if causal else (-1, -1)


def _call(q, k, v, layout, causal, **kw):
    return hierkern.varlen_attention(
        q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys), causal=causal, backend="cpu", **kw
    )


def _grad_err(x, ref):
    """Relative error with a floor: gradients that are exactly zero in theory (a length-1 segment's dq) are
    rounding noise in every implementation, so they are measured against unit scale instead."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / max(ref.norm().item(), 0.1 * math.sqrt(ref.numel()) or 1.0)).item()


def test_backend_registered_and_available():
    assert CPU.priority > get_backend("reference").priority
    assert CPU.device_types == ("cpu",)
    assert CPU.unavailable_reason() is None, "build the extension: pip install --no-build-isolation -e ."


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_forward_matches_oracle(layout, causal, case):
    dtype, heads = case
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    out, lse = _call(q, k, v, layout, causal, return_lse=True)
    ref_out, ref_lse = oracle_attention(q, k, v, cu_q, cu_k, causal=causal)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (num_heads, q.shape[0])
    assert not out.isnan().any()
    # Rows with no visible key: zero output and lse = -inf, exactly where the oracle has them.
    no_keys = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), no_keys)
    assert not out.transpose(0, 1)[no_keys].any()
    torch.testing.assert_close(lse[~no_keys].double(), ref_lse[~no_keys], atol=2e-5, rtol=1e-5)

    err = rel_err(out, ref_out)
    if dtype in LOW_PRECISION:
        ref_own, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
        assert err <= 2 * rel_err(ref_own, ref_out) + torch.finfo(dtype).eps
    else:
        assert err <= TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_gradients_match_reference(layout, causal, case):
    dtype, heads = case
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out = _call(q, k, v, layout, causal)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))

    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = varlen_attention_reference(*exact, cu_q, cu_k, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, exact, dout, allow_unused=True, materialize_grads=True)
    if dtype in LOW_PRECISION:
        own = [t.detach().requires_grad_() for t in (q, k, v)]
        own_out, _ = varlen_attention_reference(*own, cu_q, cu_k, causal=causal)
        own_grads = torch.autograd.grad(own_out, own, dout.to(dtype), allow_unused=True, materialize_grads=True)
    for i, name in enumerate("qkv"):
        assert grads[i].dtype == dtype and grads[i].shape == (q, k, v)[i].shape
        err = _grad_err(grads[i], ref_grads[i])
        if dtype in LOW_PRECISION:
            bound = 3 * _grad_err(own_grads[i], ref_grads[i]) + torch.finfo(dtype).eps
        else:
            bound = 10 * TOL[dtype]
        assert err <= bound, f"d{name}: error {err:.3g} > {bound:.3g}"


@needs_kernel
@pytest.mark.parametrize("head_dim", [32, 40], ids=["fast-paths", "generic-path"])
def test_every_output_element_is_written(head_dim):
    """The ops allocate with torch.empty; deterministic mode makes torch.empty fill with NaN, so any element
    the kernel skips stays NaN (finite inputs can produce no other NaN)."""
    layout = Layout("mixed", (0, 1, 5, 0, 70, 3, 0, 20), (2, 0, 5, 4, 66, 3, 0, 17))
    g = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(layout, 4, 2, head_dim, generator=g)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    dout = torch.randn(q.shape, generator=g)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.empty(q.shape).isnan().all()  # the poisoning this test relies on is active
        for causal in (False, True):
            out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, 70, 66, 0.3, *_window(causal), 0.0, None)
            dq, dk, dv = torch.ops.hierkern.varlen_bwd(
                dout, q, k, v, out, lse, cu_q, cu_k, 70, 66, 0.3, *_window(causal), 0.0, None
            )
            for t in (out, dq, dk, dv):
                assert not t.isnan().any()
            assert not lse.isnan().any()
    finally:
        torch.use_deterministic_algorithms(old)


@needs_kernel
def test_results_independent_of_thread_count():
    """Work is split by cost, so a split can fall between the kv heads of one segment; every split must
    give bit-identical results (no atomics, each dk/dv row has one writer)."""
    layout = adversarial_layouts()[2]  # one long segment among tiny ones
    g = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(layout, 6, 3, 32, generator=g, requires_grad=True)
    dout = torch.randn(q.shape, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = _call(q, k, v, layout, causal=True)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernel
def test_strided_inputs():
    """Views of a fused qkv projection (row stride 3*H*D) and a non-unit head_dim stride both work."""
    layout = adversarial_layouts()[7]
    total = sum(layout.lengths_q)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(total, 3, 4, 32, generator=g)
    q, k, v = qkv.unbind(1)
    out = _call(q, k, v, layout, causal=False)
    ref, _ = oracle_attention(q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys))
    assert rel_err(out, ref) <= TOL[torch.float32]
    qt = torch.randn(total, 32, 4, generator=g).transpose(1, 2)  # stride(2) == 4
    out = _call(qt, k, v, layout, causal=True)
    ref, _ = oracle_attention(qt, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys), causal=True)
    assert rel_err(out, ref) <= TOL[torch.float32]


@needs_kernel
def test_offsets_of_any_stride():
    """Offsets are valid input whatever their stride (a view of every other entry of a longer tensor): both ops
    give what they give for the same offsets made contiguous."""
    cu = torch.tensor([0, 0, 3, 3, 8, 8, 9, 9, 9, 9, 13, 13], dtype=torch.int32)[::2]
    cu_k = torch.tensor([0, 0, 2, 2, 9, 9, 9, 9, 11, 11, 11, 11], dtype=torch.int32)[::2]
    assert not cu.is_contiguous() and not cu_k.is_contiguous()
    g = torch.Generator().manual_seed(12)
    q = torch.randn(13, 4, 32, generator=g)
    k, v = torch.randn(11, 2, 32, generator=g), torch.randn(11, 2, 32, generator=g)
    dout = torch.randn(q.shape, generator=g)
    for causal in (False, True):
        args = (5, 7, 0.3, *_window(causal), 0.0, None)
        out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu, cu_k, *args)
        want_out, want_lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu.contiguous(), cu_k.contiguous(), *args)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        ref, _ = oracle_attention(q, k, v, cu.contiguous(), cu_k.contiguous(), softmax_scale=0.3, causal=causal)
        assert rel_err(out, ref) <= TOL[torch.float32]
        grads = torch.ops.hierkern.varlen_bwd(dout, q, k, v, out, lse, cu, cu_k, *args)
        want = torch.ops.hierkern.varlen_bwd(dout, q, k, v, out, lse, cu.contiguous(), cu_k.contiguous(), *args)
        for a, b in zip(grads, want):
            assert torch.equal(a, b)


def _visible_ranges(lq, lk, window):
    """The keys [lo, hi) each query row of a segment sees under window (window_left, window_right)."""
    left, right = window
    ranges = []
    for i in range(lq):
        diag = i + lk - lq
        hi = lk if right < 0 else max(0, min(lk, diag + right + 1))
        lo = 0 if left < 0 else max(0, min(lk, diag - left))
        ranges.append((min(lo, hi), hi))
    return ranges


def _interacting(layout, window, tensor, segment, index):
    """The query rows and keys whose outputs and gradients a value at (segment, index) of `tensor` can reach:
    a query row (q, dout) reaches itself and the keys it sees; a key (k, v) reaches the rows that see it, and
    through their softmax every key those rows see. Returns bool masks over query and key tokens."""
    cu_q, cu_k = offsets_of(layout.lengths_q).tolist(), offsets_of(layout.keys).tolist()
    lq, lk = layout.lengths_q[segment], layout.keys[segment]
    seen = _visible_ranges(lq, lk, window)
    rows = [index] if tensor in ("q", "dout") else [i for i in range(lq) if seen[i][0] <= index < seen[i][1]]
    assert rows and any(seen[i][1] > seen[i][0] for i in rows), "a poison that reaches nothing tests nothing"
    row_mask = torch.zeros(cu_q[-1], dtype=torch.bool)
    key_mask = torch.zeros(cu_k[-1], dtype=torch.bool)
    row_mask[[cu_q[segment] + i for i in rows]] = True
    for i in rows:
        key_mask[cu_k[segment] + seen[i][0] : cu_k[segment] + seen[i][1]] = True
    return row_mask, key_mask


# Every kernel path: forward lanes (< 32 keys) and blocked (>= 32), backward lanes (< 16) and blocked (>= 16),
# self and cross (causal rows that see no key), and the generic row kernel (head dim 7, float64); no mask,
# causal, and sliding windows, whose rows leave keys unseen on both sides (the poisoned keys are seen by some
# rows and not by others).
POISON_LAYOUTS = [Layout("poison-self", (6, 20, 40, 3)), Layout("poison-cross", (6, 20, 45, 3), (9, 18, 40, 2))]
POISON_CASES = [
    (torch.float32, MHA),
    (torch.float32, GQA),
    (torch.float32, MQA),
    (torch.float64, GQA),
    (torch.bfloat16, MHA),
    (torch.float16, GQA),
]
# (segment, row) of a poisoned query or dout row, (segment, key) of a poisoned key or value: rows and keys of
# the lane-parallel and blocked segments that causal rows before them do not see.
POISON_ROWS, POISON_KEYS = ((0, 2), (1, 4), (2, 7)), ((0, 2), (1, 4), (2, 5))


@needs_kernel
@pytest.mark.parametrize("layout", POISON_LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (2, 1), (3, 0)], ids=lambda w: f"l{w[0]}r{w[1]}")
@pytest.mark.parametrize("case", POISON_CASES, ids=_case_id)
def test_non_finite_values_reach_only_the_rows_that_see_them(layout, window, case):
    """An inf or a NaN in one token of q, k, v or dout leaves every output and gradient of the rows and keys it
    does not interact with finite and bit-identical to the clean run: masked entries are skipped, never
    multiplied by zero (0 * inf = NaN)."""
    dtype, (num_heads, num_kv_heads, head_dim) = case
    g = torch.Generator().manual_seed(13)
    clean = dict(zip("qkv", random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g)))
    clean["dout"] = torch.randn(clean["q"].shape, generator=g, dtype=torch.float64).to(dtype)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    args = (cu_q, cu_k, max(layout.lengths_q), max(layout.keys), 1 / math.sqrt(head_dim), *window, 0.0, None)

    def run(t):
        out, lse = torch.ops.hierkern.varlen_fwd(t["q"], t["k"], t["v"], *args)
        return (out, lse, *torch.ops.hierkern.varlen_bwd(t["dout"], t["q"], t["k"], t["v"], out, lse, *args))

    want = run(clean)
    for tensor in ("q", "k", "v", "dout"):
        offsets = cu_q if tensor in ("q", "dout") else cu_k
        for segment, index in POISON_ROWS if tensor in ("q", "dout") else POISON_KEYS:
            for value in (math.inf, math.nan):
                poisoned = dict(clean)
                poisoned[tensor] = clean[tensor].clone()
                poisoned[tensor][offsets[segment] + index] = value
                out, lse, dq, dk, dv = run(poisoned)
                rows, keys = _interacting(layout, window, tensor, segment, index)
                where = f"{value} in {tensor}[{int(offsets[segment]) + index}]"
                for name, got, ref, mask in (
                    ("out", out, want[0], rows),
                    ("dq", dq, want[2], rows),
                    ("dk", dk, want[3], keys),
                    ("dv", dv, want[4], keys),
                ):
                    assert torch.isfinite(got[~mask]).all(), f"{where} leaks into {name}"
                    assert torch.equal(got[~mask], ref[~mask]), f"{where} changes {name} of other rows"
                assert torch.equal(lse[:, ~rows], want[1][:, ~rows]), f"{where} changes lse of other rows"
                reached = dq if tensor == "dout" else out
                assert not torch.isfinite(reached[rows]).all(), f"{where} reached no row that sees it"


# Words (lane-parallel backward) and segments of 20 to 70 keys (blocked backward from 16 keys, forward from 32).
PEAKY_LAYOUTS = [adversarial_layouts()[7], Layout("long", (20, 40, 70))]


@needs_kernel
@pytest.mark.parametrize("layout", PEAKY_LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("heads", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [None, 4.0, 8.0], ids=["scale-default", "scale-4", "scale-8"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
def test_low_precision_gradients_with_peaky_softmax(dtype, scale, causal, heads, layout):
    """With a large softmax_scale rows are near one-hot, and dS = P * (dP - D) is a small difference of close
    numbers. D must come from the float P and dP the kernel recomputes, not from rowsum(dout * out) with out
    rounded to the input dtype: the inputs here are positive (as after a ReLU) and the values share an offset
    (as after a bias), so out is large next to the differences dS measures. Errors against float64 relative to
    the reference backend's own error in that dtype (docs/design.md: <= 2x for outputs, <= 3x for gradients)."""
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(14)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=torch.float64, generator=g)
    q, k, v = (torch.rand(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v + 2))
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out = _call(q, k, v, layout, causal, softmax_scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    own_out, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=scale, causal=causal)
    own_grads = torch.autograd.grad(own_out, (q, k, v), dout.to(dtype))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = varlen_attention_reference(*exact, cu_q, cu_k, softmax_scale=scale, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, exact, dout)
    assert rel_err(out, ref_out) <= 2 * rel_err(own_out, ref_out)
    for name, grad, own, ref in zip("qkv", grads, own_grads, ref_grads):
        err, bound = rel_err(grad, ref), 3 * rel_err(own, ref)
        assert err <= bound, f"d{name}: error {err:.3g} > {bound:.3g}"


@needs_kernel
@pytest.mark.parametrize("scale", [None, 2.5], ids=["scale-default", "scale-2.5"])
@pytest.mark.parametrize("heads", [MHA, GQA, MQA], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", adversarial_layouts(), ids=lambda l: l.name)
def test_float32_gradients_as_accurate_as_the_reference(layout, causal, heads, scale):
    """The softmax backward's D is summed from the probabilities the kernel recomputes from lse, and normalised
    by their sum: unnormalised, the recomputation's rounding (about |score| * eps) reaches dS, e.g. in a one-key
    row whose dS is 0, and float32 dq/dk errors grew ~10x past the reference backend's."""
    g = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(layout, *heads, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out = _call(q, k, v, layout, causal, softmax_scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.float(), allow_unused=True, materialize_grads=True)
    own_out, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=scale, causal=causal)
    own_grads = torch.autograd.grad(own_out, (q, k, v), dout.float(), allow_unused=True, materialize_grads=True)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = varlen_attention_reference(*exact, cu_q, cu_k, softmax_scale=scale, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, exact, dout, allow_unused=True, materialize_grads=True)
    for name, grad, own, ref in zip("qkv", grads, own_grads, ref_grads):
        err, bound = rel_err(grad, ref), 3 * rel_err(own, ref) + 2e-6
        assert err <= bound, f"d{name}: error {err:.3g} > {bound:.3g}"


@needs_kernel
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [128, 40], ids=["blocked", "generic"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
def test_low_precision_segments_too_long_to_convert(dtype, head_dim, causal):
    """Segments whose keys and values do not fit the kernels' conversion scratch as float (kConvertBytes = 2 MiB
    per run of kv heads in csrc/cpu) are read in place, by the blocked kernels and the row kernels, forward and
    backward: errors against float64 within the reference backend's own in that dtype (<= 2x out, <= 3x
    gradients)."""
    keys = 2200 if head_dim == 128 else 6700  # 2.15 MB and 2.14 MB of float keys and values per kv head
    layout = Layout("too-long", (5, 9, 2), (3, keys, 4))
    g = torch.Generator().manual_seed(15)
    q, k, v = random_qkv(layout, 4, 2, head_dim, dtype=dtype, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out = _call(q, k, v, layout, causal)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    own_out, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
    own_grads = torch.autograd.grad(own_out, (q, k, v), dout.to(dtype))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = varlen_attention_reference(*exact, cu_q, cu_k, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, exact, dout)
    assert rel_err(out, ref_out) <= 2 * rel_err(own_out, ref_out) + torch.finfo(dtype).eps
    for name, grad, own, ref in zip("qkv", grads, own_grads, ref_grads):
        err, bound = _grad_err(grad, ref), 3 * _grad_err(own, ref) + torch.finfo(dtype).eps
        assert err <= bound, f"d{name}: error {err:.3g} > {bound:.3g}"


@needs_kernel
def test_low_precision_scratch_is_bounded_by_a_block():
    """One query over many keys: a bfloat16 call needs no more memory than a float32 one (the kernel must not
    convert the whole segment's keys and values to float32 in every thread). Peak RSS of a fresh process, so
    that nothing freed earlier hides the growth."""
    script = """
import resource, sys, torch, hierkern
dtype = getattr(torch, sys.argv[1])
torch.set_num_threads(2)
keys, heads, head_dim = 20000, 8, 128
q = torch.randn(1, heads, head_dim, dtype=dtype)
k, v = (torch.randn(keys, heads, head_dim, dtype=dtype) for _ in range(2))
cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (1, keys))
hierkern.varlen_attention(q, k[:64], v[:64], cu_q, torch.tensor([0, 64], dtype=torch.int32), backend="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hierkern.varlen_attention(q, k, v, cu_q, cu_k, backend="cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    growth = {}
    for dtype in ("float32", "bfloat16"):
        result = subprocess.run([sys.executable, "-c", script, dtype], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        growth[dtype] = float(result.stdout.split()[-1])  # MiB
    # The float32 K and V of this segment alone are 160 MiB: one thread converting them would exceed this.
    assert growth["bfloat16"] <= growth["float32"] + 16, growth


@needs_kernel
def test_softmax_scale_and_head_dims():
    layout = adversarial_layouts()[7]
    g = torch.Generator().manual_seed(6)
    for head_dim in (1, 33, 128):
        q, k, v = random_qkv(layout, 2, 2, head_dim, generator=g)
        out = _call(q, k, v, layout, causal=True, softmax_scale=0.7)
        ref, _ = oracle_attention(
            q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys), softmax_scale=0.7, causal=True
        )
        assert rel_err(out, ref) <= TOL[torch.float32], head_dim


@needs_kernel
def test_opcheck():
    layout = Layout("small", (3, 0, 5, 1), (2, 3, 5, 1))
    g = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(layout, 4, 2, 16, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    for window in ((-1, -1), (-1, 0), (1, 2)):
        torch.library.opcheck(
            torch.ops.hierkern.varlen_fwd.default, (q, k, v, cu_q, cu_k, 5, 5, 0.25, *window, 0.0, None)
        )
    out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, 5, 5, 0.25, 1, 2, 0.0, None)
    dout = torch.randn(q.shape, generator=g)
    torch.library.opcheck(
        torch.ops.hierkern.varlen_bwd.default,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 5, 5, 0.25, 1, 2, 0.0, None),
    )


@needs_kernel
def test_torch_compile_fullgraph_matches_eager():
    layout = adversarial_layouts()[7]
    seg_q = hierkern.Segments.from_lengths(list(layout.lengths_q))
    g = torch.Generator().manual_seed(8)
    q, k, v = random_qkv(layout, 4, 2, 32, generator=g, requires_grad=True)

    def attend(q, k, v):
        return hierkern.varlen_attention(q, k, v, seg_q, causal=True, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=False)
    dout = torch.randn(q.shape, generator=g)
    eager_out = attend(q, k, v)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), dout)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernel
def test_auto_selects_cpu_with_and_without_dropout():
    q = torch.randn(5, 2, 8)
    for dropout_p in (0.0, 0.1):
        assert select_backend(AttentionCall.of(q, q, q, 5, 5, causal=False, dropout_p=dropout_p)).name == "cpu"
    cuda_call = AttentionCall(
        device_type="cuda",
        dtype=torch.float32,
        head_dim=8,
        num_heads=2,
        num_kv_heads=2,
        max_seqlen_q=5,
        max_seqlen_k=5,
        dropout=False,
        requires_grad=False,
    )
    assert "runs on cpu tensors, not cuda" in CPU.why_not(cuda_call)


# Every kernel path under dropout: lane-parallel (words), blocked (forward from 32 keys, backward from 16) and
# the generic row kernel (head dim 7, float64).
DROPOUT_LAYOUTS = [
    Layout("words", (1, 5, 3, 0, 8, 2, 11, 4, 7)),
    Layout("boundaries-cross", (15, 16, 33, 40, 2), (15, 17, 31, 34, 0)),
    Layout("long", (70, 1, 3)),
]
DROPOUT_CASES = [(torch.float32, MHA), (torch.float32, GQA), (torch.float64, MQA), (torch.bfloat16, MHA)]


@needs_kernel
@pytest.mark.parametrize("layout", DROPOUT_LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=_case_id)
def test_dropout_matches_the_philox_mask_model(layout, causal, case):
    """Forward and gradients under dropout against a float64 dense model that applies the mask of the CUDA
    kernels' Philox generator (rebuilt in Python by tests/cuda_oracles.py): the CPU kernel drops exactly those
    weights, and the backward regenerates the forward's mask."""
    dtype, (num_heads, num_kv_heads, head_dim) = case
    p, seed, offset = 0.3, 987654321, 17
    g = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    scale = 1 / math.sqrt(head_dim)
    rng_state = torch.tensor([seed, offset], dtype=torch.int64)
    out, _ = torch.ops.hierkern.varlen_fwd(
        q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), scale, *_window(causal), p, rng_state
    )
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))

    keep = keep_mask(seed, offset, num_heads, q.shape[0], k.shape[0], p).double()
    assert 0.55 < keep.mean() < 0.85  # the mask really drops about 30%
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves64, layout, causal, scale, keep, p)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(out, ref) < tol
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert _grad_err(grad, ref_grad) < 5 * tol, f"d{name}"
    again, _ = torch.ops.hierkern.varlen_fwd(
        q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), scale, *_window(causal), p, rng_state
    )
    assert torch.equal(out, again)


@needs_kernel
def test_dropout_through_the_api_is_seeded_by_torch():
    layout = DROPOUT_LAYOUTS[0]
    q, k, v = random_qkv(layout, 4, 4, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    cu = offsets_of(layout.lengths_q)

    def run(seed):
        torch.manual_seed(seed)
        out = hierkern.varlen_attention(q, k, v, cu, dropout_p=0.2, backend="cpu")
        return out, torch.autograd.grad(out.square().sum(), (q, k, v))

    (out1, grads1), (out2, grads2) = run(7), run(7)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert not torch.equal(run(8)[0], out1)
    no_dropout = hierkern.varlen_attention(q, k, v, cu, backend="cpu")
    assert not torch.equal(no_dropout, out1)


@needs_kernel
@pytest.mark.parametrize(
    "case, error, match",
    [
        ("offsets dtype", TypeError, "cu_seqlens_q must be int32"),
        ("decreasing", ValueError, "non-decreasing"),
        ("overrun", ValueError, r"cu_seqlens_k\[-1\] must equal"),
        ("first offset", ValueError, r"cu_seqlens_q\[0\] must be 0"),
        ("segment count", ValueError, "same number of segments"),
        ("max_seqlen", ValueError, "max_seqlen_q=2 is smaller"),
        ("dtype mix", TypeError, "share a dtype"),
        ("int inputs", TypeError, "q must be float32"),
        ("heads", ValueError, "multiple of the number of key/value heads"),
        ("head dim", ValueError, "same head_dim"),
        ("rank", ValueError, "q must have shape"),
        ("dropout without rng_state", ValueError, "needs rng_state"),
        ("dropout_p of 1", ValueError, r"dropout_p must be in \[0, 1\)"),
        ("scale", ValueError, "softmax_scale must be finite"),
    ],
)
def test_op_rejects_bad_input(case, error, match):
    q = torch.randn(6, 4, 8)
    kv = torch.randn(6, 2, 8)
    cu = offsets_of([2, 4])
    args = dict(q=q, k=kv, v=kv, cu_q=cu, cu_k=cu, max_q=4, max_k=4, scale=0.5, dropout=0.0)
    if case == "offsets dtype":
        args["cu_q"] = cu.long()
    elif case == "decreasing":
        args["cu_q"] = torch.tensor([0, 4, 2, 6], dtype=torch.int32)
        args["cu_k"] = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    elif case == "overrun":
        args["cu_k"] = torch.tensor([0, 2, 7], dtype=torch.int32)
    elif case == "first offset":
        args["cu_q"] = torch.tensor([1, 2, 6], dtype=torch.int32)
    elif case == "segment count":
        args["cu_k"] = torch.tensor([0, 6], dtype=torch.int32)
    elif case == "max_seqlen":
        args["max_q"] = 2
    elif case == "dtype mix":
        args["v"] = kv.double()
    elif case == "int inputs":
        args["q"] = q.int()
    elif case == "heads":
        args["q"] = torch.randn(6, 3, 8)
    elif case == "head dim":
        args["q"] = torch.randn(6, 4, 4)
    elif case == "rank":
        args["q"] = q.flatten(1)
    elif case == "dropout without rng_state":
        args["dropout"] = 0.5
    elif case == "dropout_p of 1":
        args["dropout"] = 1.0
    elif case == "scale":
        args["scale"] = math.inf
    with pytest.raises(error, match=match):
        torch.ops.hierkern.varlen_fwd(
            args["q"],
            args["k"],
            args["v"],
            args["cu_q"],
            args["cu_k"],
            args["max_q"],
            args["max_k"],
            args["scale"],
            -1,
            -1,
            args["dropout"],
            None,
        )


@needs_kernel
def test_backward_op_rejects_bad_input():
    q, kv, cu = torch.randn(6, 4, 8), torch.randn(6, 2, 8), offsets_of([2, 4])
    out, lse = torch.ops.hierkern.varlen_fwd(q, kv, kv, cu, cu, 4, 4, 0.5, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match="lse must be a CPU tensor of shape"):
        torch.ops.hierkern.varlen_bwd(out, q, kv, kv, out, lse.t(), cu, cu, 4, 4, 0.5, -1, -1, 0.0, None)
    with pytest.raises(TypeError, match="lse must be float32"):
        torch.ops.hierkern.varlen_bwd(out, q, kv, kv, out, lse.double(), cu, cu, 4, 4, 0.5, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match="dout and out must have q's shape"):
        torch.ops.hierkern.varlen_bwd(out[:5], q, kv, kv, out, lse, cu, cu, 4, 4, 0.5, -1, -1, 0.0, None)


def check_every_finite_value_read_exactly(dtype):
    """Keys and values of a kv head too long to convert into the kernels' bounded scratch (kConvertBytes = 2 MiB
    in csrc/cpu: 4096 keys of head dim 128 are 4 MiB as float) are converted as they are read (by F16C, or by
    the baseline build's own bit arithmetic). Each query selects one key with a one-hot softmax (keys are +-10
    codes of their index, so the scores of other keys are at least 200 below: P is exactly 1 and 0) and must
    return that key's value row unchanged, for every finite value of dtype, subnormals included."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    keys, head_dim, bits = 4096, 128, 12
    codes = (torch.arange(keys)[:, None] >> torch.arange(bits)) & 1
    k = torch.zeros(keys, 1, head_dim)
    k[:, 0, :bits] = 20.0 * codes - 10.0
    k = k.to(dtype)
    v = torch.cat([values, values.new_zeros(keys * head_dim - values.numel())]).reshape(keys, 1, head_dim)
    rows = -(-values.numel() // head_dim)  # the queries of the keys whose values hold the test values
    out = hierkern.varlen_attention(
        k[:rows], k, v, offsets_of([rows]), offsets_of([keys]), softmax_scale=1.0, backend="cpu"
    )
    assert torch.equal(out, v[:rows])


@needs_kernel
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
def test_every_finite_value_read_exactly(dtype):
    check_every_finite_value_read_exactly(dtype)


@needs_kernel
def test_baseline_kernels_match_oracle():
    """The kernels built for the baseline instruction set (what a CPU without AVX2 runs), forced by
    HIERKERN_CPU_KERNELS=generic in a fresh process: forward and gradients on every head-dim path, the
    dropout mask, and its own conversion of bfloat16/float16."""
    script = """
import sys, torch, hierkern
sys.path.insert(0, sys.argv[1])
from helpers import adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err
from hierkern.reference import varlen_attention_reference
for layout in adversarial_layouts()[1:3] + adversarial_layouts()[6:8]:
    for dtype, head_dim in ((torch.float32, 32), (torch.float32, 64), (torch.float32, 128), (torch.float32, 5),
                            (torch.bfloat16, 32), (torch.float16, 64), (torch.float64, 32)):
        g = torch.Generator().manual_seed(9)
        q, k, v = random_qkv(layout, 4, 2, head_dim, dtype=dtype, generator=g, requires_grad=True)
        cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
        out = hierkern.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="cpu")
        ref, _ = oracle_attention(q, k, v, cu_q, cu_k, causal=True)
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(dtype, 1e-5)
        assert rel_err(out, ref) < tol, (layout.name, dtype, head_dim, rel_err(out, ref))
        dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out, _ = varlen_attention_reference(*exact, cu_q, cu_k, causal=True)
        ref_grads = torch.autograd.grad(ref_out, exact, dout)
        for a, b in zip(grads, ref_grads):
            assert (a.double() - b).norm() <= 10 * tol * max(b.norm(), 1.0), (layout.name, dtype, head_dim)
# Dropout: the baseline build's Philox (no AVX2 multiplies) draws the same mask.
from cuda_oracles import dense_attention, keep_mask
layout = adversarial_layouts()[2]
q, k, v = random_qkv(layout, 4, 2, 32, generator=torch.Generator().manual_seed(3))
cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
out, _ = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), 0.25, -1, -1,
                                       0.3, torch.tensor([5, 6]))
keep = keep_mask(5, 6, 4, q.shape[0], k.shape[0], 0.3).double()
ref = dense_attention(q.double(), k.double(), v.double(), layout, False, 0.25, keep, 0.3)
assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
from test_cpu_backend import check_every_finite_value_read_exactly
for dtype in (torch.bfloat16, torch.float16):
    check_every_finite_value_read_exactly(dtype)
print("ok")
"""
    env = dict(os.environ, HIERKERN_CPU_KERNELS="generic", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_missing_extension_degrades_to_reference():
    """With hierkern._C unimportable and no first-use build allowed, `import hierkern` warns once with the cause
    and the fix, and everything runs on the reference backend."""
    script = """
import os, sys, warnings
os.environ["HIERKERN_NO_JIT"] = "1"
sys.modules["hierkern._C"] = None  # makes `import hierkern._C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, hierkern
messages = [str(w.message) for w in caught if "hierkern._C" in str(w.message)]
assert len(messages) == 1 and "compiled kernels are unavailable" in messages[0], messages
assert "HIERKERN_NO_JIT=1" in messages[0] and "python -m hierkern doctor" in messages[0], messages
assert "cpu" not in hierkern.available_backends(), hierkern.available_backends()
q = torch.randn(5, 2, 8)
call = hierkern.AttentionCall.of(q, q, q, 5, 5, causal=False, dropout_p=0.0)
assert "HIERKERN_NO_JIT=1" in hierkern.explain(call)["cpu"]
cu = torch.tensor([0, 2, 5], dtype=torch.int32)
out = hierkern.varlen_attention(q, q, q, cu)
assert out.shape == q.shape
try:
    hierkern.varlen_attention(q, q, q, cu, backend="cpu")
except ValueError as exc:
    assert "hierkern._C was not built" in str(exc), exc
else:
    raise AssertionError("backend='cpu' ran without its extension")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
