"""hierkern.varlen_attention: Segments as cu_seqlens, return_lse, backend selection and refusal, explain(), and
torch.compile friendliness of the validation. The argument checks that every backend shares are in
tests/conformance/test_inputs.py."""

import pytest
import torch

import hierkern
from hierkern import AttentionCall, Segments, backends, varlen_attention
from hierkern.reference import varlen_attention_reference

from helpers import Layout, adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err

LENGTHS_Q = (3, 0, 4, 1)
LENGTHS_K = (2, 5, 0, 3)


def _args(num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float32):
    """Valid cross-attention arguments (keys shorter and longer than queries, empty segments)."""
    q, k, v = random_qkv(
        Layout("cross", LENGTHS_Q, LENGTHS_K),
        num_heads,
        num_kv_heads,
        head_dim,
        dtype=dtype,
        generator=torch.Generator().manual_seed(0),
    )
    return dict(q=q, k=k, v=v, cu_seqlens_q=offsets_of(LENGTHS_Q), cu_seqlens_k=offsets_of(LENGTHS_K))


class FakeBackend(backends.Backend):
    """A backend that records its calls and returns ``2 * q`` and a zero lse (compile-friendly)."""

    def __init__(self, name, priority=100, device_types=("cpu", "cuda"), refuse=None, unavailable=None):
        self.name, self.priority = name, priority
        self.capabilities = backends.Capabilities(devices=device_types, dtypes=(torch.float32, torch.float64))
        self.refuse, self.unavailable, self.calls = refuse, unavailable, []

    def unavailable_reason(self):
        return self.unavailable

    def why_not(self, call):
        return self.refuse

    def __call__(self, args):
        self.calls.append(
            dict(
                cu_seqlens_q=args.cu_seqlens_q,
                cu_seqlens_k=args.cu_seqlens_k,
                max_seqlen_q=args.max_seqlen_q,
                max_seqlen_k=args.max_seqlen_k,
                softmax_scale=args.softmax_scale,
                causal=args.window_size == (-1, 0),
                window_size=args.window_size,
                dropout_p=args.dropout_p,
            )
        )
        return args.q * 2, args.q.new_zeros(args.q.shape[1], args.q.shape[0], dtype=torch.float32)


@pytest.fixture
def registry(monkeypatch):
    """An empty backend registry for the test (restored afterwards); register fakes with ``add``."""
    monkeypatch.setattr(backends, "_REGISTRY", {})

    def add(*fakes):
        for fake in fakes:
            backends.register_backend(fake)
        return fakes[0] if len(fakes) == 1 else fakes

    return add


# -- results --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("layout", adversarial_layouts(), ids=lambda l: l.name)
def test_matches_oracle(layout, backend):
    q, k, v = random_qkv(layout, 4, 2, 16, generator=torch.Generator().manual_seed(1))
    cu_q, cu_k = offsets_of(layout.lengths_q), offsets_of(layout.keys)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True, backend=backend)
    out_ref, lse_ref = oracle_attention(q, k, v, cu_q, cu_k, causal=True)
    assert rel_err(out, out_ref) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    if finite.any():
        assert (lse[finite].double() - lse_ref[finite]).abs().max().item() < 1e-4


def test_reference_backend_is_the_reference_and_differentiable():
    args = _args(dtype=torch.float64)
    for t in ("q", "k", "v"):
        args[t].requires_grad_()
    out, lse = varlen_attention(**args, softmax_scale=0.3, causal=True, return_lse=True, backend="reference")
    out_ref, lse_ref = varlen_attention_reference(*args.values(), softmax_scale=0.3, causal=True)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    grads = torch.autograd.grad(out.sum(), (args["q"], args["k"], args["v"]))
    grads_ref = torch.autograd.grad(out_ref.sum(), (args["q"], args["k"], args["v"]))
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_return_lse_shapes_and_dtypes(dtype):
    args = _args(num_heads=6, num_kv_heads=3, head_dim=5, dtype=dtype)
    total_q = sum(LENGTHS_Q)
    out = varlen_attention(**args, backend="reference")
    assert isinstance(out, torch.Tensor) and out.shape == (total_q, 6, 5) and out.dtype == dtype
    result = varlen_attention(**args, return_lse=True, backend="reference")
    assert isinstance(result, tuple) and len(result) == 2
    out2, lse = result
    assert out2.shape == (total_q, 6, 5) and out2.dtype == dtype
    assert lse.shape == (6, total_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(out, out2)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_segments_accepted_as_cu_seqlens():
    args = _args()
    expected = varlen_attention(**args, causal=True, backend="reference")
    seg_q, seg_k = Segments.from_lengths(list(LENGTHS_Q)), Segments.from_lengths(list(LENGTHS_K))
    q, k, v = args["q"], args["k"], args["v"]
    for cu_q, cu_k in (
        (seg_q, seg_k),
        (seg_q, args["cu_seqlens_k"]),
        (args["cu_seqlens_q"], seg_k),
        (args["cu_seqlens_q"].long(), args["cu_seqlens_k"].long()),
    ):
        assert torch.equal(varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="reference"), expected)


def test_self_attention_defaults_and_forwarded_arguments(registry):
    """cu_seqlens_k=None reuses the query offsets; the backend gets int32 offsets, host max_seqlens taken
    from a Segments or read from CPU offsets, the default scale 1/sqrt(D) and float dropout."""
    fake = registry(FakeBackend("fake"))
    q, k, v = random_qkv(Layout("self", (3, 0, 6)), 2, 1, 16)
    seg = Segments.from_lengths([3, 0, 6])
    varlen_attention(q, k, v, seg, dropout_p=0, backend="fake")
    varlen_attention(q, k, v, seg.offsets.long(), causal=True, backend="fake")
    varlen_attention(q, k, v, seg, max_seqlen_q=7, max_seqlen_k=8, softmax_scale=2, backend="fake")
    first, second, third = fake.calls
    for call in fake.calls:
        assert call["cu_seqlens_q"].dtype == torch.int32 and torch.equal(call["cu_seqlens_q"], seg.offsets)
        assert torch.equal(call["cu_seqlens_k"], seg.offsets)
        assert type(call["softmax_scale"]) is float and type(call["dropout_p"]) is float
    assert (first["max_seqlen_q"], first["max_seqlen_k"], first["softmax_scale"]) == (6, 6, 0.25)
    assert (second["max_seqlen_q"], second["max_seqlen_k"], second["causal"]) == (6, 6, True)
    assert (third["max_seqlen_q"], third["max_seqlen_k"], third["softmax_scale"]) == (7, 8, 2.0)


# -- validation -----------------------------------------------------------------------------------------


def _bad_cases():
    """Arguments every backend sees alike are refused in tests/conformance/test_inputs.py, once per backend; what
    remains here is the choice of backend itself."""
    return [
        (
            "backend-unknown",
            dict(backend="flash"),
            ValueError,
            r"backend must be 'auto' or one of \[.*'reference'.*\], got 'flash'",
        ),
        ("backend-int", dict(backend=0), TypeError, r"backend must be a str, got int"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("changes, error, match", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_arguments_raise_naming_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        varlen_attention(**{"backend": "reference", **_args(), **changes})


def test_self_attention_max_seqlen_k_is_validated():
    q, k, v = random_qkv(Layout("self", (3, 5)), 2, 2, 4)
    cu = offsets_of((3, 5))
    with pytest.raises(ValueError, match=r"max_seqlen_k=4 is smaller than the longest segment"):
        varlen_attention(q, k, v, cu, max_seqlen_k=4)
    with pytest.raises(TypeError, match=r"max_seqlen_k must be a Python int"):
        varlen_attention(q, k, v, cu, max_seqlen_k="5")


def test_upper_bound_max_seqlen_is_accepted():
    # max_seqlen is an upper bound (as in FlashAttention): larger values are legal and change nothing.
    args = _args()
    expected = varlen_attention(**args, causal=True, backend="reference")
    out = varlen_attention(**args, max_seqlen_q=100, max_seqlen_k=7, causal=True, backend="reference")
    assert torch.equal(out, expected)


# -- backends -------------------------------------------------------------------------------------------


def test_registry_lists_the_reference():
    assert "reference" in hierkern.backend_names()
    assert "reference" in hierkern.available_backends()
    assert "reference" in hierkern.available_backends("cpu")
    assert hierkern.available_backends("no-such-device") == []


def test_named_backend_that_refuses_raises_with_its_reason(registry):
    registry(
        FakeBackend("picky", refuse="it supports head_dim <= 128 only, got 129"),
        FakeBackend("absent", unavailable="the hierkern._C extension was not built"),
    )
    with pytest.raises(ValueError, match=r"backend 'picky' cannot run this call: it supports head_dim <= 128"):
        varlen_attention(**_args(), backend="picky")
    with pytest.raises(ValueError, match=r"backend 'absent' cannot run this call: the hierkern._C extension"):
        varlen_attention(**_args(), backend="absent")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['absent', 'picky'\]"):
        varlen_attention(**_args(), backend="reference")


def test_auto_takes_the_highest_priority_backend_that_accepts(registry):
    high, mid, low, absent, gpu_only = registry(
        FakeBackend("high", priority=30, refuse="it does not do GQA"),
        FakeBackend("mid", priority=20),
        FakeBackend("low", priority=10),
        FakeBackend("absent", priority=50, unavailable="no GPU"),
        FakeBackend("gpu-only", priority=40, device_types=("cuda",), refuse="q is on cpu"),
    )
    out = varlen_attention(**_args(), backend="auto")
    assert len(mid.calls) == 1 and not (high.calls or low.calls or absent.calls or gpu_only.calls)
    assert torch.equal(out, 2 * _args()["q"])


def test_auto_with_no_willing_backend_lists_every_reason(registry):
    registry(FakeBackend("a", refuse="reason A"), FakeBackend("b", unavailable="reason B"))
    with pytest.raises(ValueError, match=r"no backend supports this call \(.*a: reason A.*b: reason B"):
        varlen_attention(**_args())


def test_register_backend_rejects_duplicates(registry):
    registry(FakeBackend("twin"))
    with pytest.raises(ValueError, match=r"backend named 'twin' is already registered"):
        backends.register_backend(FakeBackend("twin"))


def test_explain_returns_a_reason_per_backend(registry):
    registry(
        FakeBackend("ok", priority=1),
        FakeBackend("picky", priority=2, refuse="causal is not supported"),
        FakeBackend("absent", priority=3, unavailable="triton is not installed"),
    )
    args = _args()
    call = AttentionCall.of(args["q"], args["k"], args["v"], 4, 5, causal=True)
    reasons = hierkern.explain(call)
    assert list(reasons) == ["absent", "picky", "ok"]  # priority order
    assert reasons == {"absent": "triton is not installed", "picky": "causal is not supported", "ok": None}


def test_explain_with_the_real_registry():
    args = _args()
    call = AttentionCall.of(args["q"], args["k"], args["v"], 4, 5)
    reasons = hierkern.explain(call)
    assert set(reasons) == set(hierkern.backend_names())
    assert reasons["reference"] is None
    assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())


def test_attention_call_describes_the_call():
    args = _args(num_heads=6, num_kv_heads=3, head_dim=5, dtype=torch.bfloat16)
    q, k, v = args["q"], args["k"], args["v"]
    call = AttentionCall.of(q, k, v, 4, 5, causal=True, dropout_p=0.1)
    assert (call.device_type, call.dtype, call.head_dim, call.num_heads, call.num_kv_heads) == (
        "cpu",
        torch.bfloat16,
        5,
        6,
        3,
    )
    assert (call.max_seqlen_q, call.max_seqlen_k, call.causal, call.dropout, call.requires_grad) == (
        4,
        5,
        True,
        True,
        False,
    )
    k.requires_grad_()
    assert AttentionCall.of(q, k, v, 4, 5).requires_grad
    with torch.no_grad():
        assert not AttentionCall.of(q, k, v, 4, 5).requires_grad
    assert not AttentionCall.of(q, k, v, 4, 5).dropout


# -- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_validation_does_not_break_fullgraph_compile(registry, dynamic):
    """With a compile-friendly backend, varlen_attention traces into one graph: validation reads no tensor
    values while compiling (given Segments or explicit max_seqlen)."""
    fake = registry(FakeBackend("fake"))
    args = _args()
    seg_q, seg_k = Segments.from_lengths(list(LENGTHS_Q)), Segments.from_lengths(list(LENGTHS_K))

    def with_segments(q, k, v):
        return varlen_attention(q, k, v, seg_q, seg_k, causal=True, backend="fake")

    def with_offsets(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=0.5, return_lse=True, backend="auto")

    torch._dynamo.reset()
    compiled = torch.compile(with_segments, backend="eager", fullgraph=True, dynamic=dynamic)
    assert torch.equal(compiled(args["q"], args["k"], args["v"]), 2 * args["q"])
    compiled = torch.compile(with_offsets, backend="eager", fullgraph=True, dynamic=dynamic)
    out, lse = compiled(*args.values(), 4, 5)
    assert torch.equal(out, 2 * args["q"]) and lse.shape == (4, 8)
    assert fake.calls and all(call["max_seqlen_k"] == 5 for call in fake.calls)


# -- CUDA -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_validation_is_sync_free(registry):
    """With Segments (or explicit max_seqlen) validation and dispatch never synchronise the device."""
    registry(FakeBackend("fake"))
    args = {name: t.cuda() for name, t in _args().items()}
    seg_q = Segments.from_lengths(list(LENGTHS_Q), device="cuda")
    seg_k = Segments.from_lengths(list(LENGTHS_K), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_attention(args["q"], args["k"], args["v"], seg_q, seg_k, causal=True, backend="fake")
        varlen_attention(**args, max_seqlen_q=4, max_seqlen_k=5, backend="fake")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reference_backend_matches_oracle():
    layout = adversarial_layouts()[6]
    q, k, v = random_qkv(layout, 4, 2, 16, device="cuda", generator=torch.Generator().manual_seed(2))
    cu_q, cu_k = offsets_of(layout.lengths_q, "cuda"), offsets_of(layout.keys, "cuda")
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="reference")
    out_ref, _ = oracle_attention(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=True)
    assert out.device.type == "cuda" and rel_err(out, out_ref) < 1e-5
