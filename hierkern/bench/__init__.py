"""Benchmark support: the embedded workloads (shared by ``pytest benchmarks``) and the report command.

``python -m hierkern.bench report results.json [--plot out.png]`` reads pytest-benchmark JSON.
"""

from .workloads import Workload, english_text, make_qkv, workloads

__all__ = ["Workload", "english_text", "make_qkv", "workloads"]
