"""A Hugging Face decoder's training step: padding-free on hierkern vs sdpa on the batch padded to its longest.

The model: ``LlamaForCausalLM`` from a config (no download): hidden 256, 4 heads of 64, 2 key/value heads (GQA),
2 layers, SwiGLU 688, vocabulary 1024, one seeded initialisation shared by every implementation. The batch:
short documents with a long tail, each two consecutive sentences of ``hierkern.bench``'s synthetic English at
one token per word (log-normal sentence lengths, mean 15 words; documents average ~30 tokens, the longest of
a batch 2-3x that), seeded token ids.

Groups ``hf-llama/train/<dtype>/<workload>``, one training step each (forward, causal LM loss, backward into
every parameter's ``.grad``, grads set to None first; the optimizer's step is the same for all and left out):

* ``hierkern-hf-padding-free``: ``attn_implementation="hierkern"`` on the ``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)`` batch: one row of real tokens, ``cu_seq_lens``, ``max_length``;
* ``hierkern-hf-padded``: ``attn_implementation="hierkern"`` on the padded batch with its ``attention_mask``
  (attention runs on the real tokens, every other layer on the padded ones);
* ``torch-sdpa-padded``: ``attn_implementation="sdpa"`` on the padded batch, what a user without
  FlashAttention runs today.

Before timing, each implementation's loss and parameter gradients must agree with sdpa's on the padded batch in
float32, within the harness's tolerance for the dtype (on the CPU, bfloat16 gradients land at 8.5e-3 of its 6e-2
and float16 at 1.4e-3 of 2e-2). Skipped when ``transformers`` is not installed.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from hierkern.bench import english_text

from harness import DTYPES, TOLERANCE, Prepared, devices, rel_err, run_benchmark

transformers = pytest.importorskip("transformers")
import hierkern.integrations.transformers as hf  # noqa: E402

IMPLS = ("hierkern-hf-padding-free", "hierkern-hf-padded", "torch-sdpa-padded")
WORKLOAD = "two-sentence-docs"
# Documents per batch, per --hk-size and device type.
DOCS = {"small": {"cpu": 16, "cuda": 256}, "default": {"cpu": 64, "cuda": 1024}, "large": {"cpu": 256, "cuda": 4096}}
VOCAB = 1024
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
BYTES_DEFINITION = "floor: read parameters twice (fwd, bwd), write parameter grads"


def pytest_generate_tests(metafunc):
    if "impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices(metafunc.config):
        for dtype in DTYPES[device]:
            for impl in IMPLS:
                params.append((device, dtype, impl))
                ids.append(f"{device}-hf-llama-train-{str(dtype).replace('torch.', '')}-{impl}")
    metafunc.parametrize("device,dtype,impl", params, ids=ids)


def document_lengths(num_docs: int) -> list[int]:
    """Tokens per document: pairs of consecutive synthetic English sentences, one token per word."""
    words = 0
    while True:
        words = max(2 * words, 40 * num_docs)  # ~30 words a document: one try is nearly always enough
        _, sentences = english_text(words, seed=0)
        lengths = [a + b for a, b in zip(sentences[0::2], sentences[1::2])]
        if len(lengths) >= num_docs:
            return lengths[:num_docs]


@functools.lru_cache(maxsize=1)
def batches(num_docs: int, device: str) -> tuple[dict, dict]:
    """``(padding_free, padded)`` model inputs of the same documents, on ``device``."""
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in document_lengths(num_docs)]
    flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    flat = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in flat.items()}
    longest = max(map(len, docs))
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)] = torch.tensor(doc)
        mask[i, : len(doc)] = 1
    padded = dict(
        input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.masked_fill(mask == 0, -100).to(device)
    )
    return flat, padded


def model(attn_implementation: str, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**copy.deepcopy(CONFIG))
    return (
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        .to(device, dtype)
        .train()
    )


def step(m, inputs) -> torch.Tensor:
    for p in m.parameters():
        p.grad = None
    loss = m(**inputs).loss
    loss.backward()
    return loss.detach()


def flat_grads(m) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for _, p in sorted(m.named_parameters())])


@functools.lru_cache(maxsize=1)
def sdpa_reference(num_docs: int, device: str):
    """sdpa's loss and parameter gradients on the padded batch in float32, as float64 on the CPU: the common
    target of every implementation and dtype."""
    m = model("sdpa", torch.float32, device)
    loss = step(m, batches(num_docs, device)[1])
    return loss.double().cpu(), flat_grads(m).double().cpu()


def test_hf_training_step(benchmark, request, skip_without_device, device, dtype, impl):
    skip_without_device(device)
    size = request.config.getoption("--hk-size")
    num_docs = DOCS[size][device]
    flat, padded = batches(num_docs, device)
    m = model("sdpa" if impl.startswith("torch-") else hf.register(), dtype, device)
    inputs = flat if impl == "hierkern-hf-padding-free" else padded
    ref_loss, ref_grads = sdpa_reference(num_docs, device)
    tol_out, tol_grad = TOLERANCE[dtype]

    def check(result):
        loss, grads = result
        errors = {"rel_err_out": rel_err(loss, ref_loss), "rel_err_grad": rel_err(grads, ref_grads)}
        assert errors["rel_err_out"] <= tol_out, (
            f"{impl}: loss {loss.item():.6g} differs from float32 sdpa on the padded batch ({ref_loss.item():.6g}, "
            f"rel. error {errors['rel_err_out']:.3g} > {tol_out:g}); not timing a wrong answer"
        )
        assert errors["rel_err_grad"] <= tol_grad, (
            f"{impl}: parameter gradients differ from float32 sdpa on the padded batch (rel. error "
            f"{errors['rel_err_grad']:.3g} > {tol_grad:g}); not timing a wrong answer"
        )
        if impl.startswith("hierkern-"):
            errors["path"] = sorted(
                {mod.hierkern_last_path for mod in m.modules() if hasattr(mod, "hierkern_last_path")}
            )
        return errors

    # The harness calls ``result`` right after the first, untimed run: the gradients are that run's.
    prepared = Prepared(lambda: step(m, inputs), lambda loss: (loss, flat_grads(m)))
    lengths = document_lengths(num_docs)
    num_params = sum(p.numel() for p in m.parameters())
    element = torch.empty(0, dtype=dtype).element_size()
    info = dict(
        workload=WORKLOAD,
        mode="train",
        tokens=sum(lengths),
        segments=num_docs,
        mean_len=sum(lengths) / num_docs,
        max_len=max(lengths),
        padded_tokens=num_docs * max(lengths),
        num_parameters=num_params,
        num_layers=CONFIG["num_hidden_layers"],
        num_heads=CONFIG["num_attention_heads"],
        num_kv_heads=CONFIG["num_key_value_heads"],
        head_dim=CONFIG["hidden_size"] // CONFIG["num_attention_heads"],
        transformers_version=transformers.__version__,
        size=size,
        bytes_definition=BYTES_DEFINITION,
    )
    run_benchmark(
        benchmark,
        group=f"hf-llama/train/{str(dtype).replace('torch.', '')}/{WORKLOAD}",
        impl=impl,
        prepared=prepared,
        reference=check,
        dtype=dtype,
        device=torch.device(device),
        floor_bytes=3 * num_params * element,
        info=info,
        family="hf",
    )
