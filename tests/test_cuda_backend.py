"""What is specific to the ``"cuda"`` backend (csrc/cuda) on a GPU: dropout against an exact float64 model of
the kernel's Philox mask, strided and misaligned inputs, offsets of any stride through the raw ops, inf/NaN
isolation per head against the emulation suite's oracle, a 20k-word run, opcheck, torch.compile, refusals, and
a compute-sanitizer run. The contract every backend shares (layouts, dtypes, lse, gradients, determinism,
NaN-filled outputs, peaky half-precision gradients) is tests/conformance, which runs this backend on a GPU.
Skipped without a CUDA GPU; when the GPU is there but hierkern._C lacks CUDA kernels, the fixture JIT-builds
csrc/cuda (a build failure is an error, not a skip).

Run on a GPU machine: ``pytest tests/test_cuda_backend.py -q`` (add ``-m slow`` runs for the sanitizer).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_cuda_emulation import (
    FLOOR as EMULATION_FLOOR,
)
from test_cuda_emulation import (
    ISOLATION_CONFIG,
    ISOLATION_LAYOUTS,
    POISONS,
    WINDOW_LAYOUT,
    _poison_sites,
    _reach,
    _same_class,
)

import hierkern
from hierkern.backends import AttentionCall, explain, get_backend
from hierkern.reference import varlen_attention_reference

from cuda_oracles import dense_attention, keep_mask, rowwise_attention, window_of
from helpers import Layout, adversarial_layouts, offsets_of, random_qkv, rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYOUTS = adversarial_layouts(tile=64) + [
    Layout("row-tile-boundaries", (15, 16, 17, 31, 32, 33, 1, 65)),
    Layout("long-cross", (300, 2, 0), (257, 0, 3)),
]
# Slack over 2x the reference's own error, for the case where that error is ~0.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    backend = get_backend("cuda")
    if backend.unavailable_reason() is not None:
        from hierkern.ops.cuda_attention import load_jit

        load_jit()
    assert backend.unavailable_reason() is None, backend.unavailable_reason()


def _inputs(layout, heads, dtype, requires_grad=False, seed=0):
    h, hk, d = heads
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(layout, h, hk, d, dtype=dtype, device="cuda", generator=gen, requires_grad=requires_grad)
    return q, k, v, offsets_of(layout.lengths_q, "cuda"), offsets_of(layout.keys, "cuda")


@pytest.mark.parametrize("causal", [False, True, (2, 1)], ids=str)
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[6], LAYOUTS[7]], ids=lambda lay: lay.name)
def test_dropout_matches_philox_model_exactly(layout, causal):
    """Forward and gradients under dropout against a float64 model that applies the kernel's own mask
    (rebuilt by tests/cuda_oracles.py): the mask is the same in the forward and both backward passes."""
    heads, p, seed, offset = (4, 2, 64), 0.3, 123456789, 42
    q, k, v, cu_q, cu_k = _inputs(layout, heads, torch.float32, requires_grad=True)
    rng_state = torch.tensor([seed, offset], dtype=torch.int64)
    out, lse = torch.ops.hierkern.varlen_fwd(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(layout.lengths_q),
        max(layout.keys),
        1 / math.sqrt(64),
        *window_of(causal),
        p,
        rng_state,
    )
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout.to("cuda", torch.float32))

    keep = keep_mask(seed, offset, q.shape[1], q.shape[0], k.shape[0], p).double()
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves64, layout, causal, 1 / math.sqrt(64), keep, p)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    assert rel_err(out, ref) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, f"d{name}"
    # The same rng_state draws the same mask; another offset draws another.
    again, _ = torch.ops.hierkern.varlen_fwd(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(layout.lengths_q),
        max(layout.keys),
        1 / math.sqrt(64),
        *window_of(causal),
        p,
        rng_state,
    )
    assert torch.equal(out, again)


def test_dropout_through_the_api_is_seeded_by_torch():
    layout = LAYOUTS[7]
    q, k, v, cu_q, cu_k = _inputs(layout, (4, 4, 64), torch.bfloat16, requires_grad=True)

    def run():
        torch.manual_seed(7)
        out = hierkern.varlen_attention(
            q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), dropout_p=0.2, backend="cuda"
        )
        return out, torch.autograd.grad(out.float().square().sum(), (q, k, v))

    (out1, grads1), (out2, grads2) = run(), run()
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    torch.manual_seed(8)
    other = hierkern.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.2, backend="cuda")
    assert not torch.equal(other, out1)


def test_strided_and_misaligned_inputs_match_contiguous():
    """A packed qkv projection's views (head stride != D, token stride 3*H*D) run in place; a view whose
    rows are not 16-byte aligned is copied by the binding, with the same result."""
    layout = LAYOUTS[7]
    total, h, d = sum(layout.lengths_q), 4, 64
    qkv = torch.randn(total, 3, h, d, device="cuda", dtype=torch.float16)
    q, k, v = qkv.unbind(1)
    cu = offsets_of(layout.lengths_q, "cuda")
    out = hierkern.varlen_attention(q, k, v, cu, backend="cuda")
    expect = hierkern.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, backend="cuda")
    assert torch.equal(out, expect)
    flat = torch.randn(total * h * d + 1, device="cuda", dtype=torch.float16)
    shifted = flat[1:].view(total, h, d)  # storage offset of one element: rows 2 bytes off alignment
    out = hierkern.varlen_attention(shifted, shifted, shifted, cu, backend="cuda")
    c = shifted.clone()  # a fresh, aligned allocation
    assert torch.equal(out, hierkern.varlen_attention(c, c, c, cu, backend="cuda"))


def test_offsets_of_any_stride():
    """cu_seqlens views with a stride (here 2) are valid offsets: the binding reads a contiguous copy in the
    forward and the backward, through the API and through the raw ops."""
    strided = torch.tensor([0, 0, 3, 3, 8, 8, 9, 9, 9, 9, 13, 13], dtype=torch.int32, device="cuda")[::2]
    dense = strided.contiguous()
    assert strided.stride(0) == 2 and dense.tolist() == [0, 3, 8, 9, 9, 13]
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(13, 4, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn(13, 4, 64, generator=gen).to("cuda", torch.bfloat16)
    for causal in (False, True):
        runs = []
        for cu in (strided, dense):
            out = hierkern.varlen_attention(q, k, v, cu, causal=causal, backend="cuda")
            runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        args = (q.detach(), k.detach(), v.detach())
        fwd = [
            torch.ops.hierkern.varlen_fwd(*args, cu, cu, 5, 5, 0.125, *window_of(causal), 0.0, None)
            for cu in (strided, dense)
        ]
        assert all(torch.equal(a, b) for a, b in zip(*fwd))
        bwd = [
            torch.ops.hierkern.varlen_bwd(dout, *args, *fwd[1], cu, cu, 5, 5, 0.125, *window_of(causal), 0.0, None)
            for cu in (strided, dense)
        ]
        assert all(torch.equal(a, b) for a, b in zip(*bwd))


@pytest.mark.parametrize("causal", [False, True, (3, 1)], ids=str)
@pytest.mark.parametrize("layout", ISOLATION_LAYOUTS, ids=[lay.name for lay in ISOLATION_LAYOUTS])
@pytest.mark.parametrize("tensor,value", POISONS, ids=[f"{t}-{v}".replace(" ", "-") for t, v in POISONS])
def test_nonfinite_token_reaches_only_the_rows_that_attend_to_it(tensor, value, layout, causal):
    """tests/test_cuda_emulation.py's isolation test on the GPU (fast-math exp2/log2/reciprocal included):
    what cannot depend on the poisoned tokens is bit-for-bit the clean run's; the rest follows the float64
    rowwise oracle's NaN/inf pattern."""
    dtype, h, hk, d = ISOLATION_CONFIG
    q, k, v, cu_q, cu_k = _inputs(layout, (h, hk, d), dtype)
    scale = 0.7 / math.sqrt(d)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", dtype)
    if value == "-inf element":
        other = k if tensor == "q" else q
        other[..., 0] = other[..., 0].abs() + 0.25
    max_q, max_k = max(layout.lengths_q), max(layout.keys)

    def run(q, k, v, dout):
        window = window_of(causal)
        out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, *window, 0.0, None)
        grads = torch.ops.hierkern.varlen_bwd(
            dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, *window, 0.0, None
        )
        return [t.cpu() for t in (out, lse, *grads)]

    clean = run(q, k, v, dout)
    tokens, head = _poison_sites(layout, tensor), 1
    inputs = dict(q=q, k=k, v=v, dout=dout)
    inputs[tensor] = inputs[tensor].clone()
    if isinstance(value, str):
        inputs[tensor][tokens, head, 0] = math.inf if value == "+inf element" else -math.inf
    else:
        inputs[tensor][tokens, head] = value
    poisoned = run(**inputs)
    oracle = rowwise_attention(*(t.cpu() for t in inputs.values()), layout, causal, scale)
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


@pytest.mark.parametrize("window", [(0, 0), (2, 1), (5, -1), (-1, 2), (2**31 - 1, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_windows_against_the_rowwise_oracle(dtype, window):
    """tests/test_cuda_emulation.py's window layout on the GPU, within 2x (outputs) / 3x (gradients) the error
    of rounding the float64 oracle to the dtype, plus 1e-6 per element where a gradient vanishes."""
    q, k, v, cu_q, cu_k = _inputs(WINDOW_LAYOUT, (4, 2, 64), dtype)
    scale = 0.7 / math.sqrt(64)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", dtype)
    max_q, max_k = max(WINDOW_LAYOUT.lengths_q), max(WINDOW_LAYOUT.keys)
    out, lse = torch.ops.hierkern.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, *window, 0.0, None)
    grads = torch.ops.hierkern.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, *window, 0.0, None)
    ref_out, ref_lse, *ref_grads = rowwise_attention(
        q.cpu(), k.cpu(), v.cpu(), dout.cpu(), WINDOW_LAYOUT, window, scale
    )
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite) and (lse.cpu()[~finite] == -math.inf).all()
    assert (lse.cpu().double()[finite] - ref_lse[finite]).abs().max().item() < 1e-4
    for name, factor, got, want in zip(("out", "dq", "dk", "dv"), (2, 3, 3, 3), (out, *grads), (ref_out, *ref_grads)):
        rtol = factor * rel_err(want.to(dtype), want) + EMULATION_FLOOR[dtype]
        error = (got.cpu().double() - want).norm().item()
        assert error <= rtol * want.norm().item() + 1e-6 * want.numel() ** 0.5, name


def test_many_words_and_one_long_segment_against_reference():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 12, (20000,), generator=gen).tolist() + [1500]
    cu = offsets_of(lengths, "cuda")
    cuda_gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(sum(lengths), 8, 64, device="cuda", generator=cuda_gen).to(torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        out = hierkern.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, backend="cuda")
        hi, _ = varlen_attention_reference(q.float(), k.float(), v.float(), cu, cu, causal=causal)
        own, _ = varlen_attention_reference(q, k, v, cu, cu, causal=causal)
        assert rel_err(out, hi) <= 2 * rel_err(own, hi) + FLOOR[torch.bfloat16]


@pytest.mark.parametrize("causal", [False, True, (2, 1)], ids=str)
def test_opcheck(causal):
    for layout in (LAYOUTS[0], LAYOUTS[6]):
        q, k, v, cu_q, cu_k = _inputs(layout, (4, 2, 32), torch.float16, requires_grad=True)
        args = (q, k, v, cu_q, cu_k, max(layout.lengths_q), max(layout.keys), 0.2, *window_of(causal), 0.0, None)
        torch.library.opcheck(torch.ops.hierkern.varlen_fwd.default, args)
        out, lse = torch.ops.hierkern.varlen_fwd(*args)
        dout = torch.randn_like(out)
        bwd_args = (
            dout,
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse,
            cu_q,
            cu_k,
            max(layout.lengths_q),
            max(layout.keys),
            0.2,
            *window_of(causal),
            0.0,
            None,
        )
        torch.library.opcheck(torch.ops.hierkern.varlen_bwd.default, bwd_args)


def test_torch_compile_fullgraph_matches_eager():
    layout = LAYOUTS[7]
    q, k, v, cu_q, cu_k = _inputs(layout, (4, 4, 64), torch.bfloat16, requires_grad=True)
    max_len = max(layout.lengths_q)

    def f(q, k, v):
        return hierkern.varlen_attention(q, k, v, cu_q, cu_k, max_len, max_len, causal=True, backend="cuda")

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(eager, compiled)
    g = torch.randn_like(eager)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(eager, (q, k, v), g), torch.autograd.grad(compiled, (q, k, v), g))
    )


def test_refusals_and_priority():
    backend = get_backend("cuda")

    def call(**changes):
        fields = dict(
            device_type="cuda",
            dtype=torch.bfloat16,
            head_dim=64,
            num_heads=8,
            num_kv_heads=8,
            max_seqlen_q=8,
            max_seqlen_k=8,
            causal=False,
            dropout=False,
            requires_grad=True,
        )
        fields.update(changes)
        return AttentionCall(**fields)

    assert backend.why_not(call()) is None
    assert backend.why_not(call(dropout=True, causal=True)) is None
    assert "float64" in backend.why_not(call(dtype=torch.float64))
    assert "head_dim" in backend.why_not(call(head_dim=80))
    assert "cpu" in backend.why_not(call(device_type="cpu"))
    assert explain(call())["cuda"] is None
    # Unmeasured: "auto" must keep preferring Triton wherever Triton accepts the call.
    assert backend.priority < get_backend("triton").priority
    q = torch.randn(4, 2, 80, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        hierkern.varlen_attention(q, q, q, offsets_of([4], "cuda"), backend="cuda")


def test_op_rejects_bad_arguments():
    q = torch.randn(5, 2, 64, device="cuda", dtype=torch.float16)
    cu = offsets_of([5], "cuda")
    fwd = torch.ops.hierkern.varlen_fwd
    with pytest.raises(ValueError, match="rng_state"):
        fwd(q, q, q, cu, cu, 5, 5, 0.125, -1, -1, 0.1, None)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        fwd(q, q, q, cu.long(), cu, 5, 5, 0.125, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match="head_dim"):
        fwd(q[..., :48], q[..., :48], q[..., :48], cu, cu, 5, 5, 0.125, -1, -1, 0.0, None)
    with pytest.raises(TypeError, match="dtype"):
        fwd(q, q.float(), q, cu, cu, 5, 5, 0.125, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match="window_left"):
        fwd(q, q, q, cu, cu, 5, 5, 0.125, -2, 0, 0.0, None)
    with pytest.raises(ValueError, match="window_right"):
        fwd(q, q, q, cu, cu, 5, 5, 0.125, 3, -5, 0.0, None)
    no_segments = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="no segment"):
        fwd(q, q, q, no_segments, no_segments, 0, 0, 0.125, -1, -1, 0.0, None)


_SANITIZER_CASE = """
import torch, hierkern
from hierkern.ops.cuda_attention import load_jit
load_jit()
lengths = [0, 1, 3, 63, 64, 65, 5, 2, 0, 130]
cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
keys = [2, 1, 9, 60, 70, 64, 0, 2, 5, 150]
cu_k = torch.tensor([0] + torch.tensor(keys).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
for dtype, d in ((torch.bfloat16, 64), (torch.float32, 128), (torch.float16, 32)):
    q = torch.randn(cu[-1].item(), 4, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(cu[-1].item(), 2, d, device="cuda", dtype=dtype, requires_grad=True)
    for causal in (False, True):
        out = hierkern.varlen_attention(q, k, k, cu, causal=causal, dropout_p=0.1, backend="cuda")
        out.float().sum().backward()
    # Windows through the raw ops, with more keys than queries and keys without queries: the tiles' unions
    # have gaps (slots mapped by search).
    x = torch.randn(sum(keys), 2, d, device="cuda", dtype=dtype)
    rng_state = torch.tensor([1, 2], dtype=torch.int64)
    for window in ((3, 1), (0, 2)):
        out, lse = torch.ops.hierkern.varlen_fwd(q, x, x, cu, cu_k, 130, 150, 0.125, *window, 0.1, rng_state)
        torch.ops.hierkern.varlen_bwd(out, q, x, x, out, lse, cu, cu_k, 130, 150, 0.125, *window, 0.1, rng_state)
torch.cuda.synchronize()
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer") or next(
        (
            p
            for p in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda-13.0/bin/compute-sanitizer")
            if os.path.exists(p)
        ),
        None,
    )
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    result = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "-c", _SANITIZER_CASE],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout
