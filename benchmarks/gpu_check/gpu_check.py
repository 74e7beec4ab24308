#!/usr/bin/env python3
"""hierkern on one GPU machine: the phases that benchmarks/gpu_check/gpu_check.sh runs in a single ~9-minute call.

    env      device, versions, measured copy bandwidth and bf16 matmul rate (the two ceilings)
    sweep    EVERY Triton autotune config (fwd, dq, dk/dv) pinned in turn, x dtypes, head dims (64, 128, 80,
             24), causal, GQA, cross-attention, zero-length and 2047-token segments, dropout: NaN-poisoned
             outputs, lse, gradients vs the float64 reference, bitwise determinism; for some shapes an inf in k
             and a NaN in v as well, which runs each config's careful pass (see triton_attention.py). Parallel
             worker processes.
    launches the single-kernel launches that perf times per config (fast pass only) against the launchers'
             results, bit for bit (perf runs this check too, on the target)
    perf     the target: 2^20 characters of English words (mean ~4.7), H=8, D=64, bf16. hierkern triton and
             cuda, forward and forward+backward, through the API and per kernel, each Triton config; checked
             against the float32 reference first; fraction of the memory floor at the measured copy rate.
    flex     FlexAttention with a document mask on the same problem (subprocess; compiles early, times only
             after the file given by --flag exists, so its compile overlaps other phases but its timing does not)
    fa2      torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside torch): unchunked (expected to fail:
             grid.y = number of segments > 65535), then chunked to <= 32000 segments per call
    extra    words-in-sentences (2^20 tokens, D=64) and the suite's chars-in-words large shape (D=32)
    summary  one table from the records
    junit    merges the GPU pytest runs' JUnit XML files into one and counts them per backend / file
    lengths  the workload builders' sizes (no GPU)

Every phase appends JSON records to $OUT/20_records.jsonl and never raises: a failure becomes a record.

CPU dry run (TRITON_INTERPRET=1 HK_GPU_CHECK_DEVICE=cpu HK_GPU_CHECK_TINY=1): sweep and launches run on tiny
problems in Triton's interpreter; summary, junit and lengths need no device. tests/test_gpu_check.py runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
OUT = os.environ.get("OUT") or os.path.join(ROOT, "gpu-out")
RECORDS = os.path.join(OUT, "20_records.jsonl")
T0 = time.time()
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TARGET_TOKENS = 2**20
# The CPU dry run (module docstring) checks this script's own logic without a GPU.
DEV = os.environ.get("HK_GPU_CHECK_DEVICE", "cuda")
TINY = os.environ.get("HK_GPU_CHECK_TINY") == "1"


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def emit(rec: dict) -> None:
    rec.setdefault("t", round(time.time() - T0, 1))
    rec.setdefault("unix", round(time.time(), 1))  # comparable across the script's processes
    line = json.dumps(rec, default=str)
    os.makedirs(OUT, exist_ok=True)
    with open(RECORDS, "a") as f:
        f.write(line + "\n")
    print("REC " + line[:600], flush=True)


def guarded(phase: str):
    def wrap(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except BaseException as exc:  # noqa: BLE001  (a record, never a crash)
                emit(
                    {
                        "phase": phase,
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "trace": traceback.format_exc()[-3000:],
                    }
                )
                if isinstance(exc, KeyboardInterrupt):
                    raise

        return run

    return wrap


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


# ------------------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------------------


def chars_lengths(total: int = TARGET_TOKENS, seed: int = 0) -> list[int]:
    """English word lengths (hierkern.bench's table) summing to exactly ``total`` characters."""
    from hierkern.bench.workloads import english_text

    words, _ = english_text(int(total / 4.5) + 1000, seed)
    out, s = [], 0
    for w in words:
        if s + w > total:
            break
        out.append(w)
        s += w
    if s < total:
        out.append(total - s)
    return out


def sentence_lengths(total: int = TARGET_TOKENS, seed: int = 0) -> list[int]:
    from hierkern.bench.workloads import english_text

    _, sentences = english_text(total, seed)
    return list(sentences)


def suite_large_chars() -> list[int]:
    """chars-in-words at the suite's --hk-size=large CUDA size (262144 words, ~1.23M characters)."""
    from hierkern.bench.workloads import english_text

    words, _ = english_text(262144, 0)
    return list(words)


def mega_layout() -> tuple[list[int], list[int]]:
    """Every adversarial layout of the test suite, concatenated into one packed problem (segments are
    independent, so one launch covers them all): zero-length segments (leading, trailing, runs), length 1,
    tile sizes +-1 for 64 and 128, a 2047-token segment, cross-attention with keys shorter and longer than
    queries, whole tiles of queries that see no key and of keys that no query sees, and 600 word-like
    segments."""
    import random

    from helpers import Layout, adversarial_layouts

    if TINY:
        return [0, 3, 0, 17, 1, 5, 0], [0, 5, 2, 15, 0, 5, 3]
    layouts = (
        adversarial_layouts(tile=64)
        + adversarial_layouts(tile=128, seed=1)
        + [
            Layout("long", (1000, 3, 2047, 5)),
            Layout("cross-long", (1, 700, 40), (900, 3, 64)),
            # Whole tiles with no visible key (queries without keys; with causal, 298 rows before the first key) and
            # whole key tiles that no query sees: the kernels' empty-range path (lo = INT32_MAX, hi = 0).
            Layout("keyless", (300, 130, 5, 0, 2), (2, 0, 5, 300, 2)),
        ]
    )
    rng = random.Random(7)
    words = [rng.choice((1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 11, 14, 20)) for _ in range(600)]
    lq, lk = [0, 0], [0, 0]
    for lay in layouts:
        lq += list(lay.lengths_q)
        lk += list(lay.keys)
    return lq + words + [0], lk + words + [0]


# ------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------------------


def bench_ms(fn, rep: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def peak_bytes(fn) -> int:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def rel_err(x, ref) -> float:
    import torch

    x, ref = x.detach().double(), ref.detach().double().to(x.device)
    if not bool(torch.isfinite(x).all()):
        return math.inf
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom else diff


def copy_tbps() -> float:
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep=100)
    src = dst = None  # free the 2 GiB before the next phase
    return 2 * 2**30 / (ms * 1e-3) / 1e12


def floors(total: int, heads: int, head_dim: int, elem: int = 2) -> dict:
    """Fewest bytes: fwd reads q, k, v and writes out + lse; bwd reads q, k, v, dout, lse and writes dq, dk, dv.
    Not out: delta = rowsum(dout * out) can be summed from P and dP instead, as the CUDA kernels always do and
    the Triton kernels do for fp16/bf16 (delta is the kernels' own scratch and not counted)."""
    t = total * heads * head_dim * elem
    lse = total * heads * 4
    return {"fwd": 4 * t + lse, "bwd": 7 * t + lse, "fwd+bwd": 11 * t + 2 * lse}


def problem(lengths, heads, head_dim, dtype, seed=0):
    import torch

    import hierkern

    g = torch.Generator(device=DEV).manual_seed(seed)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, heads, head_dim, device=DEV, dtype=dtype, generator=g) for _ in range(4))
    seg = hierkern.Segments.from_lengths(list(lengths), device=DEV)
    return q, k, v, dout, seg


def reference32(q, k, v, dout, seg, causal=False):
    """hierkern.reference in float32 on the GPU: (out, (dq, dk, dv))."""
    import torch

    from hierkern.reference import varlen_attention_reference

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out, _ = varlen_attention_reference(*leaves, seg.offsets, seg.offsets, causal=causal)
        grads = torch.autograd.grad(out, leaves, dout.float())
    return out.detach(), tuple(g.detach() for g in grads)


# ------------------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------------------


@guarded("env")
def phase_env(args):
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, rep=200)
    emit(
        {
            "phase": "env",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "python": sys.version.split()[0],
            "device": props.name,
            "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "mem_bytes": props.total_memory,
            "capability": list(torch.cuda.get_device_capability()),
            "copy_TBps": round(copy_tbps(), 3),
            "bf16_matmul_TFLOPs": round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1),
        }
    )


# ------------------------------------------------------------------------------------------------------------
# sweep: every Triton config, correctness
# ------------------------------------------------------------------------------------------------------------

SWEEP_SHAPES = [  # (dtype, head_dim, H, H_kv)
    ("bf16", 64, 4, 2),
    ("fp16", 64, 4, 4),
    ("fp32", 64, 2, 1),
    ("bf16", 128, 2, 2),
    ("bf16", 80, 2, 1),
    ("fp32", 24, 2, 1),
]
OUT_FLOOR = {"fp32": 2e-6, "fp16": 2e-4, "bf16": 2e-3}
GRAD_FLOOR = {"fp32": 1e-5, "fp16": 5e-4, "bf16": 4e-3}
# Shapes whose cases also poison k and v: the careful pass is compiled code of its own under every config, and
# only a NaN or an inf makes its programs do more than return.
NONFINITE_SHAPES = (("bf16", 64, 4, 2), ("fp32", 24, 2, 1))
# tests/conformance/test_nonfinite.py's tolerance for the values that never meet a poisoned token.
NONFINITE_TOL = {"fp32": 1e-5, "bf16": 2e-2}


def sweep_cases() -> list[dict]:
    cases = []
    for cfg in range(3):
        for s, shape in enumerate(SWEEP_SHAPES):
            for causal in (False, True):
                # The CPU dry run keeps two shapes per config, one causal, so every shape still runs once there.
                if TINY and (s // 2 != cfg or causal != bool(s % 2)):
                    continue
                cases.append(
                    {
                        "cfg": cfg,
                        "shape": shape,
                        "causal": causal,
                        "dropout": 0.0,
                        "nonfinite": shape in NONFINITE_SHAPES,
                    }
                )
        cases.append({"cfg": cfg, "shape": ("bf16", 64, 4, 2), "causal": True, "dropout": 0.2, "nonfinite": False})
    return cases


def _poison_sites(lq: list[int], lk: list[int]) -> list[tuple[int, int]]:
    """(segment, packed key token) of the two poisoned keys: the middle key of the segment with the most keys up
    to 300 (several key blocks of every config; the oracle's row-at-a-time path, which checks the poisoned
    segments, costs rows x keys and took over a minute on the 2047-token one), and of the last other segment
    with queries and at least 3 keys (a word among words, sharing its tiles with other segments' rows)."""
    starts = [sum(lk[:s]) for s in range(len(lk))]
    candidates = [s for s in range(len(lk)) if lq[s] > 0 and lk[s] >= 3]
    long_seg = max((s for s in candidates if lk[s] <= 300), key=lambda s: lk[s])
    word = next(s for s in reversed(candidates) if s != long_seg)
    return [(s, starts[s] + lk[s] // 2) for s in (long_seg, word)]


def _check_nonfinite(rec, run, clean, q, k, v, lq, lk, scale, causal, dname) -> bool:
    """An inf in k and a NaN in v, in two segments: every row and key of the other segments as in the clean run
    (within the conformance suite's tolerance; bit for bit is recorded), and the poisoned segments' outputs
    non-finite exactly where the conformance oracle's are, the finite values close to it."""
    import torch
    from conformance import oracle

    from helpers import offsets_of

    (seg_a, tok_a), (seg_b, tok_b) = _poison_sites(lq, lk)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[tok_a, 0, 3] = math.inf
    v_bad[tok_b, -1, 5] = math.nan
    out, lse, grads = run(k_bad, v_bad)
    segs = sorted((seg_a, seg_b))
    hit_q, hit_k = (
        torch.isin(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)), torch.tensor(segs))
        for lens in (lq, lk)
    )
    pairs = [
        (out, clean[0], ~hit_q),
        (lse.t(), clean[1].t(), ~hit_q),
        (grads[0], clean[2][0], ~hit_q),
        (grads[1], clean[2][1], ~hit_k),
        (grads[2], clean[2][2], ~hit_k),
    ]
    pairs = [(d.cpu()[m], c.cpu()[m]) for d, c, m in pairs]
    tol = NONFINITE_TOL[dname]
    rec["nonfinite_untouched_close"] = all(torch.allclose(d.double(), c.double(), rtol=tol, atol=tol) for d, c in pairs)
    rec["nonfinite_untouched_bitwise"] = all(torch.equal(d, c) for d, c in pairs)
    # The oracle on the two poisoned segments alone: with a NaN or an inf it runs one query row at a time, which
    # over every segment would take minutes.
    ref, _ = oracle.attention(
        q.cpu()[hit_q],
        k_bad.cpu()[hit_k],
        v_bad.cpu()[hit_k],
        offsets_of([lq[s] for s in segs]),
        offsets_of([lk[s] for s in segs]),
        scale,
        causal,
    )
    got = out.cpu()[hit_q].double()
    finite = torch.isfinite(ref)
    rec["nonfinite_ref_values"] = int((~finite).sum())
    rec["nonfinite_pattern_ok"] = bool(torch.equal(torch.isfinite(got), finite))
    rec["nonfinite_poisoned_close"] = bool(torch.allclose(got[finite], ref[finite], rtol=tol, atol=tol))
    return (
        rec["nonfinite_untouched_close"]
        and rec["nonfinite_pattern_ok"]
        and rec["nonfinite_poisoned_close"]
        and rec["nonfinite_ref_values"] > 0
    )


def _sweep_init():
    if DEV == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(2)


def sweep_one(case: dict) -> dict:
    t0 = time.time()
    rec = {"phase": "sweep", **{k: v for k, v in case.items() if k != "shape"}}
    dname, head_dim, heads, kv_heads = case["shape"]
    rec.update(dtype=dname, D=head_dim, H=heads, Hkv=kv_heads)
    try:
        import torch

        from hierkern.ops import triton_attention as ta
        from hierkern.reference import varlen_attention_reference

        from helpers import offsets_of

        dtype = torch_dtype(dname)
        i, causal, p = case["cfg"], case["causal"], case["dropout"]
        picks = (ta.FWD_CONFIGS[i], ta.BWD_DQ_CONFIGS[i], ta.BWD_DKDV_CONFIGS[i])
        for kernel, config in zip((ta._attn_fwd, ta._attn_bwd_dq, ta._attn_bwd_dkdv), picks):
            kernel.configs = [config]
        rec["configs"] = [str(c) for c in picks]
        lq, lk = mega_layout()
        cu_q, cu_k = offsets_of(lq, DEV), offsets_of(lk, DEV)
        tq, tk = sum(lq), sum(lk)
        gen = torch.Generator().manual_seed(1000 + 17 * i + head_dim + (7 if causal else 0))
        q64, k64, v64 = (
            torch.randn(n, h, head_dim, generator=gen, dtype=torch.float64)
            for n, h in ((tq, heads), (tk, kv_heads), (tk, kv_heads))
        )
        dout64 = torch.randn(tq, heads, head_dim, generator=gen, dtype=torch.float64)
        q, k, v, dout = (t.to(DEV, dtype) for t in (q64, k64, v64, dout64))
        rec["kept_by_autotune_prune"] = {
            kind: config
            in ta._prune_by_registers(kind)(list(configs), {"Q": q}, BLOCK_D=ta._block_d(head_dim), DROPOUT=p > 0)
            for kind, config, configs in zip(
                ("fwd", "bwd_dq", "bwd_dkdv"), picks, (ta.FWD_CONFIGS, ta.BWD_DQ_CONFIGS, ta.BWD_DKDV_CONFIGS)
            )
        }
        scale = 1.0 / math.sqrt(head_dim)
        rng = torch.tensor([987654321, 7], dtype=torch.int64, device=DEV) if p > 0 else None
        nan = float("nan")

        def run(k, v):
            out = torch.full(q.shape, nan, dtype=dtype, device=DEV)
            lse = torch.full((heads, tq), nan, dtype=torch.float32, device=DEV)
            ta._launch_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal, p, rng, out=out, lse=lse)
            grads = tuple(torch.full_like(t, nan) for t in (q, k, v))
            ta._launch_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), scale, causal, p, rng, grads=grads)
            sync()
            return out, lse, grads

        out, lse, grads = run(k, v)
        again = run(k, v)
        rec["deterministic"] = all(
            torch.equal(a, b) for a, b in zip((out, lse, *grads), (again[0], again[1], *again[2]))
        )
        rec["nan_out"] = int(torch.isnan(out).sum())
        rec["nan_lse"] = int(torch.isnan(lse).sum())
        rec["nan_grads"] = int(sum(int(torch.isnan(g).sum()) for g in grads))
        ok = rec["deterministic"] and not (rec["nan_out"] or rec["nan_lse"] or rec["nan_grads"])
        if p == 0:
            # The float64 reference runs on the device too: on two CPU threads it took ~10 s a case, more than
            # the sweep's deadline leaves (float64 on the GPU is IEEE double, no TF32).
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref, ref_lse = varlen_attention_reference(*leaves, cu_q, cu_k, softmax_scale=scale, causal=causal)
            ref_grads = torch.autograd.grad(ref, leaves, dout.double())
            own_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            own, _ = varlen_attention_reference(*own_leaves, cu_q, cu_k, softmax_scale=scale, causal=causal)
            own_grads = torch.autograd.grad(own, own_leaves, dout)
            rec["err_out"] = rel_err(out, ref)
            rec["own_err_out"] = rel_err(own, ref)
            ok &= rec["err_out"] <= 2 * rec["own_err_out"] + OUT_FLOOR[dname]
            for name, g, r, o in zip("qkv", grads, ref_grads, own_grads):
                rec[f"err_d{name}"] = rel_err(g, r)
                rec[f"own_err_d{name}"] = rel_err(o, r)
                ok &= rec[f"err_d{name}"] <= 3 * rec[f"own_err_d{name}"] + GRAD_FLOOR[dname]
            lse_c, ref_lse = lse.cpu().double(), ref_lse.cpu().double()
            finite = torch.isfinite(ref_lse)
            rec["lse_inf_pattern_ok"] = bool(
                torch.equal(torch.isfinite(lse_c), finite) and bool((lse_c[~finite] == -math.inf).all())
            )
            rec["lse_max_abs_err"] = (lse_c[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
            ok &= rec["lse_inf_pattern_ok"] and rec["lse_max_abs_err"] < (1e-4 if dname == "fp32" else 2e-2)
        if case["nonfinite"]:
            ok &= _check_nonfinite(rec, run, (out, lse, grads), q, k, v, lq, lk, scale, causal, dname)
        rec["ok"] = bool(ok)
    except BaseException as exc:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:1500], trace=traceback.format_exc()[-2500:])
    rec["secs"] = round(time.time() - t0, 1)
    return rec


@guarded("sweep")
def phase_sweep(args):
    import multiprocessing as mp

    cases = sweep_cases()
    ctx = mp.get_context("spawn")
    deadline = time.time() + args.deadline
    with ctx.Pool(args.workers, initializer=_sweep_init, maxtasksperchild=None) as pool:
        pending = [(case, pool.apply_async(sweep_one, (case,))) for case in cases]
        for case, res in pending:
            try:
                emit(res.get(timeout=max(1.0, deadline - time.time())))
            except mp.TimeoutError:
                emit(
                    {
                        "phase": "sweep",
                        "cfg": case["cfg"],
                        "dtype": case["shape"][0],
                        "D": case["shape"][1],
                        "causal": case["causal"],
                        "dropout": case["dropout"],
                        "nonfinite": case["nonfinite"],
                        "ok": None,
                        "error": "deadline",
                    }
                )
        pool.terminate()


# ------------------------------------------------------------------------------------------------------------
# perf: hierkern on the target
# ------------------------------------------------------------------------------------------------------------


def single_kernel_launches(q, k, v, dout, off, max_len, scale):
    """The forward, dq and dk/dv kernels as callables that launch one kernel each, not causal, no dropout, with
    the arguments their launchers build (``_fwd_args``, ``_bwd_dq_args``, ``_bwd_dkdv_args``), and the buffers
    they write. Fast pass only: on finite inputs the careful pass is a launch of programs that return at once
    (the launchers' timings, ms_kernel_*, include it). Run in order: dq writes the delta that dk/dv reads."""
    import torch
    import triton

    from hierkern.ops import triton_attention as ta

    total, heads, _ = q.shape
    total_k, kv_heads, _ = k.shape
    nonfinite = torch.zeros((), dtype=torch.int32, device=q.device)
    out, lse = torch.empty_like(q), q.new_empty((heads, total), dtype=torch.float32)
    delta = q.new_empty((heads, total), dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (off, off, max_len, scale, False, 0.0, None, nonfinite)
    built = {
        "fwd": (
            ta._attn_fwd,
            lambda m: (triton.cdiv(total, m["BLOCK_M"]), heads),
            ta._fwd_args(q, k, v, out, lse, *common),
        ),
        "dq": (
            ta._attn_bwd_dq,
            lambda m: (triton.cdiv(total, m["BLOCK_M"]), heads),
            ta._bwd_dq_args(dout, q, k, v, out, lse, delta, dq, *common),
        ),
        "dkdv": (
            ta._attn_bwd_dkdv,
            lambda m: (triton.cdiv(total_k, m["BLOCK_N"]), kv_heads),
            ta._bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, *common),
        ),
    }

    def launcher(kernel, grid, args_and_constexprs):
        args, constexprs = args_and_constexprs
        return lambda: kernel[grid](*args, **constexprs, CAREFUL=False)

    calls = {name: launcher(*x) for name, x in built.items()}
    return calls, {"out": out, "lse": lse, "delta": delta, "dq": dq, "dk": dk, "dv": dv}


def check_single_kernel_launches(q, k, v, dout, off, max_len, scale) -> dict:
    """Whether the single-kernel launches give the launchers' results bit for bit (the configs are the
    autotuner's, the same for both): else their per-config timings would time some other computation."""
    import torch

    from hierkern.ops import triton_attention as ta

    calls, bufs = single_kernel_launches(q, k, v, dout, off, max_len, scale)
    for name in ("fwd", "dq", "dkdv"):
        calls[name]()
    out, lse = ta._launch_fwd(q, k, v, off, off, max_len, max_len, scale, False, 0.0, None)
    grads = ta._launch_bwd(dout, q, k, v, out, lse, off, off, max_len, max_len, scale, False, 0.0, None)
    sync()
    return {
        name: bool(torch.equal(bufs[name], ref))
        for name, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads))
    }


def perf_target(name, lengths, heads, head_dim, dname="bf16", per_config=False, tbps=None):
    import torch

    import hierkern
    from hierkern.backends import get_backend

    dtype = torch_dtype(dname)
    q, k, v, dout, seg = problem(lengths, heads, head_dim, dtype)
    total, nseg = seg.total, seg.num_segments
    fl = floors(total, heads, head_dim, q.element_size())
    tbps = tbps or copy_tbps()
    floor_ms = {m: b / (tbps * 1e12) * 1e3 for m, b in fl.items()}
    base = {
        "target": name,
        "tokens": total,
        "segments": nseg,
        "max_len": seg.max_len,
        "H": heads,
        "D": head_dim,
        "dtype": dname,
        "copy_TBps": round(tbps, 3),
        "floor_ms": {m: round(x, 4) for m, x in floor_ms.items()},
    }
    emit({"phase": "perf", "impl": "floor", **base})
    ref_out, ref_grads = reference32(q, k, v, dout, seg)
    ref_cat = torch.cat([g.flatten() for g in ref_grads])
    scale = 1.0 / math.sqrt(head_dim)
    off, mx = seg.offsets, seg.max_len
    for backend in ("triton", "cuda"):
        rec = {"phase": "perf", "impl": f"hierkern-{backend}", **base}
        try:
            b = get_backend(backend)
            reason = b.unavailable_reason()
            if reason:
                rec["skipped"] = reason
                emit(rec)
                continue

            def fwd():
                return hierkern.varlen_attention(q, k, v, seg, backend=backend)

            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

            def fwd_bwd():
                o = hierkern.varlen_attention(*leaves, seg, backend=backend)
                return torch.autograd.grad(o, leaves, dout)

            t = time.time()
            out = fwd()
            torch.cuda.synchronize()
            rec["first_fwd_s"] = round(time.time() - t, 2)
            rec["err_out"] = rel_err(out, ref_out)
            t = time.time()
            grads = fwd_bwd()
            torch.cuda.synchronize()
            rec["first_fwd_bwd_s"] = round(time.time() - t, 2)
            rec["err_grads"] = rel_err(torch.cat([g.flatten() for g in grads]), ref_cat)
            rec["nan"] = bool(torch.isnan(out).any()) or any(bool(torch.isnan(g).any()) for g in grads)
            del out, grads
            rec["ms_fwd"] = bench_ms(fwd)
            rec["ms_fwd_bwd"] = bench_ms(fwd_bwd)
            rec["peak_fwd_bytes"] = peak_bytes(fwd)
            rec["peak_fwd_bwd_bytes"] = peak_bytes(fwd_bwd)
            rec["frac_floor_fwd"] = round(floor_ms["fwd"] / rec["ms_fwd"], 3)
            rec["frac_floor_fwd_bwd"] = round(floor_ms["fwd+bwd"] / rec["ms_fwd_bwd"], 3)
            # Per kernel (no autograd / validation overhead).
            if backend == "triton":
                from hierkern.ops import triton_attention as ta

                k_out, k_lse = ta._launch_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
                rec["ms_kernel_fwd"] = bench_ms(
                    lambda: ta._launch_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
                )
                rec["ms_kernel_bwd"] = bench_ms(
                    lambda: ta._launch_bwd(dout, q, k, v, k_out, k_lse, off, off, mx, mx, scale, False, 0.0, None)
                )
                rec["autotuned"] = {
                    n: str(getattr(kern, "best_config", None))
                    for n, kern in (("fwd", ta._attn_fwd), ("dq", ta._attn_bwd_dq), ("dkdv", ta._attn_bwd_dkdv))
                }
                rec["autotune_timings_ms"] = {
                    n: {
                        str(c): (t if isinstance(t, (int, float)) else list(t))
                        for c, t in (getattr(kern, "configs_timings", None) or {}).items()
                    }
                    for n, kern in (("fwd", ta._attn_fwd), ("dq", ta._attn_bwd_dq), ("dkdv", ta._attn_bwd_dkdv))
                }
            else:
                ops = torch.ops.hierkern
                k_out, k_lse = ops.varlen_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
                rec["ms_kernel_fwd"] = bench_ms(
                    lambda: ops.varlen_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
                )
                rec["ms_kernel_bwd"] = bench_ms(
                    lambda: ops.varlen_bwd(dout, q, k, v, k_out, k_lse, off, off, mx, mx, scale, False, 0.0, None)
                )
            rec["frac_floor_kernel_fwd"] = round(floor_ms["fwd"] / rec["ms_kernel_fwd"], 3)
            rec["frac_floor_kernel_bwd"] = round(floor_ms["bwd"] / rec["ms_kernel_bwd"], 3)
        except BaseException as exc:  # noqa: BLE001
            rec.update(error=f"{type(exc).__name__}: {exc}"[:1500], trace=traceback.format_exc()[-2500:])
        emit(rec)

    if not per_config:
        return
    # Every Triton config on the target, one kernel at a time (the autotuner's own choice is in "autotuned").
    from hierkern.ops import triton_attention as ta

    rec = {"phase": "launches", **base}
    try:
        rec["match"] = check_single_kernel_launches(q, k, v, dout, off, mx, scale)
    except BaseException as exc:  # noqa: BLE001
        rec.update(error=f"{type(exc).__name__}: {exc}"[:1500], trace=traceback.format_exc()[-2500:])
    emit(rec)
    calls, _ = single_kernel_launches(q, k, v, dout, off, mx, scale)
    for name in ("fwd", "dq", "dkdv"):  # dq's delta is what dk/dv reads under every config
        calls[name]()
    plans = (
        ("fwd", ta._attn_fwd, ta.FWD_CONFIGS),
        ("dq", ta._attn_bwd_dq, ta.BWD_DQ_CONFIGS),
        ("dkdv", ta._attn_bwd_dkdv, ta.BWD_DKDV_CONFIGS),
    )
    for kind, kernel, configs in plans:
        call = calls[kind]
        saved = kernel.configs
        for config in configs:
            rec = {"phase": "perf_config", "kernel": kind, "config": str(config), **base}
            try:
                kernel.configs = [config]
                t = time.time()
                call()
                torch.cuda.synchronize()
                rec["first_call_s"] = round(time.time() - t, 2)
                rec["ms"] = bench_ms(call, rep=100)
                if kind == "fwd":
                    rec["frac_floor"] = round(floor_ms["fwd"] / rec["ms"], 3)
            except BaseException as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            finally:
                kernel.configs = saved
            emit(rec)


@guarded("launches")
def phase_launches(args):
    import torch

    heads, head_dim = (2, 32) if TINY else (8, 64)
    q, k, v, dout, seg = problem(chars_lengths(300 if TINY else 2**16), heads, head_dim, torch.bfloat16)
    emit(
        {
            "phase": "launches",
            "target": f"chars-{seg.total}-D{head_dim}",
            "tokens": seg.total,
            "match": check_single_kernel_launches(q, k, v, dout, seg.offsets, seg.max_len, head_dim**-0.5),
        }
    )


@guarded("perf")
def phase_perf(args):
    tbps = copy_tbps()
    perf_target("chars-1M-D64", chars_lengths(), 8, 64, per_config=True, tbps=tbps)


@guarded("extra")
def phase_extra(args):
    tbps = copy_tbps()
    perf_target("sentences-1M-D64", sentence_lengths(), 8, 64, tbps=tbps)
    perf_target("chars-suite-large-D32", suite_large_chars(), 8, 32, tbps=tbps)


# ------------------------------------------------------------------------------------------------------------
# Baselines (run as their own processes: a sticky CUDA error there must not take the rest down)
# ------------------------------------------------------------------------------------------------------------


@guarded("fa2")
def phase_fa2(args):
    import torch

    lengths = chars_lengths() if args.target == "chars" else sentence_lengths()
    heads, head_dim = 8, 64
    q, k, v, dout, seg = problem(lengths, heads, head_dim, torch.bfloat16)
    base = {
        "phase": "baseline",
        "target": f"{args.target}-1M-D64",
        "tokens": seg.total,
        "segments": seg.num_segments,
        "H": heads,
        "D": head_dim,
        "dtype": "bf16",
    }
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001
        emit({**base, "impl": "torch-varlen_attn", "skipped": f"not importable: {exc}"})
        return
    import inspect

    base["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    off, mx = seg.offsets, seg.max_len
    rec = {**base, "impl": "torch-varlen_attn-unchunked"}
    try:
        o = varlen_attn(q, k, v, off, off, mx, mx)
        o = o[0] if isinstance(o, tuple) else o
        torch.cuda.synchronize()
        rec["ran"] = True
        rec["ms_fwd"] = bench_ms(lambda: varlen_attn(q, k, v, off, off, mx, mx))
    except Exception as exc:  # noqa: BLE001
        rec["ran"] = False
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    torch.cuda.synchronize()  # raises here if the failure was sticky: then nothing below can run anyway
    emit(rec)
    # SDPA on jagged nested tensors: the same FlashAttention-2 kernel behind a different front end.
    rec = {**base, "impl": "torch-sdpa-njt-unchunked"}
    try:
        import torch.nn.functional as F

        def nested(t):
            return torch.nested.nested_tensor_from_jagged(
                t, off.long(), min_seqlen=min(lengths), max_seqlen=mx
            ).transpose(1, 2)

        F.scaled_dot_product_attention(nested(q), nested(k), nested(v))
        torch.cuda.synchronize()
        rec["ran"] = True
    except Exception as exc:  # noqa: BLE001
        rec["ran"] = False
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    torch.cuda.synchronize()
    emit(rec)

    # Chunked: <= 32000 segments per call keeps grid.y under 65535 and 128 * segments * H * D_rounded under
    # 2^31 (the int32 row offset of FlashAttention-2's dq_accum in some vendored copies).
    chunk = args.chunk_segments
    bounds = list(range(0, len(lengths), chunk)) + [len(lengths)]
    cum = [0]
    for n in lengths:
        cum.append(cum[-1] + n)
    sizes, cus, maxes = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sizes.append(cum[b] - cum[a])
        cus.append(torch.tensor([c - cum[a] for c in cum[a : b + 1]], dtype=torch.int32, device="cuda"))
        maxes.append(max(lengths[a:b]))

    def chunked(qq, kk, vv):
        outs = []
        for a, b, c, cu, m in zip(qq.split(sizes), kk.split(sizes), vv.split(sizes), cus, maxes):
            o = varlen_attn(a, b, c, cu, cu, m, m)
            outs.append(o[0] if isinstance(o, tuple) else o)
        return torch.cat(outs)

    rec = {**base, "impl": f"torch-varlen_attn-chunked{chunk}", "chunks": len(sizes)}
    try:
        ref_out, ref_grads = reference32(q, k, v, dout, seg)
        out = chunked(q, k, v)
        torch.cuda.synchronize()
        rec["err_out"] = rel_err(out, ref_out)
        rec["ms_fwd"] = bench_ms(lambda: chunked(q, k, v))
        rec["peak_fwd_bytes"] = peak_bytes(lambda: chunked(q, k, v))
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fwd_bwd():
            return torch.autograd.grad(chunked(*leaves), leaves, dout)

        grads = fwd_bwd()
        torch.cuda.synchronize()
        rec["err_grads"] = rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads]))
        del grads
        rec["ms_fwd_bwd"] = bench_ms(fwd_bwd, rep=300)
        rec["peak_fwd_bwd_bytes"] = peak_bytes(fwd_bwd)
    except BaseException as exc:  # noqa: BLE001
        rec.update(error=f"{type(exc).__name__}: {exc}"[:1500], trace=traceback.format_exc()[-2500:])
    emit(rec)


@guarded("flex")
def phase_flex(args):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = chars_lengths()
    heads, head_dim = 8, 64
    q, k, v, dout, seg = problem(lengths, heads, head_dim, torch.bfloat16)
    total = seg.total
    rec = {
        "phase": "baseline",
        "impl": "torch-flex-document-mask",
        "target": "chars-1M-D64",
        "tokens": total,
        "segments": seg.num_segments,
        "H": heads,
        "D": head_dim,
        "dtype": "bf16",
    }
    try:
        doc = seg.segment_ids().to(torch.int32)

        def document_mask(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        t = time.time()
        block_mask = create_block_mask(
            document_mask, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cuda", _compile=True
        )
        torch.cuda.synchronize()
        rec["mask_first_build_s"] = round(time.time() - t, 2)
        t = time.time()
        block_mask = create_block_mask(
            document_mask, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cuda", _compile=True
        )
        torch.cuda.synchronize()
        rec["mask_build_s"] = round(time.time() - t, 3)
        try:
            rec["kv_blocks_per_q_block"] = round(float(block_mask.kv_num_blocks.float().mean()), 3)
            if block_mask.full_kv_num_blocks is not None:
                rec["full_kv_blocks_per_q_block"] = round(float(block_mask.full_kv_num_blocks.float().mean()), 3)
        except Exception:  # noqa: BLE001
            pass
        attend = torch.compile(flex_attention, dynamic=False)

        def hf(t):
            return t.transpose(0, 1).unsqueeze(0)

        def fwd():
            return attend(hf(q), hf(k), hf(v), block_mask=block_mask)

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fwd_bwd():
            o = attend(hf(leaves[0]), hf(leaves[1]), hf(leaves[2]), block_mask=block_mask)
            return torch.autograd.grad(o, leaves, hf(dout))

        t = time.time()
        out = fwd().squeeze(0).transpose(0, 1)
        torch.cuda.synchronize()
        rec["compile_fwd_s"] = round(time.time() - t, 1)
        t = time.time()
        grads = fwd_bwd()
        torch.cuda.synchronize()
        rec["compile_fwd_bwd_s"] = round(time.time() - t, 1)
        ref_out, ref_grads = reference32(q, k, v, dout, seg)
        rec["err_out"] = rel_err(out, ref_out)
        rec["err_grads"] = rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads]))
        del out, grads, ref_out, ref_grads
        waited = 0.0
        rec["ready_unix"] = round(time.time(), 1)  # compiled and checked: no GPU work of this process before this
        if args.flag:
            t = time.time()
            while not os.path.exists(args.flag) and time.time() - t < args.flag_wait:
                time.sleep(0.5)
            waited = time.time() - t
            rec["flag_seen"] = os.path.exists(args.flag)
        rec["waited_s"] = round(waited, 1)
        rec["ms_fwd"] = bench_ms(fwd)
        rec["ms_fwd_bwd"] = bench_ms(fwd_bwd)
        rec["peak_fwd_bwd_bytes"] = peak_bytes(fwd_bwd)
    except BaseException as exc:  # noqa: BLE001
        rec.update(error=f"{type(exc).__name__}: {exc}"[:1500], trace=traceback.format_exc()[-2500:])
    emit(rec)


# ------------------------------------------------------------------------------------------------------------
# ncu_target: one launch of each kernel at the target size, for `ncu --kernel-name regex:_attn_|varlen_`
# ------------------------------------------------------------------------------------------------------------


@guarded("ncu_target")
def phase_ncu_target(args):
    """Launch the Triton kernels (pinned to the configs the perf phase's autotuner chose, else config 0) and the
    CUDA kernels once each on the target problem: forward, then backward. Meant to run under ncu."""
    import torch

    from hierkern.ops import triton_attention as ta

    chosen = {}
    if os.path.exists(RECORDS):
        with open(RECORDS) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("impl") == "hierkern-triton" and r.get("target") == "chars-1M-D64" and r.get("autotuned"):
                    chosen = r["autotuned"]
    for name, kernel, configs in (
        ("fwd", ta._attn_fwd, ta.FWD_CONFIGS),
        ("dq", ta._attn_bwd_dq, ta.BWD_DQ_CONFIGS),
        ("dkdv", ta._attn_bwd_dkdv, ta.BWD_DKDV_CONFIGS),
    ):
        kernel.configs = [next((c for c in configs if str(c) == chosen.get(name)), configs[0])]
    q, k, v, dout, seg = problem(chars_lengths(), 8, 64, torch.bfloat16)
    off, mx, scale = seg.offsets, seg.max_len, 1.0 / 8.0
    out, lse = ta._launch_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
    ta._launch_bwd(dout, q, k, v, out, lse, off, off, mx, mx, scale, False, 0.0, None)
    torch.cuda.synchronize()
    try:
        ops = torch.ops.hierkern
        out, lse = ops.varlen_fwd(q, k, v, off, off, mx, mx, scale, False, 0.0, None)
        ops.varlen_bwd(dout, q, k, v, out, lse, off, off, mx, mx, scale, False, 0.0, None)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001  (no CUDA build)
        print("cuda kernels not run:", exc)
    print(
        "ncu_target: pinned", [str(kernel.configs[0]) for kernel in (ta._attn_fwd, ta._attn_bwd_dq, ta._attn_bwd_dkdv)]
    )


# ------------------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------------------


def phase_summary(args):
    if not os.path.exists(RECORDS):
        print("no records")
        return
    recs = []
    with open(RECORDS) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    for r in recs:
        if r.get("phase") == "env" and "error" not in r:
            print(
                f"env: {r['device']} {r['sms']} SMs, torch {r['torch']}, triton {r['triton']}, copy "
                f"{r['copy_TBps']} TB/s, bf16 matmul {r['bf16_matmul_TFLOPs']} TFLOP/s"
            )
    sweep = [r for r in recs if r.get("phase") == "sweep" and "cfg" in r]
    if sweep:
        bad = [r for r in sweep if r.get("ok") is not True]
        print(f"sweep: {len(sweep) - len(bad)}/{len(sweep)} config cases ok")
        poisoned = [r for r in sweep if "nonfinite_untouched_bitwise" in r]
        if poisoned:
            print(
                f"sweep: with an inf in k and a NaN in v, the other segments bit for bit as the clean run in "
                f"{sum(r['nonfinite_untouched_bitwise'] for r in poisoned)}/{len(poisoned)} cases"
            )
        for r in bad[:12]:
            errs = {
                k: (f"{v:.2e}" if isinstance(v, float) else v)
                for k, v in r.items()
                if k.startswith(("err", "own_err", "nan", "lse", "determ", "nonfinite_"))
            }
            print(
                f"  FAIL cfg{r['cfg']} {r.get('dtype')} D{r.get('D')} causal={r.get('causal')} "
                f"p={r.get('dropout')} {r.get('error', '')[:160]} {errs}"
            )
    for r in recs:
        if r.get("phase") == "launches" and "match" in r:
            print(
                f"single-kernel launches (perf's per-config timings) = launchers' results, bit for bit, on "
                f"{r['target']}: {r['match']}"
            )
    print(
        f"{'target':<22} {'impl':<34} {'fwd ms':>8} {'%floor':>7} {'f+b ms':>8} {'%floor':>7} "
        f"{'err out':>8} {'err grad':>8} {'peak GB':>8}"
    )
    for r in recs:
        if r.get("phase") not in ("perf", "baseline") or r.get("impl") == "floor":
            continue
        fl = (
            next(
                (x.get("floor_ms") for x in recs if x.get("impl") == "floor" and x.get("target") == r.get("target")),
                None,
            )
            or {}
        )

        def pct(ms, key):
            return f"{100 * fl[key] / ms:6.0f}%" if ms and fl.get(key) else "      -"

        fwd, fb = r.get("ms_fwd"), r.get("ms_fwd_bwd")
        peak = r.get("peak_fwd_bwd_bytes") or r.get("peak_fwd_bytes")
        note = r.get("error") or r.get("skipped") or ""

        def num(x, fmt):
            return format(x, fmt) if isinstance(x, (int, float)) and x else "       -"

        print(
            f"{r.get('target', ''):<22} {r.get('impl', ''):<34} {num(fwd, '8.3f')} {pct(fwd, 'fwd')} "
            f"{num(fb, '8.3f')} {pct(fb, 'fwd+bwd')} {num(r.get('err_out'), '8.1e')} "
            f"{num(r.get('err_grads'), '8.1e')} {num(peak and peak / 1e9, '8.2f')} {note[:90]}"
        )
    for r in recs:
        if r.get("phase") == "perf_config":
            print(
                f"  config {r['target']:<20} {r['kernel']:<5} {r['config'][:60]:<60} "
                f"{r.get('ms', float('nan')):8.3f} ms {r.get('error', '')[:80]}"
            )
    for r in recs:
        if (
            r.get("phase") in ("perf", "launches", "baseline", "env", "sweep", "fa2", "flex", "extra")
            and "trace" in r
            and "cfg" not in r
        ):
            print(f"error in {r['phase']} {r.get('impl', '')}: {r['error'][:300]}")


# ------------------------------------------------------------------------------------------------------------
# junit: the GPU pytest runs in one file, counted
# ------------------------------------------------------------------------------------------------------------


def _junit_group(classname: str, name: str) -> str:
    """A conformance test's backend id (its first parameter, ``<backend>-<device>``), else its file."""
    if ".conformance." in f".{classname}.":
        backend = re.search(r"\[([^-\]]+-[^-\]]+)", name)
        return "conformance " + (backend.group(1) if backend else "?")
    return classname.rsplit(".", 1)[-1]


@guarded("junit")
def phase_junit(args):
    """Merge pytest's JUnit XML files into ``--into`` (one ``testsuite`` per run, named after its file), then
    print the outcomes per conformance backend and per test file, and the first failures."""
    import collections
    import xml.etree.ElementTree as ET

    merged = ET.Element("testsuites")
    for path in args.files:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:  # a run that never got to write its file
            print(f"  junit: {os.path.basename(path)}: {type(exc).__name__}: {exc}")
            continue
        for suite in [root] if root.tag == "testsuite" else list(root):
            suite.set("name", os.path.basename(path))
            merged.append(suite)
    ET.ElementTree(merged).write(args.into, encoding="utf-8", xml_declaration=True)
    counts = collections.defaultdict(collections.Counter)
    failures = []
    for case in merged.iter("testcase"):
        if not case.get("name"):  # a test that was running when its run was interrupted
            counts["(interrupted)"]["unfinished"] += 1
            continue
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, found.get("message") or ""
        counts[_junit_group(case.get("classname", ""), case.get("name"))][outcome] += 1
        if outcome in ("failed", "error"):
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message.strip()[:200]}")
    outcomes = ("passed", "failed", "error", "skipped", "unfinished")
    for group, c in sorted(counts.items()):
        print(f"  {group:<28} " + ", ".join(f"{c[o]} {o}" for o in outcomes if c[o]))
    for line in failures[:20]:
        print("  FAIL", line.splitlines()[0])
    if len(failures) > 20:
        print(f"  ... {len(failures) - 20} more failures in {os.path.basename(args.into)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "phase",
        choices=[
            "env",
            "sweep",
            "launches",
            "perf",
            "extra",
            "fa2",
            "flex",
            "ncu_target",
            "summary",
            "junit",
            "lengths",
        ],
    )
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--deadline", type=float, default=100.0)
    ap.add_argument("--flag", default=None)
    ap.add_argument("--flag-wait", type=float, default=300.0)
    ap.add_argument("--target", default="chars", choices=["chars", "sentences"])
    ap.add_argument("--chunk-segments", type=int, default=32000)
    ap.add_argument("--into", help="junit: the merged JUnit XML file to write")
    ap.add_argument("files", nargs="*", help="junit: pytest's JUnit XML files")
    args = ap.parse_intermixed_args()
    if args.phase == "lengths":  # CPU-only self-check of the workload builders
        for name, ls in (
            ("chars", chars_lengths()),
            ("sentences", sentence_lengths()),
            ("suite-large", suite_large_chars()),
        ):
            print(name, "tokens", sum(ls), "segments", len(ls), "max", max(ls), "mean", round(sum(ls) / len(ls), 2))
        lq, lk = mega_layout()
        print("mega layout: q tokens", sum(lq), "k tokens", sum(lk), "segments", len(lq), len(lk))
        print("poisoned segments (q, k lengths):", [(lq[s], lk[s]) for s, _ in _poison_sites(lq, lk)])
        print("sweep cases", len(sweep_cases()))
        return
    {
        "env": phase_env,
        "sweep": phase_sweep,
        "launches": phase_launches,
        "perf": phase_perf,
        "extra": phase_extra,
        "fa2": phase_fa2,
        "flex": phase_flex,
        "ncu_target": phase_ncu_target,
        "summary": phase_summary,
        "junit": phase_junit,
    }[args.phase](args)


if __name__ == "__main__":
    main()
