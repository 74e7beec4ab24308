"""Installing hierkern as a user does: ``pip wheel`` / ``pip install`` with pip's default build isolation, from
a copy of the tracked files, into a fresh virtualenv that sees this machine's torch (and not its hierkern).

The wheel must be pure Python (no torch in the build environment, so none is fetched), carry the kernels'
sources, and give a working ``cpu`` backend on first use by compiling them against the running torch; with
no compiler, ``import hierkern`` must still work and say once, at the user's import, how to get the kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(target: Path) -> Path:
    """The repository as a fresh clone of it with these changes committed has it: tracked and new files that git
    does not ignore, no build products."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are tracked")
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = _tracked_copy(tmp / "src")
    out = tmp / "dist"
    # Default build isolation, as `pip install .` does; pip needs the package index for setuptools.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("hierkern-*.whl")
    return built


@pytest.fixture(scope="module")
def env(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed that sees this machine's torch, and nothing else of it.

    Not ``--system-site-packages``: that would also run the system's ``.pth`` files, and a development install
    of hierkern (``pip install -e .``) registers an import hook there that would serve ``hierkern._C`` from the
    checkout. A ``.pth`` line naming torch's folder adds the folder alone.
    """
    import torch

    path = tmp_path_factory.mktemp("venv") / "venv"
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (site,) = path.glob("lib/python*/site-packages")
    (site / "_torch_of_the_host.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    return python


def _run(python: Path, code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), **env}
    environ.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ,
        timeout=900,
    )


def test_wheel_is_pure_python_with_the_sources(wheel):
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (
        "hierkern/csrc/hierkern.cpp",
        "hierkern/csrc/cpu/attention_cpu.cpp",
        "hierkern/csrc/cpu/attention_kernel_impl.h",
        "hierkern/csrc/common/philox.h",
        "hierkern/csrc/cuda/varlen_fwd.cu",
        "hierkern/csrc/cuda/binding.cpp",
    ):
        assert source in names
    assert not any(name.endswith(".so") for name in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert any("torch>=2.8" in line for line in requires), requires


def test_cpu_kernels_compile_on_first_use(env, tmp_path):
    result = _run(
        env,
        """
        import torch, hierkern
        from hierkern.ops import extension
        assert hierkern.__file__.startswith(__import__("sys").prefix), hierkern.__file__
        assert extension.loaded_from() is None and extension.load_error() is None
        assert hierkern.explain(hierkern.AttentionCall.of(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8),
                                torch.zeros(1, 1, 8), 1, 1))["cpu"] is None
        assert extension.loaded_from() is None, "explain must not compile"
        words = hierkern.Segments.from_lengths([3, 5, 1, 0, 7])
        q, k, v = (torch.randn(words.total, 4, 16, requires_grad=True) for _ in range(3))
        out = hierkern.varlen_attention(q, k, v, words, causal=True)
        assert extension.loaded_from() == "a just-in-time build", extension.loaded_from()
        ref = hierkern.varlen_attention(q, k, v, words, causal=True, backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        out.sum().backward()
        print("ok", hierkern.available_backends())
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok ['cpu', 'reference']" in result.stdout
    assert "hierkern: compiling the C++ CPU kernels for torch" in result.stderr
    # Cached: a second process compiles nothing.
    again = _run(
        env,
        """
        import torch, hierkern
        q = torch.randn(6, 2, 8)
        hierkern.varlen_attention(q, q, q, hierkern.Segments.from_lengths([2, 4]), backend="cpu")
        """,
        tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr


def test_without_a_compiler_import_works_and_says_how_once(env, tmp_path):
    result = _run(
        env,
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hierkern
            import hierkern.functional, hierkern.nn
        import torch
        words = hierkern.Segments.from_lengths([3, 2])
        q = torch.randn(5, 2, 8)
        out = hierkern.varlen_attention(q, q, q, words)
        for w in caught:
            print("WARNING", w.filename, "|", w.message)
        print("backends", hierkern.available_backends())
        """,
        tmp_path,
        CXX="/nonexistent/c++",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings_seen = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings_seen) == 1, result.stdout
    # Points at the user's import (here the -c script), and names the cause and the fix.
    assert warnings_seen[0].startswith("WARNING <string> |"), warnings_seen[0]
    assert "no C++ compiler" in warnings_seen[0] and "apt install g++" in warnings_seen[0]
    assert "python -m hierkern doctor" in warnings_seen[0]
    assert "backends ['reference']" in result.stdout
    doctor = subprocess.run(
        [str(env), "-m", "hierkern", "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")},
    )
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "cpu" in doctor.stdout and "no C++ compiler" in doctor.stdout
