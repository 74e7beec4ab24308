"""What every backend must accept (offsets of any stride, int64 offsets, Segments, strided q/k/v) and what it
must refuse, with an error naming the argument."""

import math

import pytest
import torch

import hierkern
from hierkern import Segments

from .cases import HEAD_CONFIGS, Problem, grad, make_problem, run, skip_if_refused
from helpers import Layout

# Issue 11, item 1: a valid cu_seqlens that is a strided view.
STRIDED = torch.tensor([0, 0, 3, 3, 8, 8, 9, 9, 9, 9, 13, 13], dtype=torch.int32)[::2]
LAYOUT = Layout("strided", (3, 5, 1, 0, 4))


def _results(name, problem, causal=True, cu_q=None, cu_k=None):
    q, k, v = problem.leaves
    out, lse = hierkern.varlen_attention(
        q,
        k,
        v,
        problem.cu_q if cu_q is None else cu_q,
        problem.cu_k if cu_k is None else cu_k,
        causal=causal,
        return_lse=True,
        backend=name,
    )
    return (out, lse) + grad(out, problem.leaves, problem.dout)


def _assert_same(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=False)


def test_offsets_of_any_stride(backend):
    name, device = backend
    problem = make_problem(LAYOUT, HEAD_CONFIGS[0], device)
    skip_if_refused(name, problem, causal=True)
    strided = STRIDED.to(device)
    assert not strided.is_contiguous() and strided.tolist() == problem.cu_q.tolist()
    expected = _results(name, problem)
    _assert_same(_results(name, problem, cu_q=strided, cu_k=strided), expected)
    _assert_same(_results(name, problem, cu_q=strided, cu_k=None), expected)
    # A Segments built from a strided view, and int64 offsets (strided too).
    _assert_same(_results(name, problem, cu_q=Segments(strided), cu_k=Segments(strided)), expected)
    wide = torch.tensor(STRIDED.tolist(), dtype=torch.int64, device=device).repeat_interleave(2)[::2]
    _assert_same(_results(name, problem, cu_q=wide, cu_k=wide), expected)


def test_strided_q_k_v(backend):
    """Head-major storage, a slice of a wider head dimension and a token-strided view: the same numbers as
    contiguous copies."""
    name, device = backend
    problem = make_problem(Layout("words", (3, 5, 1, 0, 4, 9, 2)), HEAD_CONFIGS[0], device)
    skip_if_refused(name, problem, causal=True)
    expected = _results(name, problem)
    q, k, v = (t.detach() for t in problem.leaves)
    views = (
        q.transpose(0, 1).contiguous().transpose(0, 1),  # head-major
        torch.cat([k, torch.randn_like(k)], dim=-1)[..., : k.shape[-1]],  # padded head dim
        torch.stack([v, torch.randn_like(v)], dim=2).flatten(1, 2)[:, ::2],  # strided heads
    )
    leaves = tuple(t.requires_grad_(True) for t in views)
    assert not any(t.is_contiguous() for t in leaves)
    strided = Problem(problem.layout, *leaves, problem.dout, problem.cu_q, problem.cu_k)
    _assert_same(_results(name, strided), expected)


def _bad_cases():
    problem = make_problem(Layout("cross", (3, 0, 4, 1), (2, 5, 0, 3)), HEAD_CONFIGS[0], "cpu")
    q, k, v = (t.detach() for t in problem.leaves)
    cu_q, cu_k = problem.cu_q, problem.cu_k
    return [
        ("q-list", dict(q=q.tolist()), TypeError, r"q must be a torch.Tensor, got list"),
        ("k-none", dict(k=None), TypeError, r"k must be a torch.Tensor, got NoneType"),
        ("q-2d", dict(q=q[:, 0]), ValueError, r"q must have shape \(total, heads, head_dim\)"),
        ("v-4d", dict(v=v[None]), ValueError, r"v must have shape \(total, heads, head_dim\)"),
        ("q-int", dict(q=q.long()), TypeError, r"q must be float16, bfloat16, float32 or float64"),
        ("k-complex", dict(k=k.to(torch.complex64)), TypeError, r"k must be float16"),
        ("mixed-dtype", dict(v=v.double()), TypeError, r"q, k and v must share a dtype"),
        ("mixed-device", dict(k=k.to("meta")), ValueError, r"q, k and v must be on one device"),
        ("kv-shape", dict(v=v[:-1]), ValueError, r"k and v must have the same shape"),
        (
            "head-dim",
            dict(k=k[..., :4], v=v[..., :4]),
            ValueError,
            r"q and k must have the same head_dim, got 32 and 4",
        ),
        ("head-dim-zero", dict(q=q[..., :0], k=k[..., :0], v=v[..., :0]), ValueError, r"head_dim must be positive"),
        (
            "heads-indivisible",
            dict(q=q[:, :3]),
            ValueError,
            r"number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
        ),
        ("no-kv-heads", dict(k=k[:, :0], v=v[:, :0]), ValueError, r"key/value heads \(0\)"),
        ("no-q-heads", dict(q=q[:, :0]), ValueError, r"q must have at least one head"),
        ("cu-q-float", dict(cu_seqlens_q=cu_q.float()), TypeError, r"cu_seqlens_q must be an int32 tensor"),
        (
            "cu-k-list",
            dict(cu_seqlens_k=cu_k.tolist()),
            TypeError,
            r"cu_seqlens_k must be an int32 tensor or a hierkern.Segments, got list",
        ),
        ("cu-q-2d", dict(cu_seqlens_q=cu_q[None]), ValueError, r"cu_seqlens_q must be 1-D"),
        ("cu-q-empty", dict(cu_seqlens_q=cu_q[:0]), ValueError, r"cu_seqlens_q must be 1-D"),
        (
            "cu-q-decreasing",
            dict(cu_seqlens_q=torch.tensor([0, 3, 2, 7, 8], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\]=2 < cu_seqlens_q\[1\]=3",
        ),
        ("cu-k-start", dict(cu_seqlens_k=cu_k + 1), ValueError, r"cu_seqlens_k\[0\] must be 0, got 1"),
        (
            "cu-q-last",
            dict(cu_seqlens_q=torch.tensor([0, 3, 3, 7, 7], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_q\[-1\] must equal the number of packed tokens \(8\), got 7",
        ),
        (
            "cu-k-overrun",
            dict(cu_seqlens_k=torch.tensor([0, 2, 7, 7, 11], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_k\[-1\] must equal the number of packed tokens \(10\), got 11",
        ),
        ("cu-q-device", dict(cu_seqlens_q=cu_q.to("meta")), ValueError, r"cu_seqlens_q is on meta but q is on cpu"),
        (
            "segments-total",
            dict(cu_seqlens_q=Segments.from_lengths([3, 4])),
            ValueError,
            r"cu_seqlens_q covers 7 tokens but q has 8",
        ),
        (
            "segments-k-total",
            dict(cu_seqlens_k=Segments.from_lengths([2, 5, 3, 1])),
            ValueError,
            r"cu_seqlens_k covers 11 tokens but k has 10",
        ),
        (
            "num-segments",
            dict(cu_seqlens_k=torch.tensor([0, 2, 10], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got 4 and 2",
        ),
        ("k-none-totals", dict(cu_seqlens_k=None), ValueError, r"cu_seqlens_k is None .* k has 10 tokens and q has 8"),
        (
            "max-q-small",
            dict(max_seqlen_q=3),
            ValueError,
            r"max_seqlen_q=3 is smaller than the longest segment in cu_seqlens_q \(4\)",
        ),
        (
            "max-k-small",
            dict(max_seqlen_k=4),
            ValueError,
            r"max_seqlen_k=4 is smaller than the longest segment in cu_seqlens_k \(5\)",
        ),
        ("max-q-negative", dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q must be non-negative, got -1"),
        ("max-k-float", dict(max_seqlen_k=5.0), TypeError, r"max_seqlen_k must be a Python int, got float"),
        ("max-q-bool", dict(max_seqlen_q=True), TypeError, r"max_seqlen_q must be a Python int, got bool"),
        ("max-q-tensor", dict(max_seqlen_q=torch.tensor(4)), TypeError, r"max_seqlen_q must be a Python int"),
        ("scale-nan", dict(softmax_scale=math.nan), ValueError, r"softmax_scale must be finite, got nan"),
        ("scale-inf", dict(softmax_scale=-math.inf), ValueError, r"softmax_scale must be finite"),
        ("scale-str", dict(softmax_scale="0.5"), TypeError, r"softmax_scale must be a float or None, got str"),
        ("scale-bool", dict(softmax_scale=True), TypeError, r"softmax_scale must be a float or None"),
        ("scale-tensor", dict(softmax_scale=torch.tensor(0.5)), TypeError, r"softmax_scale must be a float"),
        ("causal-int", dict(causal=1), TypeError, r"causal must be a bool, got int"),
        ("causal-tensor", dict(causal=torch.tensor(True)), TypeError, r"causal must be a bool, got Tensor"),
        ("window-int", dict(window_size=3), TypeError, r"window_size must be a tuple of two ints"),
        ("window-three", dict(window_size=(1, 2, 3)), TypeError, r"window_size must be a tuple of two ints"),
        ("window-float", dict(window_size=(1.0, 2)), TypeError, r"window_size must be a tuple of two ints"),
        ("window-bool", dict(window_size=(True, 2)), TypeError, r"window_size must be a tuple of two ints"),
        (
            "window-below-minus-one",
            dict(window_size=(-2, 0)),
            ValueError,
            r"window_size bounds must be >= 0, or -1 for unbounded, got \(-2, 0\)",
        ),
        (
            "window-causal-right",
            dict(window_size=(2, 3), causal=True),
            ValueError,
            r"causal=True means window_size=\(left, 0\); got window_size=\(2, 3\)",
        ),
        ("dropout-negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
        ("dropout-one", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        ("dropout-nan", dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\)"),
        ("dropout-str", dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float, got str"),
        ("dropout-bool", dict(dropout_p=False), TypeError, r"dropout_p must be a float, got bool"),
        ("return-lse-int", dict(return_lse=1), TypeError, r"return_lse must be a bool, got int"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("changes, error, match", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_the_argument(backend, changes, error, match):
    """Refused before any backend runs, whichever backend is named (on the CPU: the values are checked
    where reading them is free)."""
    name, _ = backend
    problem = make_problem(Layout("cross", (3, 0, 4, 1), (2, 5, 0, 3)), HEAD_CONFIGS[0], "cpu")
    args = dict(
        q=problem.q.detach(),
        k=problem.k.detach(),
        v=problem.v.detach(),
        cu_seqlens_q=problem.cu_q,
        cu_seqlens_k=problem.cu_k,
        backend=name,
    )
    with pytest.raises(error, match=match):
        hierkern.varlen_attention(**{**args, **changes})


def test_refusal_names_the_reason(backend):
    """A backend asked for a call it does not support says why, and "auto" still finds one that does."""
    name, device = backend
    problem = make_problem(LAYOUT, HEAD_CONFIGS[-1], device)  # float64: not every backend takes it
    reason = hierkern.explain(hierkern.AttentionCall.of(problem.q, problem.k, problem.v, 5, 5))[name]
    if reason is None:
        run(name, problem, grads=False)
        return
    assert isinstance(reason, str) and len(reason) > 20
    with pytest.raises(ValueError, match=f"backend '{name}' cannot run this call"):
        run(name, problem, grads=False)
