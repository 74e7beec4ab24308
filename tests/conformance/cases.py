"""What the conformance suite runs: the backends (with the device each runs on here), layouts, head
configurations, error bars, and the helpers that call a backend the way a user would."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import hierkern
from hierkern.backends import AttentionCall, backend_names, get_backend

from . import oracle
from helpers import Layout, adversarial_layouts, offsets_of, rel_err

# The Triton interpreter runs 16x16 tiles (hierkern.ops.triton_attention.INTERPRET_CONFIGS); the CPU kernel
# switches paths at 16 and 32 keys and blocks its backward by 64 rows. The layouts straddle all of them.
TILE = 16
LAYOUTS = adversarial_layouts(tile=TILE) + [
    # Causal with more queries than keys (the first 33 rows of the long segment see nothing), several
    # 64-row backward blocks, and a segment of queries with no keys at all.
    Layout("long-cross", (2, 130, 5), (7, 97, 0)),
]
# Sized for the GPU kernels' tiles (64-row tiles, 16/32-row sub-tiles, multi-block long segments). Triton's
# interpreter would spend minutes on them, so it runs LAYOUTS only; every other backend runs both.
GPU_TILE_LAYOUTS = [
    Layout("tile64-boundaries", (63, 64, 65, 1, 129)),
    Layout("row-tile-boundaries", (15, 16, 17, 31, 32, 33, 1, 65)),
    Layout("long-cross-300", (300, 2, 0), (257, 0, 3)),
]
LAYOUTS = LAYOUTS + GPU_TILE_LAYOUTS
LAYOUT_IDS = [layout.name for layout in LAYOUTS]


def named_layout(name: str) -> Layout:
    return next(lay for lay in LAYOUTS if lay.name == name)


def skip_if_too_big_for_an_interpreter(name: str, device: str, layout: Layout) -> None:
    if name == "triton" and device == "cpu" and layout in GPU_TILE_LAYOUTS:
        pytest.skip("Triton's interpreter takes ~3 ms per tile iteration: the GPU-sized layouts run on a GPU")


@dataclass(frozen=True)
class HeadConfig:
    name: str
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int


HEAD_CONFIGS = [
    HeadConfig("fp32-gqa-d32", torch.float32, 4, 2, 32),
    HeadConfig("fp32-mqa-d40", torch.float32, 2, 1, 40),
    HeadConfig("bf16-d64", torch.bfloat16, 2, 2, 64),
    HeadConfig("fp16-mqa-d128", torch.float16, 2, 1, 128),
    HeadConfig("fp64-mqa-d3", torch.float64, 2, 1, 3),
]

# A backend's error against the float64 oracle may be at most RATIO times the reference backend's error in the
# same dtype on the same inputs (docs/design.md's bar: 2x for outputs, 3x for gradients), or FLOOR, whichever is
# larger: the reference can be exact by luck (one key per row), and float32 kernels sum in another order. CAP
# bounds every backend, the reference included, so that a wrong reference cannot lift the bar.
RATIO = {"out": 2.0, "grad": 3.0}
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 3e-4}
CAP = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _backend_params():
    params = []
    for name in backend_names():
        backend = get_backend(name)
        for device in backend.device_types:
            reason = backend.unavailable_reason()
            if device == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA GPU is visible"
            marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if reason else []
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


BACKENDS = _backend_params()


@dataclass
class Problem:
    """One call's inputs: q, k, v leaves (requiring grad), offsets, and a random output gradient."""

    layout: Layout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor

    @property
    def leaves(self):
        return self.q, self.k, self.v


def make_problem(layout: Layout, config: HeadConfig, device: str, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def draw(tokens, heads):
        x = torch.randn(tokens, heads, config.head_dim, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=config.dtype).requires_grad_(True)

    total_q, total_k = sum(layout.lengths_q), sum(layout.keys)
    q, k, v = draw(total_q, config.num_heads), draw(total_k, config.num_kv_heads), draw(total_k, config.num_kv_heads)
    dout = draw(total_q, config.num_heads).detach()
    return Problem(layout, q, k, v, dout, offsets_of(layout.lengths_q, device), offsets_of(layout.keys, device))


# The masks every numerics test runs, as window_size (left, right): FlashAttention's meaning, -1 unbounded.
MASKS = {"full": (-1, -1), "causal": (-1, 0), "window-2-1": (2, 1)}
# More window shapes, run on fewer head configurations: the diagonal only, left-bounded (local causal-like but
# seeing the future), right-bounded, and bounds wider than any segment.
MORE_WINDOWS = {
    "band-0-0": (0, 0),
    "left-3": (3, -1),
    "right-2": (-1, 2),
    "causal-left-4": (4, 0),
    "wide-200-300": (200, 300),
}


def mask_params(masks: dict[str, tuple[int, int]]):
    return pytest.mark.parametrize("window", list(masks.values()), ids=list(masks))


def _window(causal) -> tuple[int, int]:
    """Tests pass a window ``(left, right)``, or a bool for causal/full."""
    if isinstance(causal, bool):
        return (-1, 0) if causal else (-1, -1)
    return tuple(causal)


def skip_if_refused(name: str, problem: Problem, causal=False, dropout_p: float = 0.0) -> None:
    """Skip the test, in the backend's own words, when it does not take this call (``causal``: a bool or a
    window)."""
    call = AttentionCall.of(
        problem.q,
        problem.k,
        problem.v,
        max(problem.layout.lengths_q, default=0),
        max(problem.layout.keys, default=0),
        window_size=_window(causal),
        dropout_p=dropout_p,
    )
    reason = get_backend(name).why_not(call)
    if reason is not None:
        pytest.skip(f"{name} refuses: {reason}")


def run(name: str, problem: Problem, causal=False, grads: bool = True, **kwargs):
    """``varlen_attention`` through backend ``name`` (``causal``: a bool or a window):
    ``(out, lse, (dq, dk, dv) or None)``."""
    q, k, v = problem.leaves
    out, lse = hierkern.varlen_attention(
        q, k, v, problem.cu_q, problem.cu_k, window_size=_window(causal), return_lse=True, backend=name, **kwargs
    )
    if not grads:
        return out, lse, None
    return out, lse, grad(out, problem.leaves, problem.dout)


def grad(out, leaves, dout, create_graph=False):
    """``d(sum(out * dout)) / d(leaves)``, zeros for leaves that do not reach ``out``."""
    return torch.autograd.grad(
        out, leaves, dout.to(out.dtype), allow_unused=True, materialize_grads=True, create_graph=create_graph
    )


def run_oracle(problem: Problem, causal=False, softmax_scale=None, grads: bool = True):
    leaves = tuple(t.detach().to("cpu", torch.float64).requires_grad_(True) for t in problem.leaves)
    out, lse = oracle.attention(
        *leaves, problem.cu_q.cpu(), problem.cu_k.cpu(), softmax_scale, window_size=_window(causal)
    )
    if not grads:
        return out.detach(), lse.detach(), None
    if not out.requires_grad:  # no row sees a key
        return out.detach(), lse.detach(), tuple(torch.zeros_like(t) for t in leaves)
    return out.detach(), lse.detach(), grad(out, leaves, problem.dout.cpu().double())


def bar(kind: str, dtype: torch.dtype, reference_error: float | None) -> float:
    """The largest error a backend may have: RATIO times the reference's, at least FLOOR, at most CAP (FLOOR
    alone for float32/float64, where no reference error is taken)."""
    if reference_error is None:
        return FLOOR[dtype]
    if math.isnan(reference_error):
        return CAP[dtype]
    return min(max(RATIO[kind] * reference_error, FLOOR[dtype]), CAP[dtype])


def check_lse(lse: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Rows without keys are -inf in both; the rest agree to float32 precision (lse is float32 whatever the
    inputs, computed from the same rounded inputs as the oracle's)."""
    assert lse.dtype == torch.float32
    lse, expected = lse.detach().cpu().double(), expected.detach().cpu()
    empty = torch.isneginf(expected)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly for the rows that see no key"
    torch.testing.assert_close(lse[~empty], expected[~empty], rtol=1e-5, atol=1e-4)


# Worst relative error per (backend-device, dtype, quantity) over the numerics tests run in this session:
# printed at the end of the run (conftest.py), so a backend's author sees its margins, not only pass/fail.
WORST: dict[tuple[str, str, str], float] = {}


def record(backend: str, dtype: torch.dtype, got: dict[str, float]) -> None:
    for quantity, err in got.items():
        key = (backend, str(dtype).replace("torch.", ""), quantity)
        WORST[key] = max(WORST.get(key, 0.0), err) if not math.isnan(err) else math.nan


def errors(out, grads, expected_out, expected_grads) -> dict[str, float]:
    names = ("dq", "dk", "dv")
    result = {"out": rel_err(out, expected_out)}
    if grads is not None:
        result.update({n: rel_err(g, e) for n, g, e in zip(names, grads, expected_grads)})
    return result
