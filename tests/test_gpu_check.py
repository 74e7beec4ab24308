"""benchmarks/gpu_check, the prepared one-call GPU check, kept ready without a GPU.

A GPU session gets one call of ``bash benchmarks/gpu_check/gpu_check.sh``; whatever of it broke since it was last
run costs that call. So CI runs its CPU dry run (``HK_GPU_CHECK_DEVICE=cpu HK_GPU_CHECK_TINY=1``: the sweep and
the single-kernel launches on tiny problems in Triton's interpreter, through the launchers' current argument
builders), its device-free phases (lengths on the real sizes, summary, junit), the shell script's syntax and the
test ids it names, and the compile of its torch-free sanitizer harness against csrc/cuda's current argument
structs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cuda_build import NVCC

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check"


def _gpu_check(out: Path, *args: str, tiny: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), TRITON_INTERPRET="1", HK_GPU_CHECK_DEVICE="cpu")
    env.pop("HK_GPU_CHECK_TINY", None)
    if tiny:
        env["HK_GPU_CHECK_TINY"] = "1"
    result = subprocess.run(
        [sys.executable, str(CHECK / "gpu_check.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The CPU dry run's records and its summary."""
    out = tmp_path_factory.mktemp("gpu-out")
    _gpu_check(out, "sweep", "--workers", "2")
    _gpu_check(out, "launches")
    summary = _gpu_check(out, "summary").stdout
    records = [json.loads(line) for line in (out / "20_records.jsonl").read_text().splitlines()]
    return records, summary


def test_dry_run_records_no_error(dry_run):
    records, _ = dry_run
    assert [r for r in records if "error" in r] == []


def test_sweep_checks_every_config_dtype_and_the_careful_pass(dry_run):
    records, summary = dry_run
    sweep = [r for r in records if r["phase"] == "sweep"]
    assert [r["ok"] for r in sweep] == [True] * 9
    assert {r["cfg"] for r in sweep} == {0, 1, 2}
    assert {r["dtype"] for r in sweep} == {"bf16", "fp16", "fp32"}
    assert any(r["dropout"] > 0 for r in sweep) and any(r["causal"] for r in sweep)
    poisoned = [r for r in sweep if r["nonfinite"]]
    assert len(poisoned) == 2
    for r in poisoned:
        assert r["nonfinite_ref_values"] > 0 and r["nonfinite_pattern_ok"] and r["nonfinite_untouched_close"]
    assert "sweep: 9/9 config cases ok" in summary


def test_single_kernel_launches_match_the_launchers(dry_run):
    records, summary = dry_run
    (launches,) = [r for r in records if r["phase"] == "launches"]
    assert launches["match"] == {"out": True, "lse": True, "dq": True, "dk": True, "dv": True}
    assert "single-kernel launches" in summary


def test_lengths_builds_the_real_workloads_and_sweep_layout(tmp_path):
    lines = _gpu_check(tmp_path, "lengths", tiny=False).stdout.splitlines()
    assert lines[0].startswith("chars tokens 1048576 ")
    assert "poisoned segments (q, k lengths): [(257, 257), (3, 3)]" in lines
    assert "sweep cases 39" in lines


def test_junit_merges_runs_and_counts_per_backend(tmp_path):
    (tmp_path / "a.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.conformance.test_numerics" name="test_x[triton-cuda-words]"/>'
        '<testcase classname="tests.conformance.test_numerics" name="test_x[cuda-cuda-words]">'
        '<failure message="AssertionError: too far">trace</failure></testcase>'
        '<testcase classname="tests.conformance.test_numerics" name="test_y[cuda-cuda]">'
        '<skipped message="refuses"/></testcase>'
        '<testcase time="0.1"/></testsuite></testsuites>'
    )
    (tmp_path / "b.xml").write_text(
        '<testsuite name="pytest"><testcase classname="tests.test_cuda_backend" name="test_opcheck[True]"/></testsuite>'
    )
    merged = tmp_path / "merged.xml"
    text = _gpu_check(
        tmp_path,
        "junit",
        "--into",
        str(merged),
        str(tmp_path / "a.xml"),
        str(tmp_path / "b.xml"),
        str(tmp_path / "cut.xml"),
    ).stdout
    assert merged.read_text().count("<testcase") == 5
    counts = dict(re.findall(r"^  (\S+(?: \S+)?) +(\d+ \w+(?:, \d+ \w+)*)$", text, re.MULTILINE))
    assert counts == {
        "conformance cuda-cuda": "1 failed, 1 skipped",
        "conformance triton-cuda": "1 passed",
        "test_cuda_backend": "1 passed",
        "(interrupted)": "1 unfinished",
    }
    assert "FAIL tests.conformance.test_numerics::test_x[cuda-cuda-words]: AssertionError: too far" in text
    assert "cut.xml: FileNotFoundError" in text


def test_shell_script_parses():
    result = subprocess.run(["bash", "-n", str(CHECK / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_triton_test_ids_the_script_names_exist():
    """The script defers four params of one Triton GPU test by id; a renamed test would make --deselect a no-op
    and the deferred run an error."""
    script = (CHECK / "gpu_check.sh").read_text()
    test = re.search(r"^TT=(\S+)$", script, re.MULTILINE).group(1)
    ids = sorted({f"{test}[{param}]" for param in re.findall(r"\$TT\[([^\]]+)\]", script)})
    assert len(ids) == 4
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "4 tests collected" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set HIERKERN_NVCC or CUDA_HOME)")
def test_sanitize_harness_compiles_against_the_current_headers(tmp_path):
    """The harness fills csrc/cuda/varlen_attention.h's argument structs field by field: compiling it (the host
    code; it holds no kernel) is what tells a field it still sets from one the structs dropped."""
    result = subprocess.run(
        [
            NVCC,
            "-c",
            "-gencode=arch=compute_90a,code=sm_90a",
            f"-I{ROOT / 'csrc' / 'cuda'}",
            str(CHECK / "sanitize_harness.cu"),
            "-o",
            str(tmp_path / "harness.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
