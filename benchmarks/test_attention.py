"""The attention core: every available hierkern backend vs what people use today, on every workload.

Per (workload, mode, dtype) group:

* ``hierkern-<backend>``: ``hierkern.varlen_attention(..., backend=<backend>)`` on the packed tokens, for
  every backend ``hierkern.available_backends(device)`` lists (a backend that refuses the call is skipped
  with its ``why_not``);
* ``torch-sdpa-padded``: ``F.scaled_dot_product_attention`` on the padded ``(S, H, max_len, D)`` batch with
  a boolean key-padding mask; the tensors are padded before timing (a padded pipeline holds them so);
* ``torch-sdpa-nested``: SDPA on jagged nested tensors built (as views) from the packed tokens;
* ``torch-sdpa-loop``: SDPA on each segment in a Python loop (what a varlen-unaware model does without
  padding);
* ``torch-flex``: FlexAttention, ``torch.compile``d, over the packed sequence with a document mask, as its
  users run it: the block mask is built before timing (its build time is ``extra_info["mask_build_s"]``, its
  first build with compilation ``mask_compile_s``) and ``BLOCK_SIZE`` is swept over ``FLEX_BLOCK_SIZES``
  (each checked against the reference and timed over a few calls; ``extra_info["block_sweep_s"]``), the
  fastest kept. FlexAttention tiles the flattened sequence, so a block spans many short segments: the
  fraction of each visited block that is inside a segment is ``extra_info["block_density"]``. On the CPU
  it runs on the English workloads only (``FLEX_CPU_WORKLOADS``: each block size costs a compilation of
  ~5-15 s), and its forward+backward raises (no CPU backward in torch): that failure is recorded as the
  group's ``torch-flex`` result in the JSON's ``hierkern.failed``;
* CUDA only: ``torch-varlen-attn`` (``torch.nn.attention.varlen.varlen_attn``, torch's FlashAttention-2
  varlen entry point; one call launches a grid with a row per segment, so past 65,535 segments it fails and
  the failure is recorded), ``torch-varlen-attn-chunked`` (the same, one call per ``VARLEN_ATTN_CHUNK``
  segments, when a workload has more) and ``flash-attn-varlen`` (``flash_attn_varlen_func``, when
  flash-attn is installed).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hierkern
from hierkern.bench import Workload

from harness import (
    BYTES_DEFINITION,
    MODES,
    TOLERANCE,
    Prepared,
    Problem,
    case_id,
    cases,
    make_problem,
    padded_guard,
    per_segment_guard,
    reference64,
    rel_err,
    run_benchmark,
)

FLEX_BLOCK_SIZES = (16, 32, 64, 128)
FLEX_CPU_WORKLOADS = ("chars-in-words", "words-in-sentences")
# Segments per varlen_attn call when chunking: under the 65,535 grid rows of one launch, and 128 * segments *
# H * D stays under 2**31 at H=8, D=64 (FlashAttention-2's int32 offset into its dq accumulator).
VARLEN_ATTN_CHUNK = 32000


def baseline_impls(device: str, workload: Workload) -> list[str]:
    impls = ["torch-sdpa-padded", "torch-sdpa-nested", "torch-sdpa-loop"]
    if device == "cuda" or workload.name in FLEX_CPU_WORKLOADS:
        impls.append("torch-flex")
    if device == "cuda":
        impls += ["torch-varlen-attn", "torch-varlen-attn-chunked", "flash-attn-varlen"]
    return impls


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device, workload, mode, dtype in cases(metafunc.config, MODES):
        impls = [f"hierkern-{name}" for name in hierkern.available_backends(device)]
        for impl in impls + baseline_impls(device, workload):
            params.append((device, workload, mode, dtype, impl))
            ids.append(f"{case_id(device, workload, mode, dtype)}-{impl}")
    metafunc.parametrize("device,workload,mode,dtype,impl", params, ids=ids)


def _packed_result(result):
    out, grads = result
    return out.detach(), grads


def attention_call(p: Problem, q, k, v) -> hierkern.AttentionCall:
    with torch.set_grad_enabled(p.backward):
        return hierkern.AttentionCall.of(q, k, v, p.seg.max_len, p.seg.max_len)


def prepare_hierkern(p: Problem, backend: str, size: str) -> Prepared:
    q, k, v = p.leaves()
    reason = hierkern.explain(attention_call(p, q, k, v))[backend]
    if reason is not None:
        pytest.skip(f"hierkern backend {backend!r} refuses this call: {reason}")
    if backend == "reference" and size == "large":
        pytest.skip(
            "the reference backend is the slow fallback (it syncs and pads by length bucket); "
            "benchmarked at small and default sizes only"
        )

    def run():
        out = hierkern.varlen_attention(q, k, v, p.seg, backend=backend)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result)


def prepare_sdpa_padded(p: Problem) -> Prepared:
    padded_guard(p.workload, p.device, "torch-sdpa-padded")
    seg = p.seg

    def to_padded(t):  # (total, H, D) -> (S, H, max_len, D)
        return seg.unpack(t.detach()).transpose(1, 2).contiguous()

    def to_packed(t):
        return seg.pack(t.transpose(1, 2))

    q, k, v = (to_padded(t).requires_grad_(p.backward) for t in (p.q, p.k, p.v))
    dout = to_padded(p.dout)
    mask = (~seg.padding_mask())[:, None, None, :]  # True = attend

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), dout)
        return out, None

    def result(r):
        out, grads = r
        return to_packed(out.detach()), None if grads is None else tuple(to_packed(g) for g in grads)

    return Prepared(run, result, {"padded_tokens": p.workload.padded_tokens})


def prepare_sdpa_nested(p: Problem) -> Prepared:
    if p.device.type == "cpu":
        # torch's CPU SDPA on nested tensors pads to the longest segment and loops over segments.
        padded_guard(p.workload, p.device, "torch-sdpa-nested (CPU)")
        per_segment_guard(p.workload, p.mode, "torch-sdpa-nested (CPU)")
    if p.workload.total == 0:
        pytest.skip("torch-sdpa-nested cannot build a nested tensor with no tokens")
    offsets = p.seg.offsets.long()
    lengths = [n for n in p.workload.lengths]
    min_len = min(lengths)
    q, k, v = p.leaves()

    def nested(t):  # (total, H, D) -> jagged (S, H, j, D), a view of t
        return torch.nested.nested_tensor_from_jagged(
            t, offsets, min_seqlen=min_len, max_seqlen=p.seg.max_len
        ).transpose(1, 2)

    def run():
        out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v)).transpose(1, 2).values()
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result)


def prepare_sdpa_loop(p: Problem) -> Prepared:
    per_segment_guard(p.workload, p.mode, "torch-sdpa-loop")
    lengths = list(p.workload.lengths)
    q, k, v = p.leaves()

    def run():
        # split, not slicing: its backward is one concatenation instead of a full-size gradient per slice.
        out = torch.cat(
            [
                F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)).transpose(
                    0, 1
                )  # (L, H, D) <- (H, L, D)
                for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))
                if qs.shape[0]
            ]
        )
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result)


@dataclass
class FlexChoice:
    """FlexAttention prepared for one problem: the fastest block size's mask and the compiled function."""

    attend: object
    block_mask: object
    extra: dict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, calls: int = 3) -> float:
    """The fastest of ``calls`` timed calls of ``fn``, in seconds (callers have made a first, compiling call)."""
    best = math.inf
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _heads_first(t):  # (total, H, D) -> (1, H, total, D)
    return t.transpose(0, 1).unsqueeze(0)


@functools.lru_cache(maxsize=1)
def flex_choice(workload: Workload, dtype: torch.dtype, device: str) -> FlexChoice:
    """Sweep ``BLOCK_SIZE`` for the forward; the fastest correct block size wins. Cached per problem, so the
    forward+backward group reuses the forward's compilation and mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = make_problem(workload, "fwd", dtype, device)
    doc = p.seg.segment_ids()
    total = workload.total

    def document_mask(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    # A user compiles for their one workload. Without a reset, the previous problems' compilations count towards
    # dynamo's recompile limit, past which flex_attention silently runs eagerly (total**2 scores in memory).
    torch._dynamo.reset()
    # Compiled, the builder evaluates the mask tile by tile; eagerly it materialises total**2 booleans.
    build_mask = torch.compile(create_block_mask, dynamic=False)
    attend = torch.compile(flex_attention, dynamic=False)
    ref_out, _ = reference64(workload, "fwd", dtype, device)
    q, k, v = (_heads_first(t) for t in (p.q, p.k, p.v))
    sweep, best = {}, None
    for block in FLEX_BLOCK_SIZES:

        def build():
            return build_mask(
                document_mask, B=None, H=None, Q_LEN=total, KV_LEN=total, device=p.device, BLOCK_SIZE=block
            )

        try:
            start = time.perf_counter()
            block_mask = build()
            _sync(p.device)
            mask_compile_s = time.perf_counter() - start
            mask_build_s = _timed(build, p.device)
            start = time.perf_counter()
            out = attend(q, k, v, block_mask=block_mask)
            _sync(p.device)
            compile_s = time.perf_counter() - start
            err = rel_err(out.squeeze(0).transpose(0, 1), ref_out)
            if err > TOLERANCE[dtype][0]:
                sweep[block] = f"wrong output (rel. error {err:.3g})"
                continue
            seconds = _timed(lambda: attend(q, k, v, block_mask=block_mask), p.device)
        except (RuntimeError, NotImplementedError) as exc:  # a block size this device cannot compile
            sweep[block] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            continue
        sweep[block] = seconds
        if best is None or seconds < best[0]:
            # Of the visited (q block, kv block) pairs, the fraction of their entries inside a segment: the
            # work FlexAttention does that is not masked out.
            visited = block_mask.kv_num_blocks.sum().item()
            if block_mask.full_kv_num_blocks is not None:
                visited += block_mask.full_kv_num_blocks.sum().item()
            density = workload.attention_pairs() / max(visited * block * block, 1)
            best = (
                seconds,
                block,
                block_mask,
                dict(
                    mask_build_s=mask_build_s, mask_compile_s=mask_compile_s, compile_s=compile_s, block_density=density
                ),
            )
    if best is None:
        pytest.skip(f"torch-flex: no block size ran ({sweep})")
    _, block, block_mask, extra = best
    return FlexChoice(attend, block_mask, dict(block_size=block, block_sweep_s=sweep, **extra))


def prepare_flex(p: Problem) -> Prepared:
    choice = flex_choice(p.workload, p.dtype, str(p.device))
    q, k, v = p.leaves()

    def run():
        out = choice.attend(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=choice.block_mask)
        out = out.squeeze(0).transpose(0, 1)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result, dict(choice.extra))


def prepare_varlen_attn(p: Problem, chunked: bool) -> Prepared:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        pytest.skip(f"torch.nn.attention.varlen.varlen_attn is not in torch {torch.__version__}: {exc}")
    if p.dtype not in (torch.float16, torch.bfloat16):
        pytest.skip(f"varlen_attn (FlashAttention-2) supports float16/bfloat16 only, not {p.dtype}")
    lengths = p.workload.lengths
    if chunked and len(lengths) <= VARLEN_ATTN_CHUNK:
        pytest.skip(
            f"{len(lengths)} segments fit one varlen_attn call (chunks of {VARLEN_ATTN_CHUNK}); "
            f"torch-varlen-attn is that call"
        )
    q, k, v = p.leaves()
    if not chunked:
        offsets, max_len = p.seg.offsets, p.seg.max_len
        calls = [(offsets, max_len)]
        sizes = [p.workload.total]
    else:
        calls, sizes = [], []
        for start in range(0, len(lengths), VARLEN_ATTN_CHUNK):
            part = lengths[start : start + VARLEN_ATTN_CHUNK]
            seg = hierkern.Segments.from_lengths(list(part), device=p.device)
            calls.append((seg.offsets, seg.max_len))
            sizes.append(seg.total)

    def attention(qq, kk, vv):
        outs = [
            varlen_attn(a, b, c, cu, cu, m, m)
            for a, b, c, (cu, m) in zip(qq.split(sizes), kk.split(sizes), vv.split(sizes), calls)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def run():
        out = attention(q, k, v)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result, {"calls": len(calls)})


def prepare_flash_attn(p: Problem) -> Prepared:
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    if p.dtype not in (torch.float16, torch.bfloat16):
        pytest.skip(f"flash-attn supports float16/bfloat16 only, not {p.dtype}")
    q, k, v = p.leaves()
    offsets, max_len = p.seg.offsets, p.seg.max_len

    def run():
        out = flash_attn.flash_attn_varlen_func(q, k, v, offsets, offsets, max_len, max_len)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None

    return Prepared(run, _packed_result)


def test_attention(benchmark, request, skip_without_device, device, workload, mode, dtype, impl):
    skip_without_device(device)
    size = request.config.getoption("--hk-size")
    p = make_problem(workload, mode, dtype, device)
    if impl.startswith("hierkern-"):
        prepared = prepare_hierkern(p, impl[len("hierkern-") :], size)
    else:
        prepare = {
            "torch-sdpa-padded": prepare_sdpa_padded,
            "torch-sdpa-nested": prepare_sdpa_nested,
            "torch-sdpa-loop": prepare_sdpa_loop,
            "torch-flex": prepare_flex,
            "torch-varlen-attn": functools.partial(prepare_varlen_attn, chunked=False),
            "torch-varlen-attn-chunked": functools.partial(prepare_varlen_attn, chunked=True),
            "flash-attn-varlen": prepare_flash_attn,
        }[impl]
        prepared = prepare(p)
    call = attention_call(p, *p.leaves())
    info = dict(
        workload=workload.name,
        mode=mode,
        tokens=workload.total,
        segments=workload.num_segments,
        mean_len=workload.mean_len,
        max_len=workload.max_len,
        num_heads=workload.num_heads,
        head_dim=workload.head_dim,
        size=size,
        bytes_definition=BYTES_DEFINITION[mode],
        auto_backend=hierkern.backends.select_backend(call).name,
    )
    run_benchmark(
        benchmark,
        group=f"{workload.name}/{mode}/{str(dtype).replace('torch.', '')}",
        impl=impl,
        prepared=prepared,
        reference=reference64(workload, mode, dtype, device),
        dtype=dtype,
        device=p.device,
        floor_bytes=p.attention_bytes(),
        info=info,
        family="attention core",
    )
