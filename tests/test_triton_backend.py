"""What is specific to the Triton backend: the op at any offsets stride, tiles where no row sees a key, the
Philox dropout mask shared by forward and backward, registration (refusals, "auto", opcheck, torch.compile),
and on a GPU the compiled kernels on bigger layouts. The contract every backend shares (layouts, dtypes,
gradients, non-finite isolation, peaky half-precision gradients, double backward) is tests/conformance.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
16x16 tiles, so the layouts are built around a 16-token tile and stay small (the interpreter costs ~3 ms per
loop iteration per program). Tests marked ``requires_cuda`` run the compiled kernels on bigger layouts.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda

import hierkern
from hierkern.backends import AttentionCall, explain, get_backend, select_backend
from hierkern.reference import varlen_attention_reference

from helpers import Layout, adversarial_layouts, offsets_of, oracle_attention, random_qkv, rel_err

ta = pytest.importorskip("hierkern.ops.triton_attention")
tab = pytest.importorskip("hierkern.ops.triton_attention_bwd")
if get_backend("triton").unavailable_reason() is not None:
    pytest.skip(get_backend("triton").unavailable_reason(), allow_module_level=True)

# Triton's interpreter indexes Python ranges with 1-element numpy arrays (its own deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE = 16  # the interpreter's BLOCK_M = BLOCK_N
LAYOUTS = adversarial_layouts(tile=TILE)


def _offsets(layout: Layout, device=DEVICE):
    return offsets_of(layout.lengths_q, device), offsets_of(layout.keys, device)


def _triton(q, k, v, layout, causal, **kwargs):
    cu_q, cu_k = _offsets(layout, q.device)
    return hierkern.varlen_attention(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(layout.lengths_q, default=0),
        max(layout.keys, default=0),
        causal=causal,
        return_lse=True,
        backend="triton",
        **kwargs,
    )


def _check_lse(lse, ref_lse, atol):
    """Equal where finite, -inf exactly where the oracle has no keys, never NaN."""
    lse, ref_lse = lse.detach().double().cpu(), ref_lse.double().cpu()
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert bool((lse[torch.isinf(ref_lse)] < 0).all())
    finite = torch.isfinite(ref_lse)
    if finite.any():
        assert (lse[finite] - ref_lse[finite]).abs().max().item() <= atol


def _reference_grads(q, k, v, layout, causal, dout, softmax_scale=None):
    """Gradients of hierkern.reference evaluated in float64."""
    cu_q, cu_k = (t.cpu() for t in _offsets(layout))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, _ = varlen_attention_reference(q64, k64, v64, cu_q, cu_k, softmax_scale=softmax_scale, causal=causal)
    return out, torch.autograd.grad(out, (q64, k64, v64), dout.detach().cpu().double())


def _close(x, ref, rtol, atol=1e-6):
    """``||x - ref|| <= rtol * ||ref|| + atol * sqrt(n)`` (gradients that are exactly zero in theory, such as
    dq of length-1 segments, are rounding noise in both, so a relative error alone is meaningless there)."""
    diff = (x.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    return diff <= rtol * ref.double().norm().item() + atol * math.sqrt(max(ref.numel(), 1))


# ---------------------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------------------


def test_offsets_of_any_stride():
    """Offsets are valid input at any stride (every other entry of a longer tensor here): the op reads them as
    it is handed them, forward and backward."""
    cu = torch.tensor([0, 0, 3, 3, 8, 8, 9, 9, 9, 9, 13, 13], dtype=torch.int32, device=DEVICE)[::2]
    assert cu.stride() == (2,)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(13, 2, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    out, lse = torch.ops.hierkern.triton_varlen_fwd(q, k, v, cu, cu, 5, 5, 0.25, -1, 0, 0.0, None)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    cu_dense = cu.cpu().contiguous()
    ref_out, ref_lse = oracle_attention(q, k, v, cu_dense, cu_dense, softmax_scale=0.25, causal=True)
    assert _close(out, ref_out, 2e-6)
    _check_lse(lse, ref_lse, 1e-5)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_attention_reference(q64, k64, v64, cu_dense, cu_dense, softmax_scale=0.25, causal=True)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())):
        assert _close(g, r, 1e-5), f"d{name}: rel err {rel_err(g, r):.2e}"


def test_tiles_without_keys_write_zeros_and_ignore_unseen_tokens():
    """A query tile in which no row sees a key and a key tile that no query sees: the kernels write zeros
    (and lse = -inf) into NaN-poisoned buffers, and NaN in the tokens nobody attends to (those queries, their
    dO, those keys and values) stays out of every other row and key, some of which share their tiles."""
    # Queries 0-16 have no keys (query tile 0 sees nothing); keys 0-17 have no queries (key tile 0 is unseen).
    layout = Layout("unseen-tiles", (17, 0, 5, 3), (0, 18, 4, 6))
    gen = torch.Generator().manual_seed(13)
    q, k, v = random_qkv(layout, 2, 1, 16, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    cu_q, cu_k = _offsets(layout)
    ref_out, ref_lse = oracle_attention(q, k, v, cu_q.cpu(), cu_k.cpu(), softmax_scale=0.25)
    _, ref_grads = _reference_grads(q, k, v, layout, False, dout, softmax_scale=0.25)
    for t in (q, dout):
        t[:17] = math.nan
    for t in (k, v):
        t[:18] = math.nan
    args = (cu_q, cu_k, 17, 18, 0.25, -1, -1, 0.0, None)
    out = torch.full_like(q, math.nan)
    lse = torch.full((2, q.shape[0]), math.nan, device=DEVICE)
    ta._launch_fwd(q, k, v, *args, out=out, lse=lse)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:17], torch.zeros_like(out[:17]))
    assert _close(out, ref_out, 2e-6)
    _check_lse(lse, ref_lse, 1e-5)
    grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
    tab._launch_bwd(dout, q, k, v, out, lse, *args, grads=grads)
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert not torch.isnan(g).any(), f"d{name}"
        assert _close(g, ref, 1e-5), f"d{name}: rel err {rel_err(g, ref):.2e}"


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


def _dropout_mask(layout, num_heads, rng_state, dropout_p):
    """The kept (query, key) pairs, read off the kernel itself: with q = 0 every visible key gets weight
    1/Lk, and one-hot values put key j's weight in output column j."""
    cu_q, cu_k = _offsets(layout)
    lengths_k = torch.tensor(layout.keys)
    seg_of_key = torch.repeat_interleave(torch.arange(len(layout.keys)), lengths_k)
    local_key = torch.arange(int(lengths_k.sum())) - cu_k.cpu().long()[seg_of_key]
    head_dim = max(16, max(layout.keys))
    q = torch.zeros(sum(layout.lengths_q), num_heads, head_dim, device=DEVICE)
    k = torch.randn(sum(layout.keys), num_heads, head_dim).to(DEVICE)
    v = torch.nn.functional.one_hot(local_key, head_dim).float()[:, None, :].expand(-1, num_heads, -1)
    out, _ = torch.ops.hierkern.triton_varlen_fwd(
        q,
        k,
        v.contiguous().to(DEVICE),
        cu_q,
        cu_k,
        max(layout.lengths_q),
        max(layout.keys),
        1.0,
        -1,
        -1,
        dropout_p,
        rng_state,
    )
    seg_of_query = torch.repeat_interleave(torch.arange(len(layout.lengths_q)), torch.tensor(layout.lengths_q))
    lk = lengths_k[seg_of_query].double()[:, None, None]  # (total_q, 1, 1)
    weights = out.double().cpu() * lk * (1 - dropout_p)  # 1 = kept, 0 = dropped
    assert torch.allclose(weights, weights.round(), atol=1e-5)
    return weights.round().bool(), seg_of_query, local_key


def _masked_reference(q, k, v, layout, keep, seg_of_query, local_key, dropout_p):
    """float64 attention with an explicit keep-mask ``(total_q, H, D >= Lk)`` indexed by local key."""
    cu_q, cu_k = (t.cpu().tolist() for t in _offsets(layout))
    outs = []
    for s in range(len(layout.lengths_q)):
        a, b, c, d = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[c:d]) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores, -1)
        mask = keep[a:b, :, : d - c].permute(1, 0, 2).double()
        outs.append(torch.einsum("hqk,khd->qhd", probs * mask / (1 - dropout_p), v[c:d]))
    return torch.cat(outs)


def test_dropout_mask_is_reproducible_and_shared_by_the_backward():
    layout = Layout("dropout", (20, 13, 1))
    p, num_heads = 0.3, 2
    rng_state = torch.tensor([1234567, 89], dtype=torch.int64, device=DEVICE)
    keep, seg_of_query, local_key = _dropout_mask(layout, num_heads, rng_state, p)
    again, _, _ = _dropout_mask(layout, num_heads, rng_state, p)
    assert torch.equal(keep, again)
    other, _, _ = _dropout_mask(layout, num_heads, torch.tensor([1234567, 90], device=DEVICE), p)
    assert not torch.equal(keep, other)
    # Only visible keys can be kept; among them the kept fraction is 1 - p.
    lk = torch.tensor(layout.keys)[seg_of_query]
    visible = torch.arange(keep.shape[-1])[None, None, :] < lk[:, None, None]
    assert not keep[~visible.expand_as(keep)].any()
    kept = keep[visible.expand_as(keep)].double().mean().item()
    assert abs(kept - (1 - p)) < 0.06

    # Random inputs with the same rng_state: outputs and all three gradients match the masked reference,
    # so the backward kernels regenerated exactly the forward's mask.
    gen = torch.Generator().manual_seed(8)
    q, k, v = (
        torch.randn(n, num_heads, 16, generator=gen, dtype=torch.float64)
        for n in (sum(layout.lengths_q), sum(layout.keys), sum(layout.keys))
    )
    cu_q, cu_k = _offsets(layout)
    dev = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    out, _ = torch.ops.hierkern.triton_varlen_fwd(*dev, cu_q, cu_k, 20, 20, 0.25, -1, -1, p, rng_state)
    ref64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _masked_reference(*ref64, layout, keep, seg_of_query, local_key, p)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    assert _close(out, ref, 2e-6)
    grads = torch.autograd.grad(out, dev, dout.float().to(DEVICE))
    ref_grads = torch.autograd.grad(ref, ref64, dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _close(g, r, 1e-5), f"d{name}: rel err {rel_err(g, r):.2e}"


def test_dropout_through_varlen_attention_follows_torch_seed():
    layout = LAYOUTS[0]
    q, k, v = random_qkv(layout, 1, 1, 16, device=DEVICE, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    a, _ = _triton(q, k, v, layout, False, dropout_p=0.5)
    torch.manual_seed(0)
    b, _ = _triton(q, k, v, layout, False, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.isnan(a).any()


def _window_visibility(layout: Layout, window_left: int, window_right: int) -> torch.Tensor:
    """Bool ``(total_q, total_k)``, straight from the definition: query ``i`` of a segment sees its key ``j`` iff
    ``i + Lk - Lq - window_left <= j <= i + Lk - Lq + window_right`` (a negative bound: no bound)."""
    seen = torch.zeros(sum(layout.lengths_q), sum(layout.keys), dtype=torch.bool)
    cu_q, cu_k = (t.tolist() for t in _offsets(layout, "cpu"))
    for s, (lq, lk) in enumerate(zip(layout.lengths_q, layout.keys)):
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        diag = i + lk - lq
        block = (j >= diag - window_left if window_left >= 0 else j >= 0) & (
            j <= diag + window_right if window_right >= 0 else j >= 0
        )
        seen[cu_q[s] : cu_q[s + 1], cu_k[s] : cu_k[s + 1]] = block
    return seen


def _dense_oracle(q, k, v, seen, softmax_scale, keep=None, p=0.0):
    """float64 attention over all packed tokens with visibility ``seen`` ``(total_q, total_k)`` and dropout as
    an explicit keep mask ``(H, total_q, total_k)``; rows that see no key give zeros. Differentiable."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * softmax_scale
    has_keys = seen.any(-1)[None, :, None]
    probs = torch.softmax(scores.masked_fill(~seen, -math.inf).masked_fill(~has_keys, 0.0), -1) * has_keys
    if keep is not None:
        probs = probs * keep / (1 - p)
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1))


# Unequal query and key lengths (keys longer, shorter, none, queries none) across 16-token tiles, every key
# count <= 16 = head_dim so that one-hot values can carry each key's weight.
WINDOW_LAYOUT = Layout("window", (5, 1, 12, 3, 0, 16, 9, 2), (7, 14, 4, 0, 3, 16, 11, 2))
WINDOWS = [(-1, -1), (-1, 0), (2, 0), (0, 3), (1, 1), (3, -1), (0, 0), (30, 30)]


@pytest.mark.parametrize("window", WINDOWS, ids=[f"{l},{r}" for l, r in WINDOWS])
def test_window_matches_the_definition_forward_and_backward(window):
    """Every kind of window on GQA with unequal lengths: outputs, lse (-inf exactly for the rows that see no
    key, never NaN) and gradients against a float64 oracle built from the definition."""
    layout = WINDOW_LAYOUT
    gen = torch.Generator().manual_seed(21)
    q, k, v = random_qkv(layout, 4, 2, 16, device=DEVICE, generator=gen, requires_grad=True)
    cu_q, cu_k = _offsets(layout)
    out, lse = torch.ops.hierkern.triton_varlen_fwd(q, k, v, cu_q, cu_k, 16, 16, 0.25, *window, 0.0, None)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    seen = _window_visibility(layout, *window)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = _dense_oracle(q64, k64, v64, seen, 0.25)
    ref_lse = torch.logsumexp(
        torch.einsum("qhd,khd->hqk", q64, k64.repeat_interleave(2, 1)).detach() * 0.25
        + torch.where(seen, 0.0, -math.inf),
        -1,
    )
    assert _close(out, ref, 2e-6)
    _check_lse(lse, ref_lse, 1e-5)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())):
        assert _close(g, r, 1e-5), f"d{name}: rel err {rel_err(g, r):.2e}"
    # The public entry point hands the triton backend the same window.
    via_api = hierkern.varlen_attention(
        q, k, v, cu_q, cu_k, 16, 16, softmax_scale=0.25, window_size=window, backend="triton"
    )
    assert torch.equal(via_api, out)


def test_window_skips_the_gaps_between_segments():
    """Blocks whose rows' (or keys') ranges leave gaps: a left bound on short query segments over long key
    segments (the forward and dq skip key blocks), a right bound on long query segments over short key ones (dk/dv
    skip query blocks). NaN in every token that no row sees stays out, and the results match the oracle."""
    layout = Layout("gaps", (1, 2, 1, 40, 1), (40, 33, 20, 2, 18))
    gen = torch.Generator().manual_seed(22)
    q, k, v = random_qkv(layout, 2, 1, 16, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    cu_q, cu_k = _offsets(layout)
    for window in ((1, 0), (-1, 0), (2, 1)):
        seen = _window_visibility(layout, *window)
        q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        ref = _dense_oracle(q64, k64, v64, seen, 0.25)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
        poisoned = [t.clone() for t in (q, k, v)]
        unseen_keys, unseen_rows = ~seen.any(0), ~seen.any(1)
        poisoned[1][unseen_keys.to(DEVICE)] = math.nan
        poisoned[2][unseen_keys.to(DEVICE)] = math.nan
        poisoned[0][unseen_rows.to(DEVICE)] = math.nan
        leaves = [t.requires_grad_() for t in poisoned]
        out, _ = torch.ops.hierkern.triton_varlen_fwd(*leaves, cu_q, cu_k, 40, 40, 0.25, *window, 0.0, None)
        grads = torch.autograd.grad(out, leaves, dout)
        assert _close(out, ref, 2e-6), window
        for name, g, r in zip("qkv", grads, ref_grads):
            assert _close(g, r, 1e-5), f"{window} d{name}: rel err {rel_err(g, r):.2e}"


def test_window_keeps_a_nan_key_out_of_the_rows_that_do_not_see_it():
    """The careful pass under a window: a NaN key and value in the middle of a long segment reach only the
    rows whose window holds them (and, through those rows, the gradients of the keys they see)."""
    layout = Layout("nan-window", (3, 40, 2))
    window = (4, 2)
    gen = torch.Generator().manual_seed(23)
    q, k, v = random_qkv(layout, 2, 2, 16, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    cu_q, cu_k = _offsets(layout)
    bad = 3 + 20
    seen = _window_visibility(layout, *window)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = _dense_oracle(q64, k64, v64, seen, 0.25)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    k, v = k.clone(), v.clone()
    k[bad], v[bad] = math.nan, math.nan
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.hierkern.triton_varlen_fwd(*leaves, cu_q, cu_k, 40, 40, 0.25, *window, 0.0, None)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    hit = seen[:, bad]  # the rows that see the NaN key
    reached = seen[hit].any(0)  # the keys those rows see
    assert hit.sum() == 7 and torch.isnan(out[hit.to(DEVICE)]).all()
    clean_rows, clean_keys = (~hit).to(DEVICE), (~reached).to(DEVICE)
    assert _close(out[clean_rows], ref[~hit], 2e-6) and not torch.isnan(lse[:, clean_rows]).any()
    assert _close(dq[clean_rows], ref_grads[0][~hit], 1e-5)
    for name, g, r in (("k", dk, ref_grads[1]), ("v", dv, ref_grads[2])):
        assert _close(g[clean_keys], r[~reached], 1e-5), f"d{name}"


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 1)], ids=["full", "causal", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_is_the_projects_philox_layout(dtype, window):
    """The mask the kernel applies, read back through one-hot values (q = 0: every visible key weighs
    1 / #visible, dropped ones 0), is hierkern.philox's model of csrc/common/philox.h for the rng_state that
    torch.manual_seed gives, on GQA with unequal lengths; for causal and full attention it is also the cpu
    backend's mask under the same seed. Then the backward regenerates it: random inputs' outputs and gradients
    match a float64 oracle given that mask."""
    from hierkern import philox

    layout, p, heads, kv_heads, d = WINDOW_LAYOUT, 0.4, 4, 2, 16
    total_q, total_k = sum(layout.lengths_q), sum(layout.keys)
    cu_q, cu_k = _offsets(layout)
    seen = _window_visibility(layout, *window)
    seg_k = torch.repeat_interleave(torch.arange(len(layout.keys)), torch.tensor(layout.keys))
    local_key = torch.arange(total_k) - cu_k.cpu().long()[seg_k]
    q = torch.zeros(total_q, heads, d, dtype=dtype, device=DEVICE)
    k = torch.randn(total_k, kv_heads, d).to(DEVICE, dtype)
    v = torch.nn.functional.one_hot(local_key, d)[:, None, :].expand(-1, kv_heads, -1).to(DEVICE, dtype)

    torch.manual_seed(77)
    state = philox.rng_state()
    model = philox.keep_mask(*state.tolist(), heads, total_q, total_k, p) & seen  # (H, total_q, total_k)
    expected = torch.zeros(total_q, heads, d, dtype=torch.bool)
    rows, keys = torch.nonzero(seen, as_tuple=True)
    expected[rows, :, local_key[keys]] = model[:, rows, keys].T
    assert expected.any() and (~expected & seen.any(1)[:, None, None]).any()

    out, _ = torch.ops.hierkern.triton_varlen_fwd(q, k, v, cu_q, cu_k, 16, 16, 1.0, *window, p, state.to(DEVICE))
    assert torch.equal(out.cpu() != 0, expected)
    if window[0] < 0:
        causal = window[1] == 0
        outs = []
        for name in ("triton", "cpu"):
            torch.manual_seed(77)
            outs.append(
                hierkern.varlen_attention(
                    q.cpu(),
                    k.cpu(),
                    v.cpu(),
                    cu_q.cpu(),
                    cu_k.cpu(),
                    16,
                    16,
                    softmax_scale=1.0,
                    causal=causal,
                    dropout_p=p,
                    backend=name,
                )
            )
        assert torch.equal(outs[0] != 0, expected) and torch.equal(outs[1] != 0, expected)

    gen = torch.Generator().manual_seed(24)
    q, k, v = random_qkv(layout, heads, kv_heads, d, dtype=dtype, device=DEVICE, generator=gen, requires_grad=True)
    out, _ = torch.ops.hierkern.triton_varlen_fwd(q, k, v, cu_q, cu_k, 16, 16, 0.25, *window, p, state.to(DEVICE))
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = _dense_oracle(q64, k64, v64, seen, 0.25, keep=model, p=p)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _close(out, ref, rtol, atol=1e-6 if dtype == torch.float32 else 1e-3)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _close(g, r, rtol, atol=1e-6 if dtype == torch.float32 else 1e-3), (
            f"d{name}: rel err {rel_err(g, r):.2e}"
        )


# ---------------------------------------------------------------------------------------------------------
# Registration: backend selection, refusals, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------


def _call(**changes):
    fields = dict(
        device_type=DEVICE,
        dtype=torch.float16,
        head_dim=64,
        num_heads=8,
        num_kv_heads=2,
        max_seqlen_q=8,
        max_seqlen_k=8,
        window_size=(-1, 0),
        dropout=True,
        requires_grad=True,
    )
    fields.update(changes)
    return AttentionCall(**fields)


def test_backend_accepts_and_refuses_in_words():
    backend = get_backend("triton")
    assert backend.why_not(_call()) is None
    assert backend.why_not(_call(dtype=torch.bfloat16, head_dim=24)) is None
    assert "float64" in backend.why_not(_call(dtype=torch.float64))
    assert "head_dim" in backend.why_not(_call(head_dim=160))
    assert explain(_call())["triton"] is None
    q = torch.randn(3, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        hierkern.varlen_attention(q, q, q, offsets_of([3], DEVICE), backend="triton")


def test_auto_prefers_triton_on_cuda_but_never_the_interpreter_on_cpu():
    assert get_backend("triton").priority > max(get_backend(n).priority for n in ("cpu", "reference"))
    assert select_backend(_call(device_type="cpu", dtype=torch.float32)).name != "triton"
    if torch.cuda.is_available():
        assert select_backend(_call(device_type="cuda")).name == "triton"


def _small_args(requires_grad=False, dtype=torch.float32):
    layout = Layout("small", (3, 0, 5), (4, 2, 5))
    q, k, v = random_qkv(
        layout,
        2,
        1,
        16,
        dtype=dtype,
        device=DEVICE,
        generator=torch.Generator().manual_seed(10),
        requires_grad=requires_grad,
    )
    cu_q, cu_k = _offsets(layout)
    return (q, k, v, cu_q, cu_k, 5, 5, 0.25, -1, 0, 0.0, None)


# AOTAutograd's functionalised kernel call cannot run in the interpreter, so test_aot_dispatch_dynamic runs on
# CUDA only (test_cuda_opcheck_aot_dispatch).
_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    args = _small_args(requires_grad=True)
    torch.library.opcheck(torch.ops.hierkern.triton_varlen_fwd, args, test_utils=_OPCHECK_UTILS)
    out, lse = torch.ops.hierkern.triton_varlen_fwd(*args)
    bwd_args = (torch.ones_like(out), *(t.detach() for t in args[:3]), out.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.hierkern.triton_varlen_bwd, bwd_args, test_utils=_OPCHECK_UTILS)


def test_import_without_triton_registers_an_unavailable_backend():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import hierkern\n"
        "from hierkern.backends import get_backend\n"
        "print(get_backend('triton').unavailable_reason())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "triton is not importable" in proc.stdout


def test_torch_compile_fullgraph():
    args = _small_args()
    q, k, v, cu_q, cu_k = args[:5]

    def f(q, k, v):
        return hierkern.varlen_attention(q, k, v, cu_q, cu_k, 5, 5, causal=True, backend="triton") * 2

    # Inductor compiles Triton launches for CUDA tensors only, and AOTAutograd's functionalised kernel call
    # cannot run in the interpreter; on CPU the check is that Dynamo captures the call in one graph.
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "eager")
    assert _close(compiled(q, k, v), f(q, k, v), 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Real GPU
# ---------------------------------------------------------------------------------------------------------


def _gpu_layouts():
    gen = torch.Generator().manual_seed(11)
    words = tuple(int(x) for x in torch.randint(1, 15, (3000,), generator=gen))
    return (
        adversarial_layouts(tile=64)
        + adversarial_layouts(tile=128, seed=1)
        + [
            Layout("many-words", words),
            Layout("long", (1000, 3, 2047, 5)),
            Layout("cross-long", (1, 700, 40), (900, 3, 64)),
        ]
    )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_matches_oracle_forward_and_backward(dtype, causal):
    for layout in _gpu_layouts():
        for num_heads, num_kv_heads, head_dim in ((4, 2, 64), (2, 1, 80), (2, 2, 128)):
            q, k, v = random_qkv(
                layout, num_heads, num_kv_heads, head_dim, dtype=dtype, device="cuda", requires_grad=True
            )
            cu_q, cu_k = _offsets(layout, "cuda")
            out, lse = _triton(q, k, v, layout, causal)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            ref_out, ref_grads = _reference_grads(q, k, v, layout, causal, dout)
            own_out, own_lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
            own_grads = torch.autograd.grad(own_out, (q, k, v), dout)
            where = f"{layout.name} H={num_heads}/{num_kv_heads} D={head_dim}"
            assert rel_err(out, ref_out) <= 2 * rel_err(own_out, ref_out) + 1e-6, where
            _check_lse(lse, own_lse.double(), 1e-2)
            for name, g, own, ref in zip("qkv", grads, own_grads, ref_grads):
                assert rel_err(g, ref) <= 3 * rel_err(own, ref) + 1e-5, f"d{name} {where}"


@requires_cuda
def test_cuda_opcheck_aot_dispatch():
    torch.library.opcheck(torch.ops.hierkern.triton_varlen_fwd, _small_args(requires_grad=True))


@requires_cuda
def test_cuda_backward_is_deterministic_and_sync_free():
    layout = _gpu_layouts()[-3]
    seg_q = hierkern.Segments.from_lengths(list(layout.lengths_q), device="cuda")
    q, k, v = random_qkv(layout, 8, 2, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = hierkern.varlen_attention(q, k, v, seg_q, causal=True, backend="triton")
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_fp32_respects_allow_tf32():
    layout = _gpu_layouts()[-2]
    q, k, v = random_qkv(layout, 2, 2, 64, device="cuda")
    ref_out, _ = oracle_attention(q, k, v, *(t.cpu() for t in _offsets(layout)))
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = rel_err(_triton(q, k, v, layout, False)[0], ref_out)
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = rel_err(_triton(q, k, v, layout, False)[0], ref_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert exact < 1e-5 < fast < 1e-2
