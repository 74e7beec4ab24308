"""What is specific to hierkern.reference: float64 gradcheck, float16 scores beyond float16's range, torch's
dropout generator, splitting a poisoned causal segment into rows, 100k tokens, CPU and CUDA agreement. The
contract that every backend shares (layouts, dtypes, causal, GQA, lse, gradients, non-finite isolation) is
checked by tests/conformance."""

import math
import random

import pytest
import torch

from hierkern.reference import varlen_attention_reference

from helpers import Layout, adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err

LAYOUTS = adversarial_layouts()


def _offsets(layout):
    return offsets_of(layout.lengths_q), offsets_of(layout.keys)


def _check_lse(lse, lse_ref, atol):
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any()
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == -math.inf).all()
    if finite.any():
        assert (lse.double()[finite] - lse_ref[finite]).abs().max().item() < atol


# -- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(lengths_q=(3, 1, 4), lengths_k=None, heads=(2, 2, 3), causal=False),
        dict(lengths_q=(3, 1, 4), lengths_k=None, heads=(2, 2, 3), causal=True),
        dict(lengths_q=(2, 3, 1), lengths_k=None, heads=(4, 2, 2), causal=True),  # GQA
        dict(lengths_q=(2, 3), lengths_k=None, heads=(3, 1, 2), causal=False),  # MQA
        dict(lengths_q=(2, 4, 1), lengths_k=(3, 2, 2), heads=(2, 1, 3), causal=True),  # cross, Lk < Lq
        dict(lengths_q=(0, 2, 3, 0), lengths_k=(2, 0, 3, 0), heads=(2, 2, 2), causal=False),  # empty segments
        dict(lengths_q=(2, 3), lengths_k=(0, 0), heads=(2, 1, 2), causal=True),  # no key anywhere
    ],
    ids=["full", "causal", "gqa", "mqa", "cross", "empty-segments", "no-keys"],
)
def test_gradcheck(case):
    layout = Layout("small", case["lengths_q"], case["lengths_k"])
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(layout, *case["heads"], dtype=torch.float64, generator=gen, requires_grad=True)
    cu_q, cu_k = _offsets(layout)
    fn = lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=0.8, causal=case["causal"])[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_poisoned_causal_segment_runs_row_by_row_and_clean_ones_batched():
    """A causal segment with an inf runs as one problem per row, each over its visible keys; the others keep
    the batched path, and both agree with the oracle where finite."""
    layout = Layout("mixed", (3, 40, 5))
    q, k, v = random_qkv(layout, 2, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    v[3 + 10, 0, 2] = math.inf
    cu = offsets_of(layout.lengths_q)
    out, lse = varlen_attention_reference(q, k, v, cu, cu, causal=True)
    out_ref, lse_ref = oracle_attention(q, k, v, cu, cu, causal=True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(out_ref))
    assert torch.isfinite(out[: 3 + 10]).all() and not torch.isfinite(out[3 + 10 : 3 + 40, :, 2]).any()
    finite = torch.isfinite(out_ref)
    torch.testing.assert_close(out[finite], out_ref[finite], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-6)


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
    assert rel_err(dropped[:, 0], out[:, 0]) > 0.1  # a single draw is far from the mean


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
    out_cuda, lse_cuda = varlen_attention_reference(q.cuda(), k.cuda(), v.cuda(), cu_q.cuda(), cu_k.cuda(), causal=True)
    assert out_cuda.device.type == "cuda" and lse_cuda.device.type == "cuda"
    assert rel_err(out_cuda, out) < 1e-12
    _check_lse(lse_cuda.cpu(), lse.double(), atol=1e-6)
