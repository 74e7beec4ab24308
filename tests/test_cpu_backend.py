"""The fused C++ CPU kernel (``backend="cpu"``, ``torch.ops.hierkern.varlen_fwd/varlen_bwd``).

Forward against the float64 loop oracle, gradients against float64 reference autograd, on every adversarial
layout; low precision is bounded relative to the reference's own error in that dtype (DESIGN.md).
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
needs_kernel = pytest.mark.skipif(CPU.unavailable_reason() is not None,
                                  reason=f"CPU kernel unavailable: {CPU.unavailable_reason()}")

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
# Every head layout in float32; each other dtype on the layouts that stress it, to keep the suite quick.
FORWARD_CASES = [(torch.float32, MHA), (torch.float32, GQA), (torch.float32, MQA), (torch.float64, GQA),
                 (torch.bfloat16, MHA), (torch.bfloat16, MQA), (torch.float16, GQA)]
GRADIENT_CASES = [(torch.float32, MHA), (torch.float32, GQA), (torch.float32, MQA), (torch.float64, GQA),
                  (torch.bfloat16, MHA), (torch.bfloat16, MQA), (torch.float16, GQA)]


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


def _call(q, k, v, layout, causal, **kw):
    return hierkern.varlen_attention(q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys),
                                     causal=causal, backend="cpu", **kw)


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
@pytest.mark.parametrize("case", FORWARD_CASES, ids=_case_id)
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
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=_case_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_gradients_match_reference(layout, causal, case):
    dtype, heads = case
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g,
                         requires_grad=True)
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
        own_grads = torch.autograd.grad(own_out, own, dout.to(dtype), allow_unused=True,
                                        materialize_grads=True)
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
            out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, 70, 66, 0.3, causal, 0.0, None)
            dq, dk, dv = torch.ops.hierkern.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, 70, 66, 0.3,
                                                       causal, 0.0, None)
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
def test_softmax_scale_and_head_dims():
    layout = adversarial_layouts()[7]
    g = torch.Generator().manual_seed(6)
    for head_dim in (1, 33, 128):
        q, k, v = random_qkv(layout, 2, 2, head_dim, generator=g)
        out = _call(q, k, v, layout, causal=True, softmax_scale=0.7)
        ref, _ = oracle_attention(q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys),
                                  softmax_scale=0.7, causal=True)
        assert rel_err(out, ref) <= TOL[torch.float32], head_dim


@needs_kernel
def test_opcheck():
    layout = Layout("small", (3, 0, 5, 1), (2, 3, 5, 1))
    g = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(layout, 4, 2, 16, generator=g, requires_grad=True)
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.hierkern.varlen_fwd.default,
                              (q, k, v, cu_q, cu_k, 5, 5, 0.25, causal, 0.0, None))
    out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, 5, 5, 0.25, True, 0.0, None)
    dout = torch.randn(q.shape, generator=g)
    torch.library.opcheck(torch.ops.hierkern.varlen_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 5, 5,
                           0.25, True, 0.0, None))


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
    cuda_call = AttentionCall(device_type="cuda", dtype=torch.float32, head_dim=8, num_heads=2, num_kv_heads=2,
                              max_seqlen_q=5, max_seqlen_k=5, causal=False, dropout=False, requires_grad=False)
    assert "CPU tensors" in CPU.why_not(cuda_call)


# Every kernel path under dropout: lane-parallel (words), blocked (forward from 32 keys, backward from 16) and
# the generic row kernel (head dim 7, float64).
DROPOUT_LAYOUTS = [Layout("words", (1, 5, 3, 0, 8, 2, 11, 4, 7)),
                   Layout("boundaries-cross", (15, 16, 33, 40, 2), (15, 17, 31, 34, 0)),
                   Layout("long", (70, 1, 3))]
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
    out, _ = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), scale,
                                           causal, p, rng_state)
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
    again, _ = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), scale,
                                             causal, p, rng_state)
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
@pytest.mark.parametrize("case, error, match", [
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
])
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
        torch.ops.hierkern.varlen_fwd(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"],
                                      args["max_q"], args["max_k"], args["scale"], False, args["dropout"], None)


@needs_kernel
def test_backward_op_rejects_bad_input():
    q, kv, cu = torch.randn(6, 4, 8), torch.randn(6, 2, 8), offsets_of([2, 4])
    out, lse = torch.ops.hierkern.varlen_fwd(q, kv, kv, cu, cu, 4, 4, 0.5, False, 0.0, None)
    with pytest.raises(ValueError, match="lse must be a CPU tensor of shape"):
        torch.ops.hierkern.varlen_bwd(out, q, kv, kv, out, lse.t(), cu, cu, 4, 4, 0.5, False, 0.0, None)
    with pytest.raises(TypeError, match="lse must be float32"):
        torch.ops.hierkern.varlen_bwd(out, q, kv, kv, out, lse.double(), cu, cu, 4, 4, 0.5, False, 0.0, None)
    with pytest.raises(ValueError, match="dout and out must have q's shape"):
        torch.ops.hierkern.varlen_bwd(out[:5], q, kv, kv, out, lse, cu, cu, 4, 4, 0.5, False, 0.0, None)


@needs_kernel
def test_baseline_kernels_match_oracle():
    """The kernels built for the baseline instruction set (what a CPU without AVX2 runs), forced by
    HIERKERN_CPU_KERNELS=generic in a fresh process: forward and gradients on every head-dim path, and the
    dropout mask."""
    script = """
import sys, torch, hierkern
sys.path.insert(0, sys.argv[1])
from helpers import adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err
from hierkern.reference import varlen_attention_reference
for layout in adversarial_layouts()[1:3] + adversarial_layouts()[6:8]:
    for dtype, head_dim in ((torch.float32, 32), (torch.float32, 64), (torch.float32, 128), (torch.float32, 5),
                            (torch.bfloat16, 32), (torch.float64, 32)):
        g = torch.Generator().manual_seed(9)
        q, k, v = random_qkv(layout, 4, 2, head_dim, dtype=dtype, generator=g, requires_grad=True)
        cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
        out = hierkern.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="cpu")
        ref, _ = oracle_attention(q, k, v, cu_q, cu_k, causal=True)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
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
out, _ = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), 0.25, False,
                                       0.3, torch.tensor([5, 6]))
keep = keep_mask(5, 6, 4, q.shape[0], k.shape[0], 0.3).double()
ref = dense_attention(q.double(), k.double(), v.double(), layout, False, 0.25, keep, 0.3)
assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
print("ok")
"""
    env = dict(os.environ, HIERKERN_CPU_KERNELS="generic", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_missing_extension_degrades_to_reference():
    """With hierkern._C unimportable, `import hierkern` warns with the cause and everything runs on the
    reference backend."""
    script = """
import sys, warnings
sys.modules["hierkern._C"] = None  # makes `import hierkern._C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, hierkern
messages = [str(w.message) for w in caught if "hierkern._C" in str(w.message)]
assert len(messages) == 1 and "could not be loaded" in messages[0], messages
assert "cpu" not in hierkern.available_backends(), hierkern.available_backends()
q = torch.randn(5, 2, 8)
call = hierkern.AttentionCall.of(q, q, q, 5, 5, causal=False, dropout_p=0.0)
assert "could not be loaded" in hierkern.explain(call)["cpu"]
cu = torch.tensor([0, 2, 5], dtype=torch.int32)
out = hierkern.varlen_attention(q, q, q, cu)
assert out.shape == q.shape
try:
    hierkern.varlen_attention(q, q, q, cu, backend="cpu")
except ValueError as exc:
    assert "could not be loaded" in str(exc)
else:
    raise AssertionError("backend='cpu' ran without its extension")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
