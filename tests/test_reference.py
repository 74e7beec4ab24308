"""hierkern.reference against the float64 loop oracle and an independent dense float64 formulation:
adversarial layouts, causal (bottom-right), GQA/MQA, odd head dims, scales, lse, gradients, low precision,
dropout and a 100k-token run."""

import math
import random

import pytest
import torch

from hierkern.reference import varlen_attention_reference

from helpers import Layout, adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err

LAYOUTS = adversarial_layouts()
LAYOUT_IDS = [layout.name for layout in LAYOUTS]
# (H, H_kv, D): MHA, GQA, MQA, odd head dims.
HEADS = [(2, 2, 8), (4, 2, 17), (4, 1, 3), (3, 3, 33)]
HEAD_IDS = [f"H{h}-Hkv{hk}-D{d}" for h, hk, d in HEADS]


def _offsets(layout):
    return offsets_of(layout.lengths_q), offsets_of(layout.keys)


def _dense_attention(q, k, v, layout, softmax_scale=None, causal=False):
    """Differentiable float64 attention over all tokens at once with a block-diagonal (and causal) mask:
    shares no code with the reference, so its autograd gradients are an independent oracle."""
    lengths_q = torch.tensor(layout.lengths_q)
    lengths_k = torch.tensor(layout.keys)
    num_segments = len(layout.lengths_q)
    ids_q = torch.repeat_interleave(torch.arange(num_segments), lengths_q)
    ids_k = torch.repeat_interleave(torch.arange(num_segments), lengths_k)
    pos_q = torch.arange(len(ids_q)) - offsets_of(layout.lengths_q)[:-1].long()[ids_q]
    pos_k = torch.arange(len(ids_k)) - offsets_of(layout.keys)[:-1].long()[ids_k]
    allowed = ids_q[:, None] == ids_k[None, :]
    if causal:
        shift = (lengths_k - lengths_q)[ids_q]
        allowed &= pos_k[None, :] <= pos_q[:, None] + shift[:, None]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * scale
    has_keys = allowed.any(-1)[None, :, None]
    # Rows without keys get finite dummy scores, then are zeroed: no NaN in the forward or the backward.
    scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_keys, 0.0)
    probs = torch.softmax(scores, -1) * has_keys
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1))


def _check_lse(lse, lse_ref, atol):
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any()
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == -math.inf).all()
    if finite.any():
        assert (lse.double()[finite] - lse_ref[finite]).abs().max().item() < atol


# -- forward vs the loop oracle -------------------------------------------------------------------------


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_matches_oracle(layout, causal, heads):
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(layout, *heads, dtype=torch.float64, generator=gen)
    cu_q, cu_k = _offsets(layout)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
    out_ref, lse_ref = oracle_attention(q, k, v, cu_q, cu_k, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert lse.shape == (q.shape[1], q.shape[0])
    assert not torch.isnan(out).any()
    assert rel_err(out, out_ref) < 1e-12
    _check_lse(lse, lse_ref, atol=1e-5)


@pytest.mark.parametrize("softmax_scale", [0.0, 0.05, -0.7, 3.0])
def test_custom_softmax_scale(softmax_scale):
    layout = LAYOUTS[2]
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(layout, 2, 1, 16, dtype=torch.float64, generator=gen)
    cu_q, cu_k = _offsets(layout)
    for causal in (False, True):
        out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=softmax_scale, causal=causal)
        out_ref, lse_ref = oracle_attention(q, k, v, cu_q, cu_k, softmax_scale=softmax_scale, causal=causal)
        assert rel_err(out, out_ref) < 1e-12
        _check_lse(lse, lse_ref, atol=1e-5)
    # None means 1/sqrt(D).
    default, _ = varlen_attention_reference(q, k, v, cu_q, cu_k)
    explicit, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=0.25)
    assert torch.equal(default, explicit)


def test_empty_rows_are_zero_with_neg_inf_lse():
    # Segment 0: no keys. Segment 1: causal with Lk=2 < Lq=4, so queries 0 and 1 see no key.
    # Segment 2: no queries. Segment 3: Lk=3 > Lq=1, the query sees every key.
    layout = Layout("holes", (2, 4, 0, 1), (0, 2, 3, 3))
    q, k, v = random_qkv(layout, 2, 1, 5, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = _offsets(layout)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True)
    empty_rows = torch.tensor([0, 1, 2, 3])
    assert (out[empty_rows] == 0).all() and (lse[:, empty_rows] == -math.inf).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, 4:]).all()
    # Query 2 of segment 1 sees exactly key 0 of segment 1: its output is that value row.
    assert torch.allclose(out[4], v[0].expand(2, -1))
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[empty_rows] == 0).all()
    assert (k.grad[2:5] == 0).all() and (v.grad[2:5] == 0).all()   # keys of segment 2: no query reads them


def test_accepts_int64_offsets_and_non_contiguous_inputs():
    layout = LAYOUTS[7]
    gen = torch.Generator().manual_seed(2)
    total = sum(layout.lengths_q)
    qkv = torch.randn(total, 3, 4, 8, dtype=torch.float64, generator=gen)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                 # strided views, as an MHA in-projection gives
    assert not q.is_contiguous()
    cu = offsets_of(layout.lengths_q)
    out, lse = varlen_attention_reference(q, k, v, cu.long(), cu.long(), causal=True)
    out_ref, lse_ref = oracle_attention(q, k, v, cu, cu, causal=True)
    assert rel_err(out, out_ref) < 1e-12
    _check_lse(lse, lse_ref, atol=1e-5)


# -- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 2, 17), (4, 1, 3)], ids=["GQA-D17", "MQA-D3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gradients_match_dense_oracle(layout, causal, heads):
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(layout, *heads, dtype=torch.float64, generator=gen, requires_grad=True)
    cu_q, cu_k = _offsets(layout)
    out, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
    out_ref = _dense_attention(q, k, v, layout, causal=causal)
    assert rel_err(out, out_ref) < 1e-12
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), grad_out)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert not torch.isnan(g).any(), name
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("case", [
    dict(lengths_q=(3, 1, 4), lengths_k=None, heads=(2, 2, 3), causal=False),
    dict(lengths_q=(3, 1, 4), lengths_k=None, heads=(2, 2, 3), causal=True),
    dict(lengths_q=(2, 3, 1), lengths_k=None, heads=(4, 2, 2), causal=True),           # GQA
    dict(lengths_q=(2, 3), lengths_k=None, heads=(3, 1, 2), causal=False),             # MQA
    dict(lengths_q=(2, 4, 1), lengths_k=(3, 2, 2), heads=(2, 1, 3), causal=True),      # cross, Lk < Lq
    dict(lengths_q=(0, 2, 3, 0), lengths_k=(2, 0, 3, 0), heads=(2, 2, 2), causal=False),  # empty segments
    dict(lengths_q=(2, 3), lengths_k=(0, 0), heads=(2, 1, 2), causal=True),            # no key anywhere
], ids=["full", "causal", "gqa", "mqa", "cross", "empty-segments", "no-keys"])
def test_gradcheck(case):
    layout = Layout("small", case["lengths_q"], case["lengths_k"])
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(layout, *case["heads"], dtype=torch.float64, generator=gen, requires_grad=True)
    cu_q, cu_k = _offsets(layout)
    fn = lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=0.8,
                                                    causal=case["causal"])[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_lse_has_no_gradient():
    layout = LAYOUTS[0]
    q, k, v = random_qkv(layout, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    _, lse = varlen_attention_reference(q, k, v, *_offsets(layout))
    assert not lse.requires_grad


# -- low precision --------------------------------------------------------------------------------------

# Bounds on ||x - x64|| / ||x64|| for outputs and gradients against the same inputs in float64: about 4x
# what was measured (fp32 ~2e-7 / 2.6e-7, fp16 ~2.7e-4 / 3.6e-4, bf16 ~2.1e-3 / 2.9e-3), i.e. about one
# unit of roundoff of the dtype, as rounding the output alone costs.
LOW_PRECISION = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1.5e-3), torch.bfloat16: (8e-3, 1.2e-2)}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[6]], ids=lambda l: l.name)
def test_low_precision_vs_float64(layout, dtype):
    out_bound, grad_bound = LOW_PRECISION[dtype]
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(layout, 4, 2, 33, dtype=dtype, generator=gen, requires_grad=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    cu_q, cu_k = _offsets(layout)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True)
    out64, lse64 = varlen_attention_reference(q64, k64, v64, cu_q, cu_k, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, out64) < out_bound
    _check_lse(lse, lse64.double(), atol=1e-4)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out)
    for name, g, g64 in zip("qkv", grads, grads64):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, g64) < grad_bound, name


def test_half_precision_large_scores_do_not_overflow():
    # Scores of ~1e5 overflow float16 (max 65504): the softmax must still run in float32.
    layout = Layout("big-scores", (5, 3))
    q, k, v = random_qkv(layout, 2, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    q, k = q * 80, k * 80
    cu = offsets_of(layout.lengths_q)
    out, lse = varlen_attention_reference(q.half(), k.half(), v.half(), cu, cu, softmax_scale=1.0)
    out_ref, lse_ref = oracle_attention(q.half(), k.half(), v.half(), cu, cu, softmax_scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, out_ref) < 1e-3
    assert rel_err(lse, lse_ref) < 1e-6


# -- dropout --------------------------------------------------------------------------------------------


def test_dropout_zero_is_deterministic():
    layout = LAYOUTS[2]
    q, k, v = random_qkv(layout, 2, 2, 8)
    cu_q, cu_k = _offsets(layout)
    out_a, lse_a = varlen_attention_reference(q, k, v, cu_q, cu_k, dropout_p=0.0)
    out_b, lse_b = varlen_attention_reference(q, k, v, cu_q, cu_k, dropout_p=0.0)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


def test_dropout_changes_output_but_not_lse_and_follows_the_global_seed():
    layout = LAYOUTS[2]
    q, k, v = random_qkv(layout, 2, 2, 8, dtype=torch.float64)
    cu_q, cu_k = _offsets(layout)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True)
    torch.manual_seed(7)
    out_a, lse_a = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.3)
    torch.manual_seed(7)
    out_b, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.3)
    assert not torch.allclose(out_a, out)
    assert torch.equal(out_a, out_b)
    assert torch.equal(lse_a, lse)
    assert torch.isfinite(out_a).all()


def test_dropout_single_key_is_zero_or_rescaled():
    # With one key the attention weight is 1, so dropout leaves each (query, head) either 0 or v / (1 - p).
    p = 0.25
    layout = Layout("one-key", (6,) * 50, (1,) * 50)
    q, k, v = random_qkv(layout, 4, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    cu_q, cu_k = _offsets(layout)
    torch.manual_seed(8)
    out, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, dropout_p=p)
    expected = v.repeat_interleave(6, 0) / (1 - p)
    dropped = (out == 0).all(-1)
    assert torch.allclose(out[~dropped], expected[~dropped], rtol=1e-14, atol=0)
    assert abs(dropped.double().mean().item() - p) < 0.05


def test_dropout_preserves_the_expectation():
    # 512 heads share one q/k/v: each head draws its own mask, so the mean over heads estimates E[out].
    p, heads = 0.4, 512
    layout = Layout("few", (7, 12))
    q, k, v = random_qkv(layout, 1, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    q, k, v = (t.expand(-1, heads, -1) for t in (q, k, v))
    cu = offsets_of(layout.lengths_q)
    out, _ = varlen_attention_reference(q, k, v, cu, cu, causal=True)
    torch.manual_seed(9)
    dropped, _ = varlen_attention_reference(q, k, v, cu, cu, causal=True, dropout_p=p)
    assert rel_err(dropped.mean(1), out[:, 0]) < 0.06
    assert rel_err(dropped[:, 0], out[:, 0]) > 0.1          # a single draw is far from the mean


# -- scale ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hundred_thousand_tokens():
    """~100k word-like tokens plus three long segments: one call, a few seconds on 2 cores."""
    rng = random.Random(10)
    lengths = [rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14)) for _ in range(15000)]
    long_at = (100, 9000, 14000)
    for i, n in zip(long_at, (700, 1500, 3000)):
        lengths[i] = n
    layout = Layout("100k", tuple(lengths))
    assert 95_000 < sum(lengths) < 110_000
    q, k, v = random_qkv(layout, 2, 1, 32, generator=torch.Generator().manual_seed(10))
    cu = offsets_of(lengths)
    out, lse = varlen_attention_reference(q, k, v, cu, cu, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Spot-check against the oracle: short segments whole, and the last 24 queries of each long segment
    # against all its keys (bottom-right alignment makes those the same rows as in the full segment).
    starts = cu.tolist()
    for i in long_at + (0, 1, 5000, 14999):
        a, b = starts[i], starts[i + 1]
        first_q = max(a, b - 24)
        cu_q = torch.tensor([0, b - first_q], dtype=torch.int32)
        cu_k = torch.tensor([0, b - a], dtype=torch.int32)
        out_ref, lse_ref = oracle_attention(q[first_q:b], k[a:b], v[a:b], cu_q, cu_k, causal=True)
        assert rel_err(out[first_q:b], out_ref) < 1e-5
        assert (lse[:, first_q:b].double() - lse_ref).abs().max().item() < 1e-4


# -- devices --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[6]], ids=lambda l: l.name)
def test_cuda_matches_cpu(layout):
    q, k, v = random_qkv(layout, 4, 2, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    cu_q, cu_k = _offsets(layout)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True)
    out_cuda, lse_cuda = varlen_attention_reference(q.cuda(), k.cuda(), v.cuda(), cu_q.cuda(), cu_k.cuda(),
                                                    causal=True)
    assert out_cuda.device.type == "cuda" and lse_cuda.device.type == "cuda"
    assert rel_err(out_cuda, out) < 1e-12
    _check_lse(lse_cuda.cpu(), lse.double(), atol=1e-6)
