"""A NaN or an inf reaches only the rows that attend to it (issue 11, item 3).

One element of one token of q, k, v (or of the output gradient) is poisoned. Every row and key that does not
interact with that token must come out as in the clean run: out, lse, dq, dk, dv. The rows that do see it follow
IEEE arithmetic like the float64 oracle, which computes each row over exactly its visible keys: the same
elements are non-finite, and the finite ones agree.
"""

import math

import pytest
import torch

import hierkern

from .cases import HeadConfig, Problem, grad, make_problem, skip_if_refused
from .oracle import attention as oracle_attention
from .oracle import visible_keys, window_of
from helpers import Layout

# Short words that share a 16-row tile, and a 40-token segment: the CPU kernel's blocked path (>= 32 keys),
# several tiles, and keys that causal rows do not see.
MIXED = Layout("mixed", (3, 5, 1, 40, 4, 2, 7, 6))
# (segment, position in it) of the poisoned token. "first": the long segment's first key, the only key its first
# causal row sees, so an inf there can leave that row with every visible score -inf (softmax 0/0: NaN).
WHERE = {"short": (1, 2), "long": (3, 10), "first": (3, 0)}
FP32 = HeadConfig("fp32-mqa-d32", torch.float32, 2, 1, 32)
BF16 = HeadConfig("bf16-mqa-d32", torch.bfloat16, 2, 1, 32)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _start(lengths, segment):
    return sum(lengths[:segment])


def _window(causal):
    return window_of(causal) if isinstance(causal, bool) else tuple(causal)


def _rows_seeing(segment, position, causal):
    """Packed query rows of ``segment`` that attend to its key at ``position``."""
    length = MIXED.lengths_q[segment]
    start = _start(MIXED.lengths_q, segment)
    ranges = [visible_keys(row, length, length, _window(causal)) for row in range(length)]
    return [start + row for row, (lo, hi) in enumerate(ranges) if lo <= position < hi]


def _poisoned(problem: Problem, tensor: str, token: int, value: float) -> Problem:
    leaves = {name: t.detach().clone() for name, t in zip("qkv", problem.leaves)}
    dout = problem.dout.clone()
    target = dout if tensor == "dout" else leaves[tensor]
    target[token, 0, 3] = value
    q, k, v = (leaves[name].requires_grad_(True) for name in "qkv")
    return Problem(problem.layout, q, k, v, dout, problem.cu_q, problem.cu_k)


def _run(name, problem, causal):
    out, lse = hierkern.varlen_attention(
        *problem.leaves, problem.cu_q, problem.cu_k, window_size=_window(causal), return_lse=True, backend=name
    )
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse.t()) + grad(out, problem.leaves, problem.dout)))


def _check_untouched(clean, dirty, rows, keys, dtype):
    """``rows``/``keys``: bool masks of the query rows and key tokens that must be as in the clean run."""
    for key, mask in (("out", rows), ("lse", rows), ("dq", rows), ("dk", keys), ("dv", keys)):
        torch.testing.assert_close(
            dirty[key][mask],
            clean[key][mask],
            **TOL[dtype],
            msg=lambda m, key=key: f"{key} of a row/key that never meets the poisoned token changed: {m}",
        )


def _case(backend, tensor, value, where, causal, config):
    name, device = backend
    problem = make_problem(MIXED, config, device)
    skip_if_refused(name, problem, causal)
    segment, position = WHERE[where]
    token = _start(MIXED.lengths_q, segment) + position
    dirty_problem = _poisoned(problem, tensor, token, value)
    clean, dirty = _run(name, problem, causal), _run(name, dirty_problem, causal)

    total = sum(MIXED.lengths_q)
    start, end = _start(MIXED.lengths_q, segment), _start(MIXED.lengths_q, segment + 1)
    in_segment = torch.zeros(total, dtype=torch.bool)
    in_segment[start:end] = True
    rows = torch.ones(total, dtype=torch.bool)
    if tensor in ("q", "dout"):
        rows[token] = False
    else:
        rows[_rows_seeing(segment, position, causal)] = False
    keys = ~in_segment
    if tensor == "q":
        # Keys the poisoned query does not see take no part in its row.
        lo, hi = visible_keys(position, end - start, end - start, _window(causal))
        keys[start : start + lo] = True
        keys[start + hi : end] = True
    device_rows, device_keys = rows.to(device), keys.to(device)
    _check_untouched(clean, dirty, device_rows, device_keys, config.dtype)
    if tensor == "dout":
        return

    # The rows that see the poisoned token: IEEE, like the oracle.
    expected, _ = oracle_attention(
        *dirty_problem.leaves, problem.cu_q.cpu(), problem.cu_k.cpu(), window_size=_window(causal)
    )
    got = dirty["out"].detach().cpu().double()
    seeing = ~rows
    assert torch.equal(torch.isfinite(got[seeing]), torch.isfinite(expected[seeing])), (
        "the rows that see the poisoned token must be non-finite exactly where the float64 oracle is"
    )
    finite = torch.isfinite(expected[seeing])
    torch.testing.assert_close(got[seeing][finite], expected[seeing][finite], **TOL[config.dtype])


@pytest.mark.parametrize("causal", [False, True, (2, 1)], ids=["full", "causal", "window-2-1"])
@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("tensor", ["q", "k", "v", "dout"])
def test_non_finite_value_stays_in_the_rows_that_see_it(backend, tensor, value, where, causal):
    _case(backend, tensor, value, where, causal, FP32)


@pytest.mark.parametrize("tensor", ["k", "v"])
def test_non_finite_value_stays_in_the_rows_that_see_it_bf16(backend, tensor):
    _case(backend, tensor, math.inf, "long", True, BF16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_row_whose_every_visible_score_is_minus_inf(backend, causal):
    """An inf in the first key of the long segment, signed so that query head 0 of the segment's first row
    scores it -inf. Causal, that is the only key the row sees: softmax is 0/0, NaN (not the zeros of a row with
    no keys). Not causal, the key just drops out of that row."""
    segment, position = WHERE["first"]
    token = _start(MIXED.lengths_q, segment) + position
    q = make_problem(MIXED, FP32, "cpu").q
    _case(backend, "k", -math.copysign(math.inf, float(q[token, 0, 3])), "first", causal, FP32)


def test_short_row_whose_only_visible_score_is_minus_inf(backend):
    """The same in a short word (the CPU kernel's lane-parallel path): row 0 of a causal 5-token word sees key 0
    only, and every query scores it -inf."""
    name, device = backend
    problem = make_problem(Layout("word", (5, 4)), FP32, device)
    skip_if_refused(name, problem, causal=True)
    q = problem.q.detach().abs() + 0.1
    k = problem.k.detach().clone()
    k[0, 0, 3] = -math.inf
    out = hierkern.varlen_attention(q, k, problem.v.detach(), problem.cu_q, problem.cu_k, causal=True, backend=name)
    expected, _ = oracle_attention(q, k, problem.v.detach(), problem.cu_q.cpu(), problem.cu_k.cpu(), causal=True)
    assert torch.isnan(expected[0]).all()
    got = out.detach().cpu()
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), "softmax over only -inf scores is NaN"
