"""The command line a person discovers (`python -m hierkern --help`), the doctor, and `explain` called the way
`varlen_attention` is."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern import __main__ as cli
from hierkern import doctor, train
from hierkern.ops import extension


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hierkern", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("train", "report", "doctor"):
        assert f"    {command} " in result.stdout
    assert set(cli.COMMANDS) == {"train", "report", "doctor"}


@pytest.mark.parametrize("argv, status", [([], 2), (["bogus"], 2)])
def test_no_or_unknown_command_is_a_usage_error(argv, status):
    result = _run(*argv)
    assert result.returncode == status
    assert "usage: python -m hierkern" in result.stderr


@pytest.mark.parametrize("command", ["train", "report", "doctor"])
def test_each_command_has_its_own_help(command):
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m hierkern")


def _report_parser() -> argparse.ArgumentParser:
    from hierkern.bench.__main__ import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["report"]


@pytest.mark.parametrize(
    "parser", [train.build_parser, doctor.build_parser, _report_parser], ids=["train", "doctor", "report"]
)
def test_every_flag_has_help_that_shows_its_default(parser):
    for action in parser()._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in action.help, f"{action.option_strings}: the help does not say the default"


def test_doctor_reports_backends_toolchain_and_versions():
    result = _run("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in hierkern.backend_names():
        assert f"\n  {name} " in result.stdout
    for line in ("torch", "C++ compiler", "CUDA kernels", "compiled kernels", "JIT cache"):
        assert line in result.stdout
    cpu_line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["cpu"])
    expected = "available" if extension.load_error() is None else "unavailable"
    assert cpu_line.split()[1] == expected, cpu_line


def test_doctor_report_compiles_nothing(monkeypatch):
    from hierkern.ops import toolchain

    def refuse(*args, **kwargs):
        raise AssertionError("the doctor's report must not compile")

    monkeypatch.setattr(toolchain, "build_cpu_kernels", refuse)
    monkeypatch.setattr(toolchain, "build_cuda_kernels", refuse)
    assert "backends" in doctor.report()


def _inputs():
    words = hierkern.Segments.from_lengths([3, 5, 0, 2])
    q = torch.randn(words.total, 4, 16)
    k = v = torch.randn(words.total, 2, 16)
    return q, k, v, words


def test_explain_takes_the_call_as_varlen_attention_does():
    q, k, v, words = _inputs()
    reasons = hierkern.explain(q, k, v, words, causal=True)
    assert list(reasons) == [b for b in ("triton", "cuda", "cpu", "reference") if b in reasons]
    call = hierkern.AttentionCall.of(q, k, v, words.max_len, words.max_len, causal=True)
    assert reasons == hierkern.explain(call)
    assert reasons["reference"] is None
    if extension.load_error() is None:
        assert reasons["cpu"] is None
    # The backend it names as first to accept is the one "auto" runs.
    first = next(name for name, why in reasons.items() if why is None and name != "triton")
    out = hierkern.varlen_attention(q, k, v, words, causal=True)
    torch.testing.assert_close(out, hierkern.varlen_attention(q, k, v, words, causal=True, backend=first))
    # Offsets as tensors and host max lengths, as FlashAttention takes them.
    assert hierkern.explain(q, k, v, words.offsets, words.offsets, 5, 5, causal=True) == reasons


def test_explain_validates_like_varlen_attention():
    q, k, v, words = _inputs()
    with pytest.raises(ValueError, match="number of query heads"):
        hierkern.explain(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), words)
    with pytest.raises(TypeError, match="causal"):
        hierkern.explain(q, k, v, words, causal=1)
    with pytest.raises(ValueError, match="dropout_p"):
        hierkern.explain(q, k, v, words, dropout_p=1.0)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        hierkern.explain(q, k, v)
    call = hierkern.AttentionCall.of(q, k, v, 5, 5)
    with pytest.raises(TypeError, match="either one AttentionCall"):
        hierkern.explain(call, k)


def test_explain_compiles_nothing(monkeypatch):
    q, k, v, words = _inputs()
    for backend in hierkern.backends._REGISTRY.values():
        if hasattr(backend, "prepare"):
            monkeypatch.setattr(
                type(backend), "prepare", lambda self: pytest.fail("explain must not prepare (compile) a backend")
            )
    hierkern.explain(q, k, v, words)
