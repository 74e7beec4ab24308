"""csrc/cuda's kernels, run on the CPU: the kernel templates compiled by g++ under an emulation of the CUDA
execution model (tests/cuda_host_emulation.h: fibers for threads, barriers for __syncthreads and the warp
collectives) and checked against the float64 oracles on adversarial layouts: forward, lse, gradients, GQA,
causal, fp32/fp16/bf16, head dims 32/64/128, and dropout against the exact Philox mask. Outputs start as
NaN, so an element a kernel never writes fails the test; a collective that not every lane reaches
deadlocks the emulation, which reports it.

What this does not cover: the GPU's fast-math approximations, its memory model (races, alignment faults)
and performance. tests/test_cuda_backend.py runs the real thing on a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cuda_oracles import dense_attention, keep_mask
from helpers import Layout, adversarial_layouts, offsets_of, random_qkv, rel_err
from hierkern.reference import varlen_attention_reference
from test_cuda_build import CACHE, CSRC_CUDA, _cuda_include

TESTS = Path(__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # hierkern::cuda::DType

pytestmark = pytest.mark.skipif(CXX is None or _cuda_include() is None,
                                reason="needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h)")


@pytest.fixture(scope="module")
def emu():
    sources = [TESTS / "cuda_emulation_harness.cpp", TESTS / "cuda_host_emulation.h",
               *sorted(CSRC_CUDA.iterdir())]
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = CACHE / f"emulation-{digest}" / "libhkemu.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        private = lib.with_suffix(f".{os.getpid()}.so")  # renamed into place: concurrent runs never load half a file
        # No _FORTIFY_SOURCE: its longjmp check rejects the switches between fiber stacks.
        subprocess.run([CXX, "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-Wall", "-Wextra",
                        "-Werror", "-Wno-unknown-pragmas", "-I", str(TESTS), "-I", str(CSRC_CUDA), "-isystem",
                        str(_cuda_include()), str(sources[0]), "-o", str(private)], check=True)
        os.replace(private, lib)
    handle = ctypes.CDLL(str(lib))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    common = [i32] * 7 + [ptr] * 5 + [ctypes.c_float, i32, ctypes.c_float, ctypes.c_ulonglong, ctypes.c_ulonglong]
    handle.emu_varlen_fwd.argtypes = common + [ptr, ptr]
    handle.emu_varlen_bwd.argtypes = common + [ptr] * 7
    return handle


def _common(q, k, v, cu_q, cu_k, causal, scale, p, seed, offset):
    return (DTYPE_CODES[q.dtype], q.shape[2], q.shape[1], k.shape[1], q.shape[0], k.shape[0], cu_q.numel() - 1,
            q.data_ptr(), k.data_ptr(), v.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr(), scale, int(causal), p,
            seed, offset)


def emu_fwd(lib, q, k, v, cu_q, cu_k, causal, scale, p=0.0, seed=0, offset=0):
    out = torch.full_like(q, math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan)
    err = lib.emu_varlen_fwd(*_common(q, k, v, cu_q, cu_k, causal, scale, p, seed, offset), out.data_ptr(),
                             lse.data_ptr())
    assert err == 0, f"emulated forward failed (cudaError {err}: 719 is a deadlock)"
    return out, lse


def emu_bwd(lib, dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, p=0.0, seed=0, offset=0):
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    delta = torch.full((q.shape[1], q.shape[0]), math.nan)
    err = lib.emu_varlen_bwd(*_common(q, k, v, cu_q, cu_k, causal, scale, p, seed, offset), dout.data_ptr(),
                             out.data_ptr(), lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                             dv.data_ptr())
    assert err == 0, f"emulated backward failed (cudaError {err}: 719 is a deadlock)"
    return dq, dk, dv


_ADVERSARIAL = {lay.name: lay for lay in adversarial_layouts(tile=64)}
LAYOUTS = [
    _ADVERSARIAL["empty-and-one"], _ADVERSARIAL["tile-boundaries"], _ADVERSARIAL["cross-unequal"],
    _ADVERSARIAL["words"], _ADVERSARIAL["all-empty"],
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
    q, k, v = random_qkv(layout, h, hk, d, dtype=dtype, generator=torch.Generator().manual_seed(0),
                         requires_grad=requires_grad)
    return q, k, v, offsets_of(layout.lengths_q), offsets_of(layout.keys), 0.7 / math.sqrt(d)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_forward_and_gradients_match_the_oracle(emu, layout, config, causal):
    q, k, v, cu_q, cu_k, scale = _case(layout, config, requires_grad=True)
    dtype = q.dtype
    out, lse = emu_fwd(emu, q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal, scale)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = emu_bwd(emu, dout.to(dtype), q.detach(), k.detach(), v.detach(), out, lse, cu_q, cu_k, causal, scale)

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


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_the_exact_philox_mask(emu, causal):
    """Forward and both backward passes apply the same mask, the one tests/cuda_oracles.py rebuilds."""
    layout = _ADVERSARIAL["cross-unequal"]
    p, seed, offset = 0.25, 2**40 + 17, 99
    q, k, v, cu_q, cu_k, scale = _case(layout, (torch.float32, 4, 2, 64))
    out, lse = emu_fwd(emu, q, k, v, cu_q, cu_k, causal, scale, p, seed, offset)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = emu_bwd(emu, dout.float(), q, k, v, out, lse, cu_q, cu_k, causal, scale, p, seed, offset)

    keep = keep_mask(seed, offset, q.shape[1], q.shape[0], k.shape[0], p).double()
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves64, layout, causal, scale, keep, p)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    _, ref_lse = varlen_attention_reference(*leaves64, cu_q, cu_k, softmax_scale=scale, causal=causal)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-5  # lse ignores dropout
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, f"d{name}"
    no_drop, _ = emu_fwd(emu, q, k, v, cu_q, cu_k, causal, scale)
    assert rel_err(out, no_drop) > 0.05  # the mask did something
