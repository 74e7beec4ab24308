"""Ahead-of-time compile of every shipped Triton kernel configuration for sm_80 and sm_90, no GPU needed.

Interpreter tests cannot see GPU lowering errors (layouts, dot shapes, register pressure); compiling the real
kernels to cubin can. ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernel module is imported, and the
test session runs with the interpreter on, so the compile runs in child processes (this file run as a
script, one per target) with the interpreter off, a fresh cache (so ptxas really runs) and ptxas' ``-v`` log
captured to read registers and spills. No GPU is needed; it takes ~30-60 s on two cores.

The matrix: every autotune config of every kernel, for both targets, at the heaviest case in which the
autotuner's register pruning can pick it (largest ``BLOCK_D``, widest dtype, causal, dropout); and for sm_90
each kernel's first config at ``BLOCK_D=16`` (fp16) and with tf32 (fp32, ``BLOCK_D=32``). float32 compiles
with the launcher's default precision, 3xTF32 (``PRECISION`` only affects float32 operands).
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

import pytest

pytest.importorskip("triton")

# Bytes of spill stores (ptxas -v) allowed per compiled kernel. fp16/bf16, the dtypes the kernels are built
# for, get a few bytes of stack traffic (ptxas spills a loop counter in one small dk/dv config); float32 runs
# 3xTF32 and may spill up to 1 KiB per thread in its largest tiles, which costs L1 traffic, not correctness.
SPILL_BOUND = {"fp16": 16, "bf16": 16, "fp32": 1024}

def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """ASTSource signature and divisibility attributes as the launcher's calls specialise them."""
    float_ptrs = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"}
    f32_ptrs = {"Lse", "Delta"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in float_ptrs:
            sig[name] = f"*{dtype}"
        elif name in f32_ptrs:
            sig[name] = "*fp32"
        elif name in ("CuQ", "CuK"):
            sig[name] = "*i32"
        elif name == "RngState":
            sig[name] = "*i64"
        elif name in ("qk_scale", "softmax_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    # torch allocations are 16-byte aligned and strides of (total, H, D) tensors with D % 16 == 0 are
    # multiples of 16: Triton's runtime specialises exactly these, so compile what a real launch compiles.
    aligned = [n for n in kernel.arg_names if sig[n].startswith("*") or n.startswith("stride_")]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return sig, attrs


def _matrix(ta):
    """(arch, kernel name, kernel, config, dtype, precision, BLOCK_D, causal, dropout) rows to compile."""
    import torch

    kernels = {
        "fwd": (ta._attn_fwd_kernel, ta.FWD_CONFIGS),
        "bwd_dq": (ta._attn_bwd_dq_kernel, ta.BWD_DQ_CONFIGS),
        "bwd_dkdv": (ta._attn_bwd_dkdv_kernel, ta.BWD_DKDV_CONFIGS),
    }
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    # Heaviest first: each config is compiled at the first case in which the autotuner may pick it.
    cases = [(block_d, dtype, dropout) for dropout in (True, False) for block_d in (128, 64, 32, 16)
             for dtype in ("fp32", "bf16", "fp16")]
    jobs = []
    for kname, (kernel, configs) in kernels.items():
        prune = ta._prune_by_registers(kname)
        for config in configs:
            block_d, dtype, dropout = next(
                ((d, t, p) for d, t, p in cases
                 if config in prune(configs, {"Q": torch.empty(0, dtype=dtypes[t])}, BLOCK_D=d, DROPOUT=p)),
                (None, None, None))
            assert block_d is not None, f"{kname} config {config} is never kept by the register pruning"
            for arch in (80, 90):
                jobs.append((arch, kname, kernel, config, dtype, "tf32x3", block_d, True, dropout))
        # The smallest head dim (tl.dot's K = 16) and the tf32 path, without causal or dropout.
        jobs.append((90, kname, kernel, configs[0], "fp16", "tf32x3", 16, False, False))
        jobs.append((90, kname, kernel, configs[0], "fp32", "tf32", 32, False, False))
    return jobs


def _compile_all(arch: int) -> list[dict]:
    """Compile the matrix's rows for ``arch`` in this process (interpreter off); one record per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hierkern.ops import triton_attention as ta

    records = []
    for row_arch, kname, kernel, config, dtype, precision, block_d, causal, dropout in _matrix(ta):
        if row_arch != arch:
            continue
        constexprs = dict(config.kwargs, BLOCK_D=block_d, CAUSAL=causal, DROPOUT=dropout, INTERPRETER=False,
                          PRECISION=precision)
        sig, attrs = _signature(kernel, dtype, constexprs)
        src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores", text)
        records.append({
            "arch": arch, "kernel": kname, "dtype": dtype, "precision": precision, "BLOCK_D": block_d,
            "causal": causal, "dropout": dropout, "num_warps": config.num_warps,
            "num_stages": config.num_stages, **config.kwargs,
            "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "shared_bytes": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
        })
    return records


def test_aot_compile_sm80_sm90():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    records = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        # One child per target, concurrently: compiling is single-threaded and CI machines have two cores.
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)], env=env, cwd=root,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for arch in (80, 90)]
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"AOT compile failed:\n{out[-4000:]}\n{err[-8000:]}"
            records += json.loads(out.strip().splitlines()[-1])
    assert len(records) == len(_matrix_size())
    print("\nkernel     arch dtype/prec  BLOCK_M BLOCK_N BLOCK_D warps stages causal dropout  regs spills smem")
    for r in records:
        precision = r["precision"] if r["dtype"] == "fp32" else "-"
        print(f"{r['kernel']:<10} sm{r['arch']} {r['dtype']}/{precision:<6} {r['BLOCK_M']:>7} {r['BLOCK_N']:>7} "
              f"{r['BLOCK_D']:>7} {r['num_warps']:>5} {r['num_stages']:>6} {r['causal']!s:>6} {r['dropout']!s:>7} "
              f"{r['registers']:>5} {r['spill_stores']:>6} {r['shared_bytes']:>5}")
    for r in records:
        assert r["cubin_bytes"] > 0
        assert r["registers"] is not None and r["spill_stores"] is not None, f"no ptxas -v report for {r}"
        assert r["spill_stores"] <= SPILL_BOUND[r["dtype"]], f"spills beyond the documented bound: {r}"


def _matrix_size() -> list:
    """The matrix as seen from the test process (kernel objects may be interpreter wrappers here)."""
    from hierkern.ops import triton_attention as ta

    return _matrix(ta)


if __name__ == "__main__":
    print(json.dumps(_compile_all(int(sys.argv[1]))))
