"""CUDA checks that need no GPU: every csrc/cuda kernel compiles for sm_80 and sm_90a with zero spills
within the designed register budget, so does the embedded compute_80 PTX that newer GPUs (sm_100, sm_120)
JIT-compile, the torch binding compiles against torch's headers, the schedule and dropout-RNG code the
kernels run (``__host__ __device__``, compiled here for the host) matches a Python model of the semantics
on adversarial layouts, and kernels that ``load_jit`` registers after import make the backend available.
Building and linking against a CUDA build of torch is ``.ci/cuda-link-check``.

Compilation is cached under ``build/cuda_check/<hash of sources and flags>``: a fresh run takes ~20-40 s on
two cores (two nvcc processes and one g++ in parallel), a cached one well under a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cuda_oracles import dropout_threshold, keep_mask, philox4x32_10, visibility
from helpers import Layout, adversarial_layouts, offsets_of

ROOT = Path(__file__).resolve().parent.parent
CSRC_CUDA = ROOT / "csrc" / "cuda"
# What csrc/cuda includes from the code it shares with csrc/cpu.
CSRC_COMMON = ROOT / "csrc" / "common"
CACHE = ROOT / "build" / "cuda_check"

KERNELS = ("varlen_fwd_kernel", "varlen_bwd_dq_kernel", "varlen_bwd_dkdv_kernel")
DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
HEAD_DIMS = (32, 64, 128)
ARCHS = ("sm_80", "sm_90a")
# The design (csrc/cuda/kernel_utils.cuh): 128 threads per CTA and four resident CTAs per SM, so at most
# 65536 / (4 * 128) = 128 registers per thread, and static shared memory under the 48 KiB opt-in limit.
MAX_REGISTERS = 128
MAX_STATIC_SMEM = 48 * 1024
# What torch's CUDAExtension adds to every nvcc command (the C++ standard too: our flags leave it to torch):
# the kernels must compile under it.
TORCH_NVCC_FLAGS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("HIERKERN_NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
        "/usr/local/cuda-13.0/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _find_nvcc()


def _cuda_include() -> Path | None:
    """The CUDA runtime headers' directory (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [Path(NVCC).resolve().parent.parent / "include"] if NVCC else []
    candidates += [
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
        Path("/usr/local/cuda-13.0/include"),
    ]
    return next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)


CXX = shutil.which("g++") or shutil.which("c++")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set HIERKERN_NVCC or CUDA_HOME)")
requires_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++)")


def _nvcc_command(source: Path, obj: Path) -> list[str]:
    # The flags setup.py and the JIT build use, plus ptxas' per-kernel report.
    from hierkern.ops.cuda_attention import jit_build_flags

    return [NVCC, "-c", str(source), "-o", str(obj), *jit_build_flags("80;90a"), *TORCH_NVCC_FLAGS, "-Xptxas", "-v"]


def _digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC_CUDA.iterdir()) + sorted(CSRC_COMMON.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in parts:
        h.update(str(part).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    dtype: str
    head_dim: int
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int


_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>\S+)' for '(?P<arch>sm_\w+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads.*?"
    r"Used (?P<regs>\d+) registers.*?(?P<smem>\d+) bytes smem",
    re.S,
)
_MANGLED = re.compile(
    r"(?P<kernel>varlen_(?:fwd|bwd_dq|bwd_dkdv)_kernel)I(?P<dtype>f|6__half|13__nv_bfloat16)Li(?P<d>\d+)E"
)


def parse_ptxas(log: str) -> list[KernelReport]:
    """Per-kernel register, spill, stack and shared-memory figures from ``nvcc -Xptxas -v`` output."""
    reports = []
    for entry in _ENTRY.finditer(log):
        name = _MANGLED.search(entry["name"])
        assert name is not None, f"unexpected kernel {entry['name']}"
        reports.append(
            KernelReport(
                name["kernel"],
                DTYPES[name["dtype"]],
                int(name["d"]),
                entry["arch"],
                int(entry["regs"]),
                int(entry["stores"]),
                int(entry["loads"]),
                int(entry["stack"]),
                int(entry["smem"]),
            )
        )
    return reports


@dataclass(frozen=True)
class Result:
    ok: bool
    output: str


def _run_parallel(jobs: dict[str, list[str]]) -> dict[str, Result]:
    """Run the commands at once (nvcc and g++ are single-threaded, so this is the speed-up)."""
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate()
        results[name] = Result(proc.returncode == 0, f"{' '.join(jobs[name])}\n{output}")
    return results


def _torch_include() -> Path:
    return Path(torch.__file__).parent / "include"


def _binding_command(build: Path) -> list[str] | None:
    """g++ -fsyntax-only of binding.cpp against this torch's headers. A CPU-only torch cannot link it, and
    its wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h), which a stub replaces."""
    if CXX is None or _cuda_include() is None:
        return None
    include = _torch_include()
    stub = build / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [
        CXX,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-isystem",
        str(build / "stub"),
        "-isystem",
        str(include),
        "-isystem",
        str(include / "torch" / "csrc" / "api" / "include"),
        "-isystem",
        str(_cuda_include()),
        str(CSRC_CUDA / "binding.cpp"),
    ]


def _build_dir() -> Path:
    return CACHE / _digest(_nvcc_command(Path("x.cu"), Path("x.o")) + [torch.__version__, str(CXX)])


@pytest.fixture(scope="session")
def builds() -> dict[str, Result]:
    """nvcc of every .cu (sm_80 + sm_90a) and the binding's syntax check, all in parallel. A successful
    build is kept under build/cuda_check/<hash of csrc/cuda and csrc/common, flags, torch version>: it is built
    in a private directory and renamed into place, so concurrent test runs never see half-written files."""
    final = _build_dir()
    if final.is_dir():
        return {log.name[: -len(".log")]: Result(True, log.read_text()) for log in final.glob("*.log")}
    build = Path(f"{final}.tmp{os.getpid()}")
    build.mkdir(parents=True, exist_ok=True)
    jobs = {}
    if NVCC is not None:
        for source in sorted(CSRC_CUDA.glob("*.cu")):
            jobs[source.name] = _nvcc_command(source, build / f"{source.stem}.o")
    binding = _binding_command(build)
    if binding is not None:
        jobs["binding.cpp"] = binding
    results = _run_parallel(jobs)
    for name, result in results.items():
        (build / f"{name}.log").write_text(result.output)
    if all(r.ok for r in results.values()):
        try:
            build.rename(final)
        except OSError:  # another run got there first; its build is the same
            shutil.rmtree(build, ignore_errors=True)
    return results


@pytest.fixture(scope="session")
def ptxas_reports(builds) -> dict[str, list[KernelReport]]:
    """Per .cu file, the parsed ptxas report."""
    if NVCC is None:
        pytest.skip("nvcc not found (set HIERKERN_NVCC or CUDA_HOME)")
    failed = {name: r.output for name, r in builds.items() if name.endswith(".cu") and not r.ok}
    assert not failed, "\n\n".join(failed.values())[-8000:]
    return {name: parse_ptxas(r.output) for name, r in builds.items() if name.endswith(".cu")}


@requires_nvcc
def test_every_kernel_is_compiled_for_both_archs(ptxas_reports):
    found = {(r.kernel, r.dtype, r.head_dim, r.arch) for reports in ptxas_reports.values() for r in reports}
    expected = {(k, t, d, a) for k in KERNELS for t in DTYPES.values() for d in HEAD_DIMS for a in ARCHS}
    assert found == expected
    assert set(ptxas_reports) == {"varlen_fwd.cu", "varlen_bwd.cu"}


@requires_nvcc
def test_no_spills_and_register_budget(ptxas_reports):
    reports = [r for rs in ptxas_reports.values() for r in rs]
    spilling = [r for r in reports if r.spill_stores or r.spill_loads]
    assert not spilling, f"kernels spill: {spilling}"
    over = [r for r in reports if r.registers > MAX_REGISTERS]
    assert not over, f"kernels over the {MAX_REGISTERS}-register budget: {over}"
    big = [r for r in reports if r.smem > MAX_STATIC_SMEM]
    assert not big, f"kernels over {MAX_STATIC_SMEM} bytes of static shared memory: {big}"


def _cuobjdump() -> str | None:
    """cuobjdump: the toolkit's, else the copy in the triton wheel (CONTRIBUTING.md, "The machines")."""
    candidates = [shutil.which("cuobjdump")]
    if NVCC is not None:
        candidates.append(str(Path(NVCC).resolve().parent / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_100", "sm_120"])
def test_ptx_fallback_for_newer_gpus(ptxas_reports, tmp_path, arch):
    """A GPU newer than every SASS target (Blackwell) runs the embedded PTX, JIT-compiled by its driver: it
    must be compute_80's (arch-specific compute_90a PTX would not load there) and compile for that GPU with
    every kernel inside the same budget as the SASS."""
    cuobjdump, ptxas = _cuobjdump(), Path(NVCC).resolve().parent / "ptxas"
    if cuobjdump is None or not ptxas.is_file():
        pytest.skip("cuobjdump or ptxas not found next to nvcc (or in the triton wheel)")
    reports = []
    for obj in sorted(_build_dir().glob("*.o")):
        listing = subprocess.run([cuobjdump, "--list-ptx", str(obj)], capture_output=True, text=True, check=True)
        assert re.findall(r"PTX file\s+\d+: (\S+)", listing.stdout) == [f"{obj.stem}.sm_80.ptx"], listing.stdout
        subprocess.run([cuobjdump, "-xptx", "all", str(obj)], cwd=tmp_path, capture_output=True, check=True)
        ptx = tmp_path / f"{obj.stem}.sm_80.ptx"
        assert re.search(r"^\.target sm_80$", ptx.read_text(), re.M)
        result = subprocess.run(
            [str(ptxas), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-4000:]
        reports += parse_ptxas(result.stdout + result.stderr)
    assert {(r.kernel, r.dtype, r.head_dim, r.arch) for r in reports} == {
        (k, t, d, arch) for k in KERNELS for t in DTYPES.values() for d in HEAD_DIMS
    }
    assert not [
        r for r in reports if r.spill_stores or r.spill_loads or r.registers > MAX_REGISTERS or r.smem > MAX_STATIC_SMEM
    ]


_LINK_MAIN = r"""
#include "varlen_attention.h"
int main(int argc, char**) {
  hierkern::cuda::FwdArgs fwd{};
  hierkern::cuda::BwdArgs bwd{};
  if (argc > 1) {  // never taken: linking is the check
    hierkern::cuda::varlen_fwd(fwd, nullptr);
    hierkern::cuda::varlen_bwd(bwd, nullptr);
  }
  return 0;
}
"""


@requires_nvcc
def test_launchers_link_with_only_cudart(ptxas_reports, tmp_path):
    """The kernel objects are torch-free: with a host main calling both launchers they link against the
    CUDA runtime alone, every template instantiation resolved."""
    objects = sorted(_build_dir().glob("*.o"))
    assert len(objects) == len(ptxas_reports)
    (tmp_path / "main.cpp").write_text(_LINK_MAIN)
    cmd = [
        NVCC,
        "-I",
        str(CSRC_CUDA),
        str(tmp_path / "main.cpp"),
        *map(str, objects),
        "-o",
        str(tmp_path / "main"),
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert subprocess.run([str(tmp_path / "main")]).returncode == 0


@requires_cxx
@pytest.mark.skipif(_cuda_include() is None, reason="CUDA runtime headers not found (set CUDA_HOME)")
def test_binding_compiles_against_torch_headers(builds):
    result = builds["binding.cpp"]
    assert result.ok, result.output[-4000:]


# ---------------------------------------------------------------------------------------------------------
# The nvcc flags' one definition (hierkern/ops/cuda_flags.py), which setup.py loads by path
# ---------------------------------------------------------------------------------------------------------


def test_nvcc_flags_load_without_torch():
    """setup.py runs before hierkern is installed, possibly before torch is importable."""
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises\n"
        f"path = {str(ROOT / 'hierkern' / 'ops' / 'cuda_flags.py')!r}\n"
        "spec = importlib.util.spec_from_file_location('flags', path)\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(' '.join(module.nvcc_flags('80;90a')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from hierkern.ops.cuda_attention import jit_build_flags

    assert result.stdout.split() == jit_build_flags("80;90a")


def test_nvcc_flags_archs(monkeypatch):
    from hierkern.ops.cuda_flags import nvcc_flags, ptx_arch

    monkeypatch.delenv("HIERKERN_CUDA_ARCHS", raising=False)
    assert nvcc_flags() == nvcc_flags("80;90a")
    monkeypatch.setenv("HIERKERN_CUDA_ARCHS", "90a")
    sass = [f for f in nvcc_flags() if f.startswith("-gencode") and ",code=sm_" in f]
    assert sass == ["-gencode=arch=compute_90a,code=sm_90a"]
    # PTX for the oldest SM, never arch-specific (compute_90a PTX runs on sm_90 alone).
    assert ptx_arch("80;90a") == "80" and ptx_arch("90a") == "90" and ptx_arch("100a;90a") == "90"
    ptx = [f for f in nvcc_flags("80;90a") if ",code=compute_" in f]
    assert ptx == ["-gencode=arch=compute_80,code=compute_80"]
    for bad in ("", ";", "sm_80", "80,90"):
        with pytest.raises(ValueError, match="HIERKERN_CUDA_ARCHS"):
            nvcc_flags(bad)


# ---------------------------------------------------------------------------------------------------------
# The JIT path's bookkeeping: the build itself needs a CUDA build of torch (.ci/cuda-link-check runs it), so
# here torch's `load` is replaced by one that registers (or fails to register) CUDA kernels for the ops.
# ---------------------------------------------------------------------------------------------------------


def _fake_load(registers: tuple[str, ...], libraries: list, calls: list | None = None):
    def load(**kwargs):
        if calls is not None:
            calls.append(kwargs)
        lib = torch.library.Library("hierkern", "IMPL")  # destroyed by the jit_module fixture
        libraries.append(lib)
        for op in registers:
            lib.impl(op, lambda *args: None, "CUDA")

    return load


@pytest.fixture
def jit_module(monkeypatch):
    """hierkern.ops.cuda_attention as a process without CUDA kernels sees it, on a machine whose CUDA toolchain
    could build them; reset after the test."""
    from hierkern.ops import cuda_attention, extension, toolchain

    if extension.loaded_from() is None:
        pytest.skip(f"hierkern's extension is not loaded: {extension.load_error()}")
    if extension.kernel_unavailable_reason("CUDA") is None:
        pytest.skip("this hierkern._C was built with CUDA kernels: load_jit has nothing to do")
    monkeypatch.setattr(cuda_attention, "_jit_loaded", False)
    monkeypatch.setattr(cuda_attention, "_jit_error", None)
    monkeypatch.setattr(toolchain, "cuda_toolchain_problem", lambda: None)
    libraries = []
    yield cuda_attention, monkeypatch, libraries
    for lib in libraries:
        lib._destroy()


def test_jit_kernels_count_once_registered(jit_module):
    """extension.kernel_unavailable_reason is fixed when the extension loads; kernels the JIT build registers
    later must still make the backend available. Asking builds nothing; preparing builds once."""
    cuda_attention, monkeypatch, libraries = jit_module
    import torch.utils.cpp_extension

    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load(("varlen_fwd", "varlen_bwd"), libraries, calls))
    assert cuda_attention._kernels_unavailable() is None  # buildable: available, and nothing compiled
    assert calls == []
    assert cuda_attention._prepare() is None
    assert len(calls) == 1
    assert sorted(Path(p).name for p in calls[0]["sources"]) == ["binding.cpp", "varlen_bwd.cu", "varlen_fwd.cu"]
    assert calls[0]["extra_cuda_cflags"] == cuda_attention.jit_build_flags()
    cuda_attention.load_jit()  # already loaded: builds nothing
    assert cuda_attention._kernels_unavailable() is None
    assert len(calls) == 1


def test_jit_build_that_registers_nothing_is_refused(jit_module):
    cuda_attention, monkeypatch, libraries = jit_module
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load(("varlen_fwd",), libraries))
    reason = cuda_attention._prepare()
    assert reason == (
        "the JIT build of csrc/cuda failed (RuntimeError: the JIT build of csrc/cuda loaded but "
        "registered no CUDA kernel for hierkern::varlen_bwd)"
    )
    assert cuda_attention._prepare() == reason
    assert cuda_attention._kernels_unavailable() == reason
    assert len(libraries) == 1  # a failed build is not retried on every call


def test_cuda_toolchain_without_headers_is_one_line(monkeypatch, tmp_path):
    """An nvcc on PATH without the toolkit's headers is found before any compiler runs, in one line."""
    import torch.utils.cpp_extension

    from hierkern.ops import toolchain

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    toolchain.cuda_toolchain_problem.cache_clear()
    try:
        problem = toolchain.cuda_toolchain_problem()
    finally:
        toolchain.cuda_toolchain_problem.cache_clear()
    assert problem == (
        f"CUDA_HOME={tmp_path} has no include/cuda_runtime.h (a CUDA toolkit without its headers): "
        f"install the CUDA developer files or point CUDA_HOME at a full toolkit"
    )


# ---------------------------------------------------------------------------------------------------------
# Host emulation of the schedule and the dropout RNG: the kernels' own __host__ __device__ code
# ---------------------------------------------------------------------------------------------------------

_HOST_SHIM = r"""
#include "schedule.cuh"
#include "../common/philox.h"
using namespace hierkern;
using namespace hierkern::cuda;
extern "C" {
int hk_find_segment(const int* offsets, int n, int token) { return find_segment(offsets, n, token); }
void hk_keys_of_query(const int* q, const int* k, int n, int row, int left, int right, int* out) {
  Interval i = keys_of_query(q, k, n, row, Window{left, right}); out[0] = i.begin; out[1] = i.end; }
void hk_queries_of_key(const int* q, const int* k, int n, int col, int left, int right, int* out) {
  Interval i = queries_of_key(q, k, n, col, Window{left, right}); out[0] = i.begin; out[1] = i.end; }
void hk_philox(const unsigned* ctr, unsigned k0, unsigned k1, unsigned* out) {
  Philox4x32 r = philox4x32_10(Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, k0, k1);
  for (int i = 0; i < 4; ++i) out[i] = r.x[i]; }
unsigned hk_threshold(float p) { return dropout_threshold(p); }
int hk_keep(unsigned long long seed, unsigned long long offset, int head, int q, int k, unsigned t) {
  return dropout_keep(seed, offset, head, q, k, t); }
}
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler (g++)")
    build = tmp_path_factory.mktemp("cuda_host")
    (build / "shim.cpp").write_text(_HOST_SHIM)
    lib = build / "libhkhost.so"
    subprocess.run(
        [
            CXX,
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            "-I",
            str(CSRC_CUDA),
            str(build / "shim.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
    )
    handle = ctypes.CDLL(str(lib))
    handle.hk_threshold.argtypes = [ctypes.c_float]
    handle.hk_threshold.restype = ctypes.c_uint
    handle.hk_keep.argtypes = [
        ctypes.c_ulonglong,
        ctypes.c_ulonglong,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    return handle


class _Layout:
    """A layout's offsets as C arrays, and the semantics' visibility matrix (cuda_oracles.visibility)."""

    def __init__(self, lengths_q, lengths_k, window):
        self.cu_q = offsets_of(lengths_q).tolist()
        self.cu_k = offsets_of(lengths_k).tolist()
        self.n = len(lengths_q)
        self.total_q, self.total_k = self.cu_q[-1], self.cu_k[-1]
        self.c_q = (ctypes.c_int * len(self.cu_q))(*self.cu_q)
        self.c_k = (ctypes.c_int * len(self.cu_k))(*self.cu_k)
        self.window = window
        self.visible = visibility(Layout("", tuple(lengths_q), tuple(lengths_k)), window)

    def call(self, fn, *args):
        out = (ctypes.c_int * 2)()
        fn(self.c_q, self.c_k, self.n, *args, *self.window, out)
        return out[0], out[1]


def _schedule_layouts():
    layouts = [(lay.lengths_q, lay.keys) for lay in adversarial_layouts(tile=16)]
    rng = random.Random(6)
    for _ in range(6):  # random cross-attention layouts, zeros on either side
        n = rng.randint(1, 30)
        layouts.append(
            (
                tuple(rng.choice((0, 0, 1, 2, 3, 5, 9, 17)) for _ in range(n)),
                tuple(rng.choice((0, 1, 2, 4, 6, 16, 33)) for _ in range(n)),
            )
        )
    return layouts


# FlashAttention's window_size (left, right): none, causal, sliding windows on one side, both or neither, and
# sides of 2^31 - 1 that overflow int when added to a position.
SCHEDULE_WINDOWS = [(-1, -1), (-1, 0), (0, 0), (2, 1), (0, -1), (5, 2), (1, 5), (-1, 3), (2**31 - 1, 3), (3, 2**31 - 1)]


@requires_cxx
@pytest.mark.parametrize("window", SCHEDULE_WINDOWS, ids=str)
@pytest.mark.parametrize("lengths", _schedule_layouts())
def test_schedule_matches_the_semantics(host_lib, lengths, window):
    """Each row's interval is exactly what it sees, both ends non-decreasing in the row (what
    csrc/cuda/tile_union.cuh's prefix sum relies on); likewise for key rows."""
    lay = _Layout(*lengths, window)
    for rows, other, fn, visible in (
        (lay.total_q, lay.total_k, host_lib.hk_keys_of_query, lay.visible),
        (lay.total_k, lay.total_q, host_lib.hk_queries_of_key, lay.visible.t()),
    ):
        last = (0, 0)
        for row in range(rows):
            begin, end = lay.call(fn, row)
            expect = torch.zeros(other, dtype=torch.bool)
            expect[begin:end] = True
            assert 0 <= begin <= end <= other and torch.equal(expect, visible[row]), (row, begin, end)
            assert begin >= last[0] and end >= last[1], (row, last, begin, end)
            last = (begin, end)
    for row in range(lay.total_q):
        seg = host_lib.hk_find_segment(lay.c_q, lay.n, row)
        assert lay.cu_q[seg] <= row < lay.cu_q[seg + 1]


# Random123's published known-answer vectors for Philox4x32-10 (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@requires_cxx
@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(host_lib, ctr, key, expected):
    out = (ctypes.c_uint * 4)()
    host_lib.hk_philox((ctypes.c_uint * 4)(*ctr), key[0], key[1], out)
    assert tuple(out) == expected
    assert philox4x32_10(ctr, key) == expected


@requires_cxx
def test_dropout_mask_matches_the_python_model(host_lib):
    """The kernels' keep decision equals the model the GPU tests rebuild masks with, and keeps ~1-p."""
    for seed, offset, p in ((0, 0, 0.1), (2**62 - 7, 12345, 0.5), (987654321, 2**40 + 3, 0.9)):
        threshold = dropout_threshold(p)
        assert host_lib.hk_threshold(p) == threshold
        heads, total_q, total_k = 2, 13, 11
        mask = keep_mask(seed, offset, heads, total_q, total_k, p)
        native = torch.tensor(
            [
                [[host_lib.hk_keep(seed, offset, h, i, j, threshold) for j in range(total_k)] for i in range(total_q)]
                for h in range(heads)
            ],
            dtype=torch.bool,
        )
        assert torch.equal(mask, native)
    big = keep_mask(2024, 7, 4, 64, 64, 0.3)
    assert abs(big.float().mean().item() - 0.7) < 0.02
    assert not torch.equal(keep_mask(2024, 8, 4, 64, 64, 0.3), big)  # a new offset draws a new mask
