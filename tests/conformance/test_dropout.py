"""Dropout, for any backend, whatever its random number generator.

With value vectors that are one-hot in the key's position (``v_j = e_j``), the output row is the row of
dropped-and-rescaled attention weights itself. So the forward shows which weights a backend dropped, and the
suite checks: kept weights are ``P / (1 - p)`` exactly where the oracle's ``P`` says, the drop rate is ``p``,
the backward uses the forward's mask (gradients against the oracle given that mask), and ``torch.manual_seed``
makes it reproducible. Every backend drops exactly the weights ``hierkern.philox`` (the one dropout
specification) says for the ``rng_state`` that ``torch.manual_seed`` leads it to draw: masks are equal across
backends.
"""

import math

import pytest
import torch

import hierkern
from hierkern import philox
from hierkern.backends import get_backend

from .cases import HeadConfig, grad, make_problem, rel_err, skip_if_refused
from .oracle import attention as oracle_attention
from helpers import Layout

LAYOUT = Layout("words", (3, 5, 1, 0, 4, 9, 2, 7, 14, 6, 1, 8, 11, 3, 5, 2, 4))  # every key count <= head_dim
CONFIG = HeadConfig("fp32-mqa-d32", torch.float32, 4, 1, 32)
P = 0.3


def _one_hot_problem(device):
    problem = make_problem(LAYOUT, CONFIG, device)
    v = torch.zeros_like(problem.v.detach())
    for start, end in zip(problem.cu_k[:-1].tolist(), problem.cu_k[1:].tolist()):
        v[start:end] = torch.eye(end - start, CONFIG.head_dim, device=device)[:, None, :]
    problem.v = v.requires_grad_(True)
    return problem


def _attend(name, problem, window):
    return hierkern.varlen_attention(
        *problem.leaves, problem.cu_q, problem.cu_k, window_size=window, dropout_p=P, backend=name
    )


def _specified_keep(name, device, problem, seed):
    """``(total_q, H, max_k)`` bool: the weights hierkern.philox keeps for the rng_state that backend ``name``
    draws after ``torch.manual_seed(seed)``, by local key position (as the one-hot read-back sees them)."""
    torch.manual_seed(seed)
    state = philox.rng_state(device if get_backend(name).capabilities.rng_on_device else "cpu")
    starts_q, starts_k = problem.cu_q.cpu().long(), problem.cu_k.cpu().long()
    seg = torch.repeat_interleave(torch.arange(len(starts_q) - 1), starts_q.diff())
    local = torch.arange(CONFIG.head_dim)
    keys = starts_k[seg][:, None, None] + local  # (total_q, 1, max_k)
    heads = torch.arange(CONFIG.num_heads)[None, :, None]
    queries = torch.arange(len(seg))[:, None, None]
    return philox.attention_keep(state.cpu(), heads, queries, keys, P)


WINDOWS = {"full": (-1, -1), "causal": (-1, 0), "window-2-1": (2, 1)}


@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
def test_dropout_forward_backward_and_rate(backend, window):
    name, device = backend
    problem = _one_hot_problem(device)
    skip_if_refused(name, problem, window, dropout_p=P)
    torch.manual_seed(1234)
    out = _attend(name, problem, window)
    grads = grad(out, problem.leaves, problem.dout)

    weights = out.detach().cpu().double()  # (total_q, H, max_k): dropped P / (1 - p)
    probs, _ = oracle_attention(
        *(t.detach() for t in problem.leaves[:2]),
        problem.v.detach(),
        problem.cu_q.cpu(),
        problem.cu_k.cpu(),
        window_size=window,
    )
    keep = weights != 0
    visible = probs != 0
    assert not (keep & ~visible).any(), "a weight the mask hides came out non-zero"
    specified = _specified_keep(name, device, problem, 1234)
    assert torch.equal(keep, specified & visible), "the dropped weights are not hierkern.philox's"
    torch.testing.assert_close(weights[keep], probs[keep] / (1 - P), rtol=1e-5, atol=1e-6)
    draws = int(visible.sum())
    dropped = int((visible & ~keep).sum())
    sigma = math.sqrt(draws * P * (1 - P))
    assert abs(dropped - P * draws) < 5 * sigma, f"dropped {dropped} of {draws} weights with p={P}"

    leaves = tuple(t.detach().cpu().double().requires_grad_(True) for t in problem.leaves)
    expected_out, _ = oracle_attention(
        *leaves, problem.cu_q.cpu(), problem.cu_k.cpu(), window_size=window, keep=keep, dropout_p=P
    )
    expected = grad(expected_out, leaves, problem.dout.cpu().double())
    for label, got_grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected):
        assert rel_err(got_grad, expected_grad) < 1e-4, f"{label} does not follow the forward's dropout mask"


def test_dropout_follows_torch_manual_seed(backend):
    name, device = backend
    problem = _one_hot_problem(device)
    skip_if_refused(name, problem, True, dropout_p=P)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(_attend(name, problem, (-1, 0)).detach())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
