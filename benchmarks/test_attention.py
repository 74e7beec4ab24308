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
* CUDA only: ``torch-flex`` (compiled FlexAttention over the packed sequence with a document mask; the mask
  is built before timing and its build time recorded as ``extra_info["mask_build_s"]``) and
  ``flash-attn-varlen`` (``flash_attn_varlen_func``, when flash-attn is installed).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import hierkern
from harness import (BYTES_DEFINITION, MODES, Prepared, Problem, case_id, cases, make_problem, padded_guard,
                     per_segment_guard, reference64, run_benchmark)


def baseline_impls(device: str) -> list[str]:
    impls = ["torch-sdpa-padded", "torch-sdpa-nested", "torch-sdpa-loop"]
    if device == "cuda":
        impls += ["torch-flex", "flash-attn-varlen"]
    return impls


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device, workload, mode, dtype in cases(metafunc.config, MODES):
        impls = [f"hierkern-{name}" for name in hierkern.available_backends(device)]
        for impl in impls + baseline_impls(device):
            params.append((device, workload, mode, dtype, impl))
            ids.append(f"{case_id(device, workload, mode, dtype)}-{impl}")
    metafunc.parametrize("device,workload,mode,dtype,impl", params, ids=ids)


def _packed_result(result):
    out, grads = result
    return out.detach(), grads


def attention_call(p: Problem, q, k, v) -> hierkern.AttentionCall:
    with torch.set_grad_enabled(p.backward):
        return hierkern.AttentionCall.of(q, k, v, p.seg.max_len, p.seg.max_len, False, 0.0)


def prepare_hierkern(p: Problem, backend: str, size: str) -> Prepared:
    q, k, v = p.leaves()
    reason = hierkern.explain(attention_call(p, q, k, v))[backend]
    if reason is not None:
        pytest.skip(f"hierkern backend {backend!r} refuses this call: {reason}")
    if backend == "reference" and size == "large":
        pytest.skip("the reference backend is the slow fallback (it syncs and pads by length bucket); "
                    "benchmarked at small and default sizes only")

    def run():
        out = hierkern.varlen_attention(q, k, v, p.seg, backend=backend)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None
    return Prepared(run, _packed_result)


def prepare_sdpa_padded(p: Problem) -> Prepared:
    padded_guard(p.workload, p.device, "torch-sdpa-padded")
    seg = p.seg

    def to_padded(t):   # (total, H, D) -> (S, H, max_len, D)
        return seg.unpack(t.detach()).transpose(1, 2).contiguous()

    def to_packed(t):
        return seg.pack(t.transpose(1, 2))

    q, k, v = (to_padded(t).requires_grad_(p.backward) for t in (p.q, p.k, p.v))
    dout = to_padded(p.dout)
    mask = (~seg.padding_mask())[:, None, None, :]      # True = attend

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

    def nested(t):      # (total, H, D) -> jagged (S, H, j, D), a view of t
        return torch.nested.nested_tensor_from_jagged(
            t, offsets, min_seqlen=min_len, max_seqlen=p.seg.max_len).transpose(1, 2)

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
        out = torch.cat([
            F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            .transpose(0, 1)                                                   # (L, H, D) <- (H, L, D)
            for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)) if qs.shape[0]])
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None
    return Prepared(run, _packed_result)


def prepare_flex(p: Problem) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    doc = p.seg.segment_ids()
    total = p.workload.total

    def document_mask(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def build():
        # _compile=True builds the block mask tile by tile; the eager builder materialises total**2 booleans.
        return create_block_mask(document_mask, B=None, H=None, Q_LEN=total, KV_LEN=total, device=p.device,
                                 _compile=True)

    build()     # compile the mask builder once
    times = []
    for _ in range(3):
        torch.cuda.synchronize(p.device)
        start = time.perf_counter()
        block_mask = build()
        torch.cuda.synchronize(p.device)
        times.append(time.perf_counter() - start)
    attend = torch.compile(flex_attention, dynamic=False)
    q, k, v = p.leaves()

    def heads_first(t):     # (total, H, D) -> (1, H, total, D)
        return t.transpose(0, 1).unsqueeze(0)

    def run():
        out = attend(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask)
        out = out.squeeze(0).transpose(0, 1)
        if p.backward:
            return out, torch.autograd.grad(out, (q, k, v), p.dout)
        return out, None
    return Prepared(run, _packed_result, {"mask_build_s": sorted(times)[1]})


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
        prepared = prepare_hierkern(p, impl[len("hierkern-"):], size)
    else:
        prepare = {"torch-sdpa-padded": prepare_sdpa_padded, "torch-sdpa-nested": prepare_sdpa_nested,
                   "torch-sdpa-loop": prepare_sdpa_loop, "torch-flex": prepare_flex,
                   "flash-attn-varlen": prepare_flash_attn}[impl]
        prepared = prepare(p)
    call = attention_call(p, *p.leaves())
    info = dict(workload=workload.name, mode=mode, tokens=workload.total, segments=workload.num_segments,
                mean_len=workload.mean_len, max_len=workload.max_len, num_heads=workload.num_heads,
                head_dim=workload.head_dim, size=size, bytes_definition=BYTES_DEFINITION[mode],
                auto_backend=hierkern.backends.select_backend(call).name)
    run_benchmark(benchmark, group=f"{workload.name}/{mode}/{str(dtype).replace('torch.', '')}", impl=impl,
                  prepared=prepared, reference=reference64(workload, mode, dtype, device), dtype=dtype,
                  device=p.device, floor_bytes=p.attention_bytes(), info=info)
