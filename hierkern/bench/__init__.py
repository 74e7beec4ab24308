"""Benchmark support: the embedded workloads (shared by ``pytest benchmarks``) and the report command.

``python -m hierkern.bench report results.json [--plot out.png]`` reads pytest-benchmark JSON.
"""

from .workloads import SEED_MODEL_VOCAB, SEED_MODEL_WORDS, Workload, english_text, make_qkv, seed_model_batch, workloads

__all__ = [
    "SEED_MODEL_VOCAB",
    "SEED_MODEL_WORDS",
    "Workload",
    "english_text",
    "make_qkv",
    "seed_model_batch",
    "workloads",
]
