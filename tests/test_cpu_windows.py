"""Sliding-window attention in the C++ CPU kernels: ``torch.ops.hierkern.varlen_fwd/varlen_bwd`` with
``window_left``/``window_right`` (FlashAttention's ``window_size``, aligned bottom-right, -1 unbounded) against a
dense float64 oracle with the window mask, on every kernel path (lane batches below 16/32 keys, blocked rows
above, the generic row kernel for float64 and odd head dims). Non-finite isolation under windows is in
test_cpu_backend.py (test_non_finite_values_reach_only_the_rows_that_see_them).
"""

from __future__ import annotations

import math

import pytest
import torch

from hierkern.backends import get_backend
from hierkern.ops import extension

from cuda_oracles import keep_mask
from helpers import Layout, adversarial_layouts, offsets_of, random_qkv, rel_err

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(
    CPU.unavailable_reason() is not None, reason=f"CPU kernel unavailable: {CPU.unavailable_reason()}"
)

LARGE = 10_000
LAYOUTS = [
    Layout("empty-and-one", (0, 1, 0, 3, 1, 0)),
    # Lane batches below 16 (backward) / 32 (forward) keys, blocked rows from there, 4-row and 64-row blocks.
    Layout("path-boundaries", (7, 8, 9, 15, 16, 17, 31, 32, 33, 65, 70)),
    Layout("cross-both-ways", (40, 31, 3, 17, 1, 0, 5, 70), (31, 33, 8, 15, 4, 2, 0, 66)),
    adversarial_layouts()[2],  # one long segment among tiny ones
    adversarial_layouts()[7],  # words
]
WINDOWS = [
    (-1, -1),
    (-1, 0),
    (0, 0),
    (0, -1),
    (1, 1),
    (2, 0),
    (5, 2),
    (0, 5),
    (-1, 2),
    (2, -1),
    (1, 5),
    (LARGE, LARGE),
    (LARGE, 0),
]
# (dtype, (heads, kv heads, head dim)): float32 lanes/blocked on unrolled head dims, MQA with head dim 7 and
# float64 on the row kernel, bfloat16 converted into scratch.
CASES = [
    (torch.float32, (4, 4, 32)),
    (torch.float32, (4, 2, 64)),
    (torch.float32, (3, 1, 7)),
    (torch.float64, (4, 2, 64)),
    (torch.bfloat16, (4, 2, 32)),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _one_thread():
    """As in test_cpu_backend.py: the oracle's many small ops crawl under an OpenMP team on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case_id(case):
    dtype, (heads, kv_heads, head_dim) = case
    return f"{str(dtype).split('.')[1]}-h{heads}-kv{kv_heads}-d{head_dim}"


def window_visibility(layout: Layout, window_left: int, window_right: int) -> torch.Tensor:
    """Bool ``(total_q, total_k)``, written from the definition: query i of a segment sees key j of the same
    segment iff ``i + shift - window_left <= j <= i + shift + window_right`` (shift = Lk - Lq; -1 unbounded)."""
    allowed = torch.zeros(sum(layout.lengths_q), sum(layout.keys), dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in zip(layout.lengths_q, layout.keys):
        for i in range(lq):
            for j in range(lk):
                diag = i + lk - lq
                allowed[q0 + i, k0 + j] = (window_left < 0 or j >= diag - window_left) and (
                    window_right < 0 or j <= diag + window_right
                )
        q0, k0 = q0 + lq, k0 + lk
    return allowed


def dense_oracle(q, k, v, allowed, scale, keep=None, p=0.0):
    """Float64, differentiable: ``out`` and ``lse`` ``(H, total_q)`` over all packed tokens at once under the mask
    ``allowed``; dropout as an explicit keep mask ``(H, total_q, total_k)``. Rows without keys: zeros and
    lse = -inf (their scores are made finite dummies first, so that no NaN reaches the backward)."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * scale
    has_keys = allowed.any(-1)[None, :, None]
    scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_keys, 0.0)
    lse = torch.logsumexp(scores, -1).masked_fill(~has_keys[..., 0], -math.inf)
    probs = torch.softmax(scores, -1) * has_keys
    if keep is not None:
        probs = probs * keep / (1 - p)
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1)), lse


def _run(q, k, v, layout, window, p=0.0, rng_state=None, scale=None):
    extension.ensure_loaded()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.hierkern.varlen_fwd(
        q,
        k,
        v,
        offsets_of(layout.lengths_q),
        offsets_of(layout.keys),
        max(layout.lengths_q),
        max(layout.keys),
        scale,
        *window,
        p,
        rng_state,
    )


def _grad_err(x, ref):
    """Relative error with a floor, as test_cpu_backend.py's: gradients zero in theory are rounding noise."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / max(ref.norm().item(), 0.1 * math.sqrt(ref.numel()) or 1.0)).item()


def _check(layout, window, case, p=0.0, seed=0):
    dtype, (num_heads, num_kv_heads, head_dim) = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(layout, num_heads, num_kv_heads, head_dim, dtype=dtype, generator=g, requires_grad=True)
    scale = 1 / math.sqrt(head_dim)
    rng_state = torch.tensor([seed + 12345, 7], dtype=torch.int64) if p > 0 else None
    out, lse = _run(q, k, v, layout, window, p, rng_state)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))

    allowed = window_visibility(layout, *window)
    keep = keep_mask(seed + 12345, 7, num_heads, q.shape[0], k.shape[0], p).double() if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = dense_oracle(*leaves, allowed, scale, keep, p)
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)
    empty = ~allowed.any(-1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "a row without keys must give zeros"
    assert torch.isneginf(lse[:, empty]).all()
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert not grad.isnan().any(), f"d{name}"
        assert _grad_err(grad, ref_grad) <= 5 * tol, f"d{name}"
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty])), "a row without keys has dq = 0"
    unseen = ~allowed.any(0)
    for name, grad in zip("kv", grads[1:]):
        assert torch.equal(grad[unseen], torch.zeros_like(grad[unseen])), f"a key no row sees has d{name} = 0"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"l{w[0]}r{w[1]}")
def test_windows_match_oracle_float32(layout, window):
    _check(layout, window, CASES[1])


# The other head layouts and dtypes on fewer windows: one-sided, two-sided and narrow.
@pytest.mark.parametrize("layout", LAYOUTS[1:4], ids=lambda l: l.name)
@pytest.mark.parametrize("window", [(-1, 0), (0, 0), (2, -1), (5, 2)], ids=lambda w: f"l{w[0]}r{w[1]}")
@pytest.mark.parametrize("case", [CASES[0], *CASES[2:]], ids=_case_id)
def test_windows_match_oracle_dtypes_and_heads(layout, window, case):
    _check(layout, window, case)


@pytest.mark.parametrize("layout", LAYOUTS[1:4], ids=lambda l: l.name)
@pytest.mark.parametrize("window", [(1, 1), (5, 0), (0, 2)], ids=lambda w: f"l{w[0]}r{w[1]}")
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_case_id)
def test_windows_with_dropout(layout, window, case):
    """Dropout's Philox counters are packed token indices: a window changes which weights a row has, never
    which of them are kept."""
    _check(layout, window, case, p=0.3, seed=3)


def test_window_equal_to_causal_and_full_is_bit_identical():
    """(-1, 0) is causal and (-1, -1) no mask: a window as wide as the segment changes nothing."""
    layout = LAYOUTS[3]
    g = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(layout, 4, 2, 64, generator=g)
    lk = max(layout.keys)
    assert torch.equal(_run(q, k, v, layout, (-1, -1))[0], _run(q, k, v, layout, (lk, lk))[0])
    assert torch.equal(_run(q, k, v, layout, (-1, 0))[0], _run(q, k, v, layout, (lk, 0))[0])


@pytest.mark.parametrize("window", [(-2, 0), (0, -5)], ids=["left", "right"])
def test_bad_window_is_refused_by_name(window):
    layout = LAYOUTS[0]
    q, k, v = random_qkv(layout, 2, 2, 32)
    name = "window_left" if window[0] < -1 else "window_right"
    with pytest.raises(ValueError, match=name):
        _run(q, k, v, layout, window)
