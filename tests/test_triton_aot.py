"""Ahead-of-time compile of the Triton kernels exactly as they run, for sm_90 and sm_80, no GPU needed.

Interpreter tests cannot see GPU lowering errors (layouts, dot shapes, register pressure); compiling the real
kernels to cubin can, provided the compile is the one a launch makes. At run time the JIT specialises every
argument: pointers and integers divisible by 16 get ``tt.divisibility = 16`` (which changes vectorisation,
pipelining and registers) and integers equal to 1 become constants (``group`` for plain multi-head attention).
So each case here builds the launcher's own arguments (``_fwd_args`` / ``_bwd_dq_args`` / ``_bwd_dkdv_args``)
from meta tensors shaped like a typical contiguous ``(total, H, D)`` call, lets the autotuner's pruning pick the
configs it would try, and hands each to the JIT's own binder (``create_function_from_signature`` and
``JITFunction._pack_args``, the code ``JITFunction.run`` uses) for the signature, constexprs, attributes and
options, then ``triton.compile``.

``triton.jit`` reads ``TRITON_INTERPRET`` when the kernel module is imported and the test session runs with the
interpreter on, so the compiles run in two child processes (this file run as a script, half of the cases each)
with the interpreter off, fresh caches (so ptxas really runs) and ptxas' ``-v`` log captured. From the
compiles the tests read registers and spills, the specialisation, and the TTIR's head-offset arithmetic.

The cases (about 170 compiles, ~3 minutes on two idle cores): every kernel's fast pass for fp16, bf16 and fp32
(3xTF32, the launcher's default) at head dims 32, 64, 128 and 40 on sm_90, each with every config the pruning
keeps, causal; on sm_90 also dropout, tf32, GQA with token counts divisible by 16 (full attention), the careful
pass (which runs only when a tile met a NaN or an inf) at head dim 128, and windows; on sm_80 bf16 at 64 and 128
(and with dropout, and a window) and fp32 at 128. A window compiles as the launcher specialises it: constexpr
``LEFT`` / ``RIGHT`` (whether each side is bounded: full and causal compile to the kernels a ``CAUSAL`` flag
gave, and only bounded sides pay for the gap-skipping loops) and the bounds as unspecialised runtime ints, so
the cases cover each kind of window once, not each size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import pytest

pytest.importorskip("triton")

KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
# Spill stores (bytes per thread, ptxas -v) allowed. fp16/bf16 configs within the register budget: a few bytes,
# which ptxas trades for occupancy (it capped one dq config at 168 registers, three 128-thread CTAs per SM,
# with 4 bytes of stack, where 184 registers would have been spill-free). Beyond that: float32's 3xTF32, which
# the register model undercounts and which spilled on main as well, configs kept only because none fits the
# budget, and the careful pass, which runs only for tiles that met a NaN or an inf. The most: float32 dk/dv at
# head dim 128 under a two-sided window, whose blocks of several segments run a second, gap-skipping loop copy
# (1612 bytes; 836 causal).
SPILL_BOUND = 16
HEAVY_SPILL_BOUND = 1792


@dataclass(frozen=True)
class Case:
    arch: int
    kernel: str
    dtype: str
    head_dim: int
    # (window_left, window_right) as the ops take them: causal (-1, 0), full (-1, -1); (16, 1) bounds both sides
    # with ints the JIT would specialise (divisible by 16, equal to 1) were they not exempt.
    window: tuple[int, int] = (-1, 0)
    dropout: bool = False
    careful: bool = False
    tf32: bool = False
    # A typical packed call: ~4.3k tokens in ~900 segments (token counts not divisible by 16), 8 heads (MHA,
    # so group == 1 becomes a constant); gqa: 8 query heads on 2 kv heads, 4096 tokens.
    gqa: bool = False


def _cases() -> list[Case]:
    # 40: a head dim padded inside the kernel whose value and head stride are not multiples of 16 (80 would
    # compile to the very kernel 128 does).
    cases = [
        Case(90, kernel, dtype, head_dim)
        for kernel in KERNELS
        for dtype in ("fp16", "bf16", "fp32")
        for head_dim in (32, 64, 128, 40)
    ]
    for kernel in KERNELS:
        cases += [Case(90, kernel, dtype, 128, dropout=True) for dtype in ("bf16", "fp32")]
        cases += [Case(90, kernel, "bf16", 128, dropout=True, careful=True)]
        cases += [Case(90, kernel, "fp32", 64, tf32=True), Case(90, kernel, "bf16", 64, window=(-1, -1), gqa=True)]
        # Windows: a left bound alone (sliding-window causal), both bounds (also with dropout), on both archs.
        cases += [Case(90, kernel, dtype, 128, window=(255, 0)) for dtype in ("bf16", "fp32")]
        cases += [
            Case(90, kernel, "fp16", 64, window=(16, 1)),
            Case(90, kernel, "bf16", 128, window=(16, 1), dropout=True),
        ]
        cases += [Case(80, kernel, "bf16", 128, window=(255, 0))]
        cases += [Case(80, kernel, "bf16", head_dim) for head_dim in (64, 128)]
        cases += [Case(80, kernel, "bf16", 128, dropout=True), Case(80, kernel, "fp32", 128)]
    return cases


def _launch(ta, case: Case):
    """The autotuned kernel, the launcher's positional arguments and constexprs for ``case``, on meta tensors."""
    import torch

    from hierkern.ops import triton_attention_bwd as tab

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    total, segments, max_seqlen, heads, kv_heads = (4096, 12, 512, 8, 2) if case.gqa else (4321, 917, 14, 8, 8)

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q, dout, dq = (meta(total, heads, case.head_dim) for _ in range(3))
    k, v, dk, dv = (meta(total, kv_heads, case.head_dim) for _ in range(4))
    lse, delta = meta(heads, total, dtype=torch.float32), meta(heads, total, dtype=torch.float32)
    cu = meta(segments + 1, dtype=torch.int32)
    rng, nonfinite = meta(2, dtype=torch.int64), meta((), dtype=torch.int32)
    tail = (0.125, *case.window, 0.1 if case.dropout else 0.0, rng, nonfinite)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.tf32  # the launcher's choice of float32 precision
    try:
        if case.kernel == "fwd":
            tuner, (args, constexprs) = ta._attn_fwd, ta._fwd_args(q, k, v, dq, lse, cu, cu, max_seqlen, *tail)
        elif case.kernel == "bwd_dq":
            tuner, (args, constexprs) = (
                tab._attn_bwd_dq,
                tab._bwd_dq_args(dout, q, k, v, dq, lse, delta, dq, cu, cu, max_seqlen, *tail),
            )
        else:
            tuner, (args, constexprs) = (
                tab._attn_bwd_dkdv,
                tab._bwd_dkdv_args(dout, q, k, v, lse, delta, dk, dv, cu, cu, max_seqlen, *tail),
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return tuner, args, dict(constexprs, CAREFUL=case.careful)


def _head_offsets_in_int32(ttir: str, kernel) -> list[str]:
    """TTIR lines where a head stride enters arithmetic other than a sign extension to i64, or where the token
    count that strides Lse and Delta by head is multiplied in i32: a head offset computed in int32 overflows
    once heads x tokens x head_dim passes 2^31 in a head-major view."""
    body = ttir[ttir.index("tt.func") :].split("\n", 1)[1]
    bad = []
    for line in body.splitlines():
        for name in [n for n in kernel.arg_names if re.fullmatch(r"stride_\w+h", n)]:
            if re.search(rf"%{name}\b", line) and f"arith.extsi %{name} : i32 to i64" not in line:
                bad.append(line.strip())
        if re.search(r"%total_q\b", line) and "arith.muli" in line:
            bad.append(line.strip())
    return bad


def _compile_case(ta, case: Case) -> list[dict]:
    """Compile ``case`` once per config the autotuner's pruning keeps, as ``JITFunction.run`` would."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    tuner, args, constexprs = _launch(ta, case)
    kernel = tuner.fn
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    tuner.nargs = dict(zip(tuner.arg_names, args))
    kept = tuner.prune_configs(constexprs)
    gap_loop = ta._gap_loop(case.kernel, constexprs["LEFT"], constexprs["RIGHT"])
    need = {
        c: ta._resident_registers(
            case.kernel,
            c.kwargs["BLOCK_M"],
            c.kwargs["BLOCK_N"],
            c.num_warps,
            constexprs["BLOCK_D"],
            args[0].element_size(),
            case.dropout,
            gap_loop,
        )
        for c in kept
    }
    records = []
    for config in kept:
        kwargs = dict(
            constexprs,
            **config.all_kwargs(),
            debug=knobs.runtime.debug,
            instrumentation_mode=knobs.compilation.instrumentation_mode,
        )
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, consts, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        log, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, consts, attrs), target=target, options=options.__dict__
            )
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores", text)
        records.append(
            {
                **asdict(case),
                "precision": constexprs["PRECISION"],
                "BLOCK_D": constexprs["BLOCK_D"],
                "config": str(config),
                "BLOCK_M": config.kwargs["BLOCK_M"],
                "BLOCK_N": config.kwargs["BLOCK_N"],
                "num_warps": config.num_warps,
                "fits_budget": need[config] <= ta.REGISTER_BUDGET,
                "divisible_by_16": [n for n, spec in zip(kernel.arg_names, specialization) if spec[1:] == ("D",)],
                "made_constant": [
                    n for n, spec in zip(kernel.arg_names, specialization) if spec[0] == "constexpr" and n not in kwargs
                ],
                "registers": int(regs.group(1)) if regs else None,
                "spill_stores": int(spills.group(1)) if spills else None,
                "compile_s": round(time.perf_counter() - start, 2),
                "shared_bytes": compiled.metadata.shared,
                "cubin_bytes": len(compiled.asm["cubin"]),
                "int32_head_offsets": _head_offsets_in_int32(compiled.asm["ttir"], kernel),
            }
        )
    return records


def _compile_shard(shard: int, shards: int) -> list[dict]:
    from hierkern.ops import triton_attention as ta

    return [r for case in _cases()[shard::shards] for r in _compile_case(ta, case)]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    with tempfile.TemporaryDirectory() as cache:
        # Two children, half of the cases each (compiling is single-threaded and CI machines have two cores),
        # with caches of their own: a cache hit compiles nothing and reports no registers.
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(shard), "2"],
                cwd=root,
                env=dict(
                    os.environ,
                    TRITON_INTERPRET="0",
                    TRITON_DUMP_PTXAS_LOG="1",
                    TRITON_CACHE_DIR=os.path.join(cache, str(shard)),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for shard in range(2)
        ]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"AOT compile failed:\n{stdout[-4000:]}\n{stderr[-8000:]}"
            out += json.loads(stdout.strip().splitlines()[-1])
    print("\nkernel    arch dtype/prec   D    window drop careful gqa  BLOCK_M BLOCK_N warps  regs spills  smem  secs")
    for r in out:
        precision = r["precision"] if r["dtype"] == "fp32" else "-"
        print(
            f"{r['kernel']:<9} sm{r['arch']} {r['dtype']}/{precision:<6} {r['head_dim']:>4} "
            f"{str(tuple(r['window'])):>9} {r['dropout']!s:>5} {r['careful']!s:>7} {r['gqa']!s:>5} "
            f"{r['BLOCK_M']:>7} {r['BLOCK_N']:>7} "
            f"{r['num_warps']:>5} {r['registers']!s:>5} {r['spill_stores']!s:>6} {r['shared_bytes']:>6} "
            f"{r['compile_s']:>5}"
        )
    return out


def test_every_case_compiles_every_kept_config_without_spills(records):
    from hierkern.ops import triton_attention as ta

    compiled = {
        (
            r["arch"],
            r["kernel"],
            r["dtype"],
            r["head_dim"],
            tuple(r["window"]),
            r["dropout"],
            r["careful"],
            r["tf32"],
            r["gqa"],
        )
        for r in records
    }
    assert len(compiled) == len(_cases()), "a case kept no config"
    shipped = {"fwd": ta.FWD_CONFIGS, "bwd_dq": ta.BWD_DQ_CONFIGS, "bwd_dkdv": ta.BWD_DKDV_CONFIGS}
    for kernel, configs in shipped.items():
        compiled_configs = {r["config"] for r in records if r["kernel"] == kernel and r["arch"] == 90}
        assert compiled_configs == {str(c) for c in configs}, f"{kernel}: not every shipped config is compiled"
    for r in records:
        assert r["cubin_bytes"] > 0
        assert r["registers"] is not None and r["spill_stores"] is not None, f"no ptxas -v report for {r}"
        if r["fits_budget"] and not r["careful"] and r["dtype"] != "fp32":
            assert r["spill_stores"] <= SPILL_BOUND, f"a config within the register budget spills: {r}"
        else:
            assert r["spill_stores"] <= HEAVY_SPILL_BOUND, f"spills beyond the documented bound: {r}"


def test_compiles_the_runtime_specialisation(records):
    """Divisibility and value-1 specialisation as the JIT derives it, not a hand-written subset: head_dim and
    the strides of 128-wide heads are multiples of 16, a 40-wide head's are not (its token stride, 8 x 40, is),
    ragged token counts are not, MHA's group is 1."""
    mha = next(r for r in records if r["kernel"] == "fwd" and r["head_dim"] == 128 and not r["gqa"])
    assert {"Q", "Lse", "head_dim", "stride_qt", "stride_qh", "seqlen_bucket"} <= set(mha["divisible_by_16"])
    assert "total_q" not in mha["divisible_by_16"] and mha["made_constant"] == ["group"]
    odd = next(r for r in records if r["kernel"] == "fwd" and r["head_dim"] == 40)
    assert "stride_qt" in odd["divisible_by_16"] and not {"head_dim", "stride_qh"} & set(odd["divisible_by_16"])
    gqa = next(r for r in records if r["kernel"] == "bwd_dkdv" and r["gqa"])
    assert {"total_q", "total_k"} <= set(gqa["divisible_by_16"]) and gqa["made_constant"] == []
    # The window's bounds are runtime ints that are never specialised (one kernel per kind of window, whatever
    # its size), even at values the JIT would otherwise specialise: 16 and 1.
    for r in (r for r in records if tuple(r["window"]) == (16, 1)):
        assert not {"window_left", "window_right"} & set(r["divisible_by_16"] + r["made_constant"]), r


def test_head_offsets_are_int64(records):
    """Too large to run here: the TTIR shows every head offset multiply in i64 (on main, arith.muli %head,
    %stride_qh : i32)."""
    for r in records:
        assert not r["int32_head_offsets"], f"{r['kernel']} sm{r['arch']}: {r['int32_head_offsets']}"


if __name__ == "__main__":
    print(json.dumps(_compile_shard(int(sys.argv[1]), int(sys.argv[2]))))
