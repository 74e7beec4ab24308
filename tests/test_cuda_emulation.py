"""csrc/cuda's kernels, run on the CPU: the kernel templates compiled by g++ under an emulation of the CUDA
execution model (tests/cuda_host_emulation.h: fibers for threads, barriers for __syncthreads and the warp
collectives) and checked against the float64 oracles on adversarial layouts: forward, lse, gradients, GQA,
causal, fp32/fp16/bf16, head dims 32/64/128, dropout against the exact Philox mask, inf/NaN inputs that
must reach only the rows attending to them, half-precision gradients under a peaky softmax, and head
offsets past 2^31 elements. Outputs start as NaN, so an element a kernel never writes fails the test; a
collective that not every lane reaches deadlocks the emulation, which reports it.

What this does not cover: the GPU's fast-math approximations, its memory model (races, alignment faults)
and performance. tests/test_cuda_backend.py runs the real thing on a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cuda_build import CACHE, CSRC_COMMON, CSRC_CUDA, _cuda_include

from hierkern.reference import varlen_attention_reference

from cuda_oracles import dense_attention, keep_mask, rowwise_attention, visibility, window_of
from helpers import Layout, adversarial_layouts, offsets_of, random_qkv, rel_err

TESTS = Path(__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # hierkern::cuda::DType
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; the mmap module names it from 3.13

pytestmark = pytest.mark.skipif(
    CXX is None or _cuda_include() is None, reason="needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h)"
)


@pytest.fixture(scope="module")
def emu():
    sources = [
        TESTS / "cuda_emulation_harness.cpp",
        TESTS / "cuda_host_emulation.h",
        *sorted(CSRC_CUDA.iterdir()),
        *sorted(CSRC_COMMON.iterdir()),
    ]
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = CACHE / f"emulation-{digest}" / "libhkemu.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        private = lib.with_suffix(f".{os.getpid()}.so")  # renamed into place: concurrent runs never load half a file
        # No _FORTIFY_SOURCE: its longjmp check rejects the switches between fiber stacks.
        subprocess.run(
            [
                CXX,
                "-std=c++17",
                "-O2",
                "-U_FORTIFY_SOURCE",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unknown-pragmas",
                "-I",
                str(TESTS),
                "-I",
                str(CSRC_CUDA),
                "-isystem",
                str(_cuda_include()),
                str(sources[0]),
                "-o",
                str(private),
            ],
            check=True,
        )
        os.replace(private, lib)
    handle = ctypes.CDLL(str(lib))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    common = [i32] * 7 + [ptr] * 6 + [ctypes.c_float, i32, i32, ctypes.c_float, ctypes.c_ulonglong, ctypes.c_ulonglong]
    handle.emu_varlen_fwd.argtypes = common + [ptr, ptr]
    handle.emu_varlen_bwd.argtypes = common + [ptr] * 6
    return handle


def _common(q, k, v, cu_q, cu_k, mask, scale, p, seed, offset, dout=None):
    # Inputs keep their own (token, head) strides, as the binding passes them; head_dim must be unit-stride.
    inputs = (q, k, v) if dout is None else (q, k, v, dout)
    assert all(t.stride(2) == 1 for t in inputs)
    strides = (ctypes.c_longlong * 8)(*[s for t in inputs for s in t.stride()[:2]])
    return (
        DTYPE_CODES[q.dtype],
        q.shape[2],
        q.shape[1],
        k.shape[1],
        q.shape[0],
        k.shape[0],
        cu_q.numel() - 1,
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        strides,
        cu_q.data_ptr(),
        cu_k.data_ptr(),
        scale,
        *window_of(mask),
        p,
        seed,
        offset,
    )


def emu_fwd(lib, q, k, v, cu_q, cu_k, mask, scale, p=0.0, seed=0, offset=0):
    """``mask``: a causal flag or a window (left, right)."""
    out = torch.full(q.shape, math.nan, dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan)
    err = lib.emu_varlen_fwd(
        *_common(q, k, v, cu_q, cu_k, mask, scale, p, seed, offset), out.data_ptr(), lse.data_ptr()
    )
    assert err == 0, f"emulated forward failed (cudaError {err}: 719 is a deadlock)"
    return out, lse


def emu_bwd(lib, dout, q, k, v, lse, cu_q, cu_k, mask, scale, p=0.0, seed=0, offset=0):
    dq, dk, dv = (torch.full(t.shape, math.nan, dtype=t.dtype) for t in (q, k, v))
    delta = torch.full((q.shape[1], q.shape[0]), math.nan)
    err = lib.emu_varlen_bwd(
        *_common(q, k, v, cu_q, cu_k, mask, scale, p, seed, offset, dout),
        dout.data_ptr(),
        lse.data_ptr(),
        delta.data_ptr(),
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
    )
    assert err == 0, f"emulated backward failed (cudaError {err}: 719 is a deadlock)"
    return dq, dk, dv


_ADVERSARIAL = {lay.name: lay for lay in adversarial_layouts(tile=64)}
LAYOUTS = [
    _ADVERSARIAL["empty-and-one"],
    _ADVERSARIAL["tile-boundaries"],
    _ADVERSARIAL["cross-unequal"],
    _ADVERSARIAL["words"],
    _ADVERSARIAL["all-empty"],
    Layout("row-tiles", (15, 16, 17, 31, 33, 1, 0, 2)),
    Layout("keys-shorter", (9, 40, 3), (2, 70, 0)),
]
# (dtype, H, H_kv, D): every dtype and head dim once, with MHA, GQA and MQA.
CONFIGS = [(torch.float32, 2, 2, 64), (torch.bfloat16, 4, 2, 32), (torch.float16, 2, 1, 128)]
CONFIG_IDS = [f"{str(d).split('.')[-1]}-H{h}-Hkv{hk}-D{dim}" for d, h, hk, dim in CONFIGS]
# Slack over the reference's own error in the dtype (2x for outputs, 3x for gradients), for the cases
# where that error is ~0.
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _case(layout, config, requires_grad=False):
    dtype, h, hk, d = config
    q, k, v = random_qkv(
        layout, h, hk, d, dtype=dtype, generator=torch.Generator().manual_seed(0), requires_grad=requires_grad
    )
    return q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys), 0.7 / math.sqrt(d)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_forward_and_gradients_match_the_oracle(emu, layout, config, causal):
    q, k, v, cu_q, cu_k, scale = _case(layout, config, requires_grad=True)
    dtype = q.dtype
    out, lse = emu_fwd(emu, q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal, scale)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = emu_bwd(emu, dout.to(dtype), q.detach(), k.detach(), v.detach(), lse, cu_q, cu_k, causal, scale)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = varlen_attention_reference(*leaves64, cu_q, cu_k, softmax_scale=scale, causal=causal)
    own, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=scale, causal=causal)

    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element was never written"
    assert rel_err(out, ref) <= 2 * rel_err(own, ref) + FLOOR[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == -math.inf).all()
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-5

    if ref.requires_grad:  # layouts with no visible key at all have no graph to differentiate
        ref_grads = torch.autograd.grad(ref, leaves64, dout)
        own_grads = torch.autograd.grad(own, (q, k, v), dout.to(dtype), allow_unused=True, materialize_grads=True)
    else:
        ref_grads = own_grads = [torch.zeros_like(t) for t in leaves64]
    for name, g, r, o in zip("qkv", grads, ref_grads, own_grads):
        assert not torch.isnan(g).any(), f"d{name}: an element was never written"
        assert rel_err(g, r) <= 3 * rel_err(o, r) + FLOOR[dtype], f"d{name}"


@pytest.mark.parametrize("mask", [False, True, (2, 1), (0, 5)], ids=str)
def test_dropout_matches_the_exact_philox_mask(emu, mask):
    """Forward and both backward passes apply the same mask, the one tests/cuda_oracles.py rebuilds, at the
    packed token indices whatever slot a window stages a key or query in."""
    layout = _ADVERSARIAL["cross-unequal"]
    p, seed, offset = 0.25, 2**40 + 17, 99
    q, k, v, cu_q, cu_k, scale = _case(layout, (torch.float32, 4, 2, 64))
    out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, mask, scale, p, seed, offset)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = emu_bwd(emu, dout.float(), q, k, v, lse, cu_q, cu_k, mask, scale, p, seed, offset)

    keep = keep_mask(seed, offset, q.shape[1], q.shape[0], k.shape[0], p).double()
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves64, layout, mask, scale, keep, p)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    _, ref_lse, *_ = rowwise_attention(q, k, v, dout, layout, mask, scale)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-5  # lse ignores dropout
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, f"d{name}"
    no_drop, _ = emu_fwd(emu, q, k, v, cu_q, cu_k, mask, scale)
    assert rel_err(out, no_drop) > 0.05  # the mask did something


# ---------------------------------------------------------------------------------------------------------
# Non-finite isolation: a token's value reaches only rows that attend to it
# ---------------------------------------------------------------------------------------------------------

ISOLATION_CONFIG = (torch.bfloat16, 4, 2, 32)  # GQA; 64-row tiles and 64-key blocks
ISOLATION_LAYOUTS = [
    # Many words per tile: the poisoned token's word shares staged key blocks with its neighbours.
    Layout("words", (3, 5, 1, 7, 2, 6, 4, 1, 9, 3, 5, 2, 8)),
    # A segment over three key blocks and three row tiles, queries fewer than keys (bottom-right causal).
    Layout("long", (5, 2, 130, 3, 0), (4, 2, 150, 3, 2)),
]


def _poison_sites(layout, tensor):
    """Tokens to poison (query tokens for q and dout, key tokens for k and v): the first token, which is row 0
    of the first staged block, where lanes past their own keys read; the first token of the longest segment,
    row 0 of the blocks of the tiles inside it, and seen first by each of its rows; its middle, which under
    causal masking the rows before it in its own segment do not see."""
    lengths = layout.lengths_q if tensor in ("q", "dout") else layout.keys
    seg = max(range(len(lengths)), key=lambda s: (lengths[s], -s))
    start = int(offsets_of(lengths)[seg])
    return sorted({0, start, start + lengths[seg] // 2})


def _reach(layout, causal, tensor, tokens, head, num_heads, group):
    """Bool (H, total_q) rows whose out/lse/dq may change and (H_kv, total_k) keys whose dk/dv may change when
    `tensor`[tokens, head] change: rows that attend to them, and every key those rows see."""
    seen = visibility(layout, causal)
    rows = torch.zeros(num_heads, seen.shape[0], dtype=torch.bool)
    if tensor in ("q", "dout"):
        rows[head, tokens] = True
    else:
        rows[head * group : (head + 1) * group] = seen[:, tokens].any(1)
    keys = (rows[:, :, None] & seen[None]).any(1).unflatten(0, (-1, group)).any(1)
    if tensor in ("k", "v"):
        keys[head, tokens] = True
    return rows, keys


def _same_class(got, want):
    """Where `want` is finite, `got` is finite and within half-precision rounding of it; elsewhere `got`
    is the same non-finite value (NaN, +inf or -inf)."""
    got = got.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf])
    if finite.any():
        tol = 2e-2 * want[finite].abs().max().item() + 1e-6
        assert (got[finite] - want[finite]).abs().max().item() <= tol


# (tensor, value): one head of a few tokens (_poison_sites) set to +inf or NaN in every element. Or, for q and
# k, one element set to +inf ("+inf element", as tests/conformance does): the other operand's signs make its
# scores +inf in some rows (NaN, lse = +inf) and -inf in others (weight 0). Or one element set to -inf with
# that element of the other operand made positive ("-inf element"): its scores are all -inf, as a product
# that overflows gives, so a key weighs 0 in its rows even when a row meets it first, and a query whose
# scores are all -inf gets 0/0 = NaN and lse = -inf.
POISONS = [(t, v) for t in ("q", "k", "v", "dout") for v in (math.inf, math.nan)] + [
    (t, v) for t in ("q", "k") for v in ("+inf element", "-inf element")
]


@pytest.mark.parametrize("causal", [False, True, (3, 1)], ids=str)
@pytest.mark.parametrize("layout", ISOLATION_LAYOUTS, ids=[lay.name for lay in ISOLATION_LAYOUTS])
@pytest.mark.parametrize("tensor,value", POISONS, ids=[f"{t}-{v}".replace(" ", "-") for t, v in POISONS])
def test_nonfinite_token_reaches_only_the_rows_that_attend_to_it(emu, tensor, value, layout, causal):
    """Every output, lse and gradient that does not depend on the poisoned token is bit-for-bit the clean
    run's (no 0 * inf from a causally hidden key or one outside a window (3, 1), a key of another segment
    staged in the same block, or a padding lane); the ones that do follow IEEE arithmetic over each row's visible
    keys (the float64 rowwise oracle): NaN where it is NaN, the same infinity where it is infinite, close where
    finite."""
    dtype, h, hk, d = ISOLATION_CONFIG
    q, k, v, cu_q, cu_k, scale = _case(layout, ISOLATION_CONFIG)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    if value == "-inf element":
        other = k if tensor == "q" else q
        other[..., 0] = other[..., 0].abs() + 0.25

    def run(q, k, v, dout):
        out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, causal, scale)
        return (out, lse, *emu_bwd(emu, dout, q, k, v, lse, cu_q, cu_k, causal, scale))

    clean = run(q, k, v, dout)
    assert not any(torch.isnan(t).any() for t in clean) and all(torch.isfinite(t).all() for t in clean[2:])
    tokens, head = _poison_sites(layout, tensor), 1
    inputs = dict(q=q, k=k, v=v, dout=dout)
    inputs[tensor] = inputs[tensor].clone()
    if isinstance(value, str):
        inputs[tensor][tokens, head, 0] = math.inf if value == "+inf element" else -math.inf
    else:
        inputs[tensor][tokens, head] = value
    poisoned = run(**inputs)
    oracle = rowwise_attention(*inputs.values(), layout, causal, scale)

    rows, keys = _reach(layout, causal, tensor, tokens, head, h, h // hk)
    reach = {
        "out": rows.t()[..., None],
        "lse": rows,
        "dq": rows.t()[..., None],
        "dk": keys.t()[..., None],
        "dv": keys.t()[..., None],
    }
    for (name, where), got, before, want in zip(reach.items(), poisoned, clean, oracle):
        where = where.expand_as(got)
        assert torch.equal(got[~where], before[~where]), f"{name}: changed where it cannot depend on the token"
        try:
            _same_class(got[where], want[where])
        except AssertionError as exc:
            raise AssertionError(f"{name}: differs from the float64 rowwise oracle") from exc


# ---------------------------------------------------------------------------------------------------------
# Gradients under a peaky softmax in half precision
# ---------------------------------------------------------------------------------------------------------

# Segments of 16-32 keys, where the old delta = dout . out (out rounded to the dtype) cost dq and dk 3-5x the
# reference's error.
PEAKY = Layout("peaky", (16, 24, 32, 20))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [4.0, 8.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_peaky_softmax_gradients_in_half_precision(emu, dtype, scale, causal):
    """With softmax_scale 4-8 most rows put nearly all weight on a key or two, and dS = P (dP - delta) is a
    small difference of close numbers: delta must be the fp32 sum of P dP the kernel recomputes, not
    dout . out with out rounded to the dtype. Each gradient within 3x the fp32-accumulating reference's own
    error in the dtype (that error is >= 2e-4 here: no floor)."""
    q, k, v, cu_q, cu_k, _ = _case(PEAKY, (dtype, 2, 1, 64))
    out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, causal, scale)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = emu_bwd(emu, dout.to(dtype), q, k, v, lse, cu_q, cu_k, causal, scale)

    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = varlen_attention_reference(*leaves64, cu_q, cu_k, softmax_scale=scale, causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    own, _ = varlen_attention_reference(*leaves, cu_q, cu_k, softmax_scale=scale, causal=causal)
    own_grads = torch.autograd.grad(own, leaves, dout.to(dtype))
    errors = {f"d{name}": (rel_err(g, r), rel_err(o, r)) for name, g, r, o in zip("qkv", grads, ref_grads, own_grads)}
    assert all(kernel <= 3 * reference for kernel, reference in errors.values()), errors


# ---------------------------------------------------------------------------------------------------------
# Offsets past 2^31 elements
# ---------------------------------------------------------------------------------------------------------


def test_head_offsets_past_int32(emu):
    """Head-major views (head stride 2^31 + 8 elements, as a (heads, tokens, head_dim) buffer transposed
    gives once heads x tokens x head_dim >= 2^31) give the same results as contiguous copies: head * stride
    is formed in 64 bits. The views live in one lazily backed mapping (only touched pages cost memory) that
    also maps the 4 GiB an int32 product would wrap to, so a regression reads zeros instead of crashing."""
    layout = Layout("words-and-long", (3, 1, 70, 5))
    dtype, h, d, stride, wrap = torch.bfloat16, 2, 32, 2**31 + 8, 2**31
    total, tensors = sum(layout.lengths_q), 4  # q, k, v, dout
    mapping = mmap.mmap(
        -1,
        (wrap + stride + tensors * total * d) * dtype.itemsize,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
    )
    storage = torch.frombuffer(mapping, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    views = [storage.as_strided((total, h, d), (d, stride, 1), wrap + i * total * d) for i in range(tensors)]
    for view in views:
        view.copy_(torch.randn(total, h, d, generator=gen, dtype=torch.float64))
    dense = [view.contiguous() for view in views]
    cu = offsets_of(layout.lengths_q)
    for causal in (False, True):
        results = []
        for q, k, v, dout in (views, dense):
            out, lse = emu_fwd(emu, q, k, v, cu, cu, causal, 0.2)
            results.append((out, lse, *emu_bwd(emu, dout, q, k, v, lse, cu, cu, causal, 0.2)))
        assert all(torch.equal(a, b) for a, b in zip(*results))


# ---------------------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------------------

WIDE = 2**31 - 1  # wider than any segment; added to a position it overflows int
WINDOW_SIDES = (-1, 0, 1, 2, 5, WIDE)
# Lengths 0 and 1, the CTA's 64 rows and the 64-key block (fp32/bf16, D=32) +-1, one long segment among tiny
# ones, more keys than queries and fewer (bottom-right alignment both ways: windows that start past a
# segment's first keys leave gaps in a tile's union, and rows see no key at all), keys without queries.
WINDOW_LAYOUT = Layout(
    "window-mix",
    (0, 1, 3, 63, 64, 65, 2, 0, 1, 150, 4, 1, 5, 9, 70, 2),
    (0, 1, 7, 60, 64, 66, 2, 5, 0, 170, 1, 3, 2, 9, 40, 6),
)


def _check_against_rowwise(emu, layout, config, mask, rtol):
    """Forward, lse and gradients against the float64 rowwise oracle: ||got - want|| <= rtol(name, want) *
    ||want|| + 1e-6 sqrt(numel). The absolute term is for gradients that vanish: under window (0, 0) a row
    sees one key, P = 1 and dS = P (dP - delta) = 0, but the kernel's P, recomputed from lse, is 1 within
    fp32 rounding."""
    q, k, v, cu_q, cu_k, scale = _case(layout, config)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q.dtype)
    out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, mask, scale)
    grads = emu_bwd(emu, dout, q, k, v, lse, cu_q, cu_k, mask, scale)
    ref_out, ref_lse, *ref_grads = rowwise_attention(q, k, v, dout, layout, mask, scale)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == -math.inf).all()
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-5
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert not torch.isnan(got).any(), f"{name}: an element was never written"
        error = (got.double() - want).norm().item()
        assert error <= rtol(name, want) * want.norm().item() + 1e-6 * want.numel() ** 0.5, name


@pytest.mark.parametrize("right", WINDOW_SIDES)
@pytest.mark.parametrize("left", WINDOW_SIDES)
def test_every_window_matches_the_oracle(emu, left, right):
    """Every (left, right) pair in fp32, GQA, with 64-row tiles and 64-key blocks."""
    _check_against_rowwise(emu, WINDOW_LAYOUT, (torch.float32, 2, 1, 32), (left, right), lambda *_: 1e-5)


WINDOWS = [(2, 1), (0, 0), (5, -1), (-1, 2)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_windows_in_every_dtype_and_head_dim(emu, layout, config, window):
    """Within 2x (outputs) / 3x (gradients) the error of rounding the float64 oracle to the dtype."""
    dtype = config[0]
    factor = {"out": 2, "dq": 3, "dk": 3, "dv": 3}
    _check_against_rowwise(
        emu, layout, config, window, lambda name, want: factor[name] * rel_err(want.to(dtype), want) + FLOOR[dtype]
    )


def test_windows_wider_than_every_segment_are_unbounded(emu):
    """A side of 2^31 - 1 gives bit for bit what -1 gives: the schedule forms position + window in 64 bits."""
    q, k, v, cu_q, cu_k, scale = _case(WINDOW_LAYOUT, (torch.bfloat16, 2, 2, 64))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q.dtype)
    for wide, unbounded in (((WIDE, WIDE), (-1, -1)), ((WIDE, 0), (-1, 0)), ((3, WIDE), (3, -1))):
        runs = []
        for mask in (wide, unbounded):
            out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, mask, scale)
            runs.append((out, lse, *emu_bwd(emu, dout, q, k, v, lse, cu_q, cu_k, mask, scale)))
        assert all(torch.equal(a, b) for a, b in zip(*runs)), wide
