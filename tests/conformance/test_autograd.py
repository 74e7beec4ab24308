"""Autograd beyond first-order gradients, and determinism."""

import re

import pytest
import torch

import hierkern
from hierkern.backends import get_backend

from .cases import HEAD_CONFIGS, grad, make_problem, named_layout, rel_err, skip_if_refused
from .oracle import attention as oracle_attention
from helpers import Layout

WORDS = Layout("words", (3, 5, 1, 0, 4, 9))


def test_double_backward_is_right_or_refused_in_words(backend):
    """Second-order gradients (create_graph=True, then another backward) either match the float64 oracle's or
    raise an error naming the backend that supports them; never zeros (issue 11, item 2)."""
    name, device = backend
    problem = make_problem(WORDS, HEAD_CONFIGS[0], device)
    skip_if_refused(name, problem, causal=True)
    weights = torch.randn_like(problem.q)

    def second_order(q, k, v, attend):
        out = attend(q, k, v)
        dq, _, _ = grad(out, (q, k, v), problem.dout.to(out.device, out.dtype), create_graph=True)
        return grad(
            (dq * weights.to(dq.device, dq.dtype)).sum(), (q, k, v), torch.ones((), dtype=dq.dtype, device=dq.device)
        )

    try:
        got = second_order(
            *problem.leaves,
            lambda q, k, v: hierkern.varlen_attention(q, k, v, problem.cu_q, problem.cu_k, causal=True, backend=name),
        )
    except (NotImplementedError, RuntimeError) as exc:
        assert not get_backend(name).capabilities.double_backward, f"{name} declares double backward: {exc}"
        assert re.search(r"backend=[\"']reference[\"']", str(exc)), f"a refusal must name the backend to use: {exc}"
        return
    leaves = tuple(t.detach().cpu().double().requires_grad_(True) for t in problem.leaves)
    expected = second_order(
        *leaves, lambda q, k, v: oracle_attention(q, k, v, problem.cu_q.cpu(), problem.cu_k.cpu(), causal=True)[0]
    )
    for got_grad, expected_grad in zip(got, expected):
        assert expected_grad.norm() > 1.0
        assert rel_err(got_grad, expected_grad) < 1e-4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bitwise_deterministic(backend, causal):
    """The same call twice gives the same bits: outputs, lse and every gradient (GQA sums included)."""
    name, device = backend
    results = []
    for _ in range(2):
        problem = make_problem(named_layout("long-among-tiny"), HEAD_CONFIGS[0], device)
        skip_if_refused(name, problem, causal)
        out, lse = hierkern.varlen_attention(
            *problem.leaves, problem.cu_q, problem.cu_k, causal=causal, return_lse=True, backend=name
        )
        assert not lse.requires_grad
        results.append((out, lse) + grad(out, problem.leaves, problem.dout))
    for first, second in zip(*results):
        assert torch.equal(first, second)
