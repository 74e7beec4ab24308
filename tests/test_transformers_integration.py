"""``attn_implementation="hierkern"`` in Hugging Face models (hierkern.integrations.transformers).

Tiny models built from configs (no downloads): a Llama-style decoder with GQA, a BERT encoder, and sliding
windows in Mistral (causal) and ModernBERT (bidirectional local layers). Every result is compared with the same
weights under ``attn_implementation="sdpa"`` on the equivalent padded batch, on the real (non-padding) tokens:
loss, logits and every parameter gradient, fp32.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    DataCollatorWithFlattening,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
)
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,  # noqa: E402
    packed_sequence_mask_function,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import AttentionInterface  # noqa: E402

import hierkern.integrations.transformers as hf  # noqa: E402

# The documented call: in a test session hierkern is imported long before transformers, so importing hierkern
# did not register it.
hf.register()

VOCAB = 97
LENGTHS = (7, 1, 13, 4, 9, 2)  # a one-token document, as padding-free batches produce
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# fp32, same weights: sdpa's and hierkern's kernels sum in different orders.
TOL = dict(rtol=1e-4, atol=2e-5)


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def modernbert_config(local_attention: int = 32) -> ModernBertConfig:
    """Layer 0 global, layers 1-2 local: a bidirectional window of ``local_attention // 2`` tokens on each side
    (by default 16, longer than every test document)."""
    return ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        local_attention=local_attention,
        global_attn_every_n_layers=3,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        mask_token_id=3,
    )


def mistral_config(sliding_window: int) -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=sliding_window,
    )


def model_pair(auto, config, device="cpu", impl="hierkern"):
    """``(ours, sdpa)``: one seeded initialisation, each with its own config copy (a model keeps a reference to
    its config, and ``from_config`` writes the implementation into it)."""
    torch.manual_seed(0)
    ours = auto.from_config(copy.deepcopy(config), attn_implementation=impl).to(device)
    sdpa = auto.from_config(copy.deepcopy(config), attn_implementation="sdpa").to(device)
    sdpa.load_state_dict(ours.state_dict())
    return ours, sdpa


def documents(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def padded(docs, device="cpu", left=False):
    """``input_ids, attention_mask, labels`` ``(B, max_len)``; labels -100 on padding."""
    length = max(map(len, docs))
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for i, doc in enumerate(docs):
        cols = slice(length - len(doc), length) if left else slice(0, len(doc))
        ids[i, cols] = torch.tensor(doc)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device), ids.masked_fill(mask == 0, -100).to(device)


def flattened(docs, device="cpu", flash_kwargs=True) -> dict:
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d} for d in docs])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, ref):
    a, b = grads(ours), grads(ref)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=lambda m: f"gradient of {name}: {m}")


def paths(model) -> set[str]:
    return {m.hierkern_last_path for m in model.modules() if hasattr(m, "hierkern_last_path")}


# -- registration -------------------------------------------------------------------------------------------


def test_registered_in_both_interfaces():
    assert AttentionInterface._global_mapping["hierkern"] is hf.hierkern_attention_forward
    assert AttentionMaskInterface._global_mapping["hierkern"] is hf.hierkern_mask
    assert hf.register() == "hierkern"
    assert hf.register("hierkern-test") == "hierkern-test"
    assert AttentionMaskInterface._global_mapping["hierkern-test"] is hf.hierkern_mask
    with pytest.raises(TypeError, match="name"):
        hf.register("")


def test_import_hierkern_does_not_import_transformers_and_registers_when_it_is_imported():
    code = (
        "import sys, hierkern\n"
        "assert 'transformers' not in sys.modules, 'import hierkern imported transformers'\n"
        "import transformers\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "assert 'hierkern' not in AttentionInterface._global_mapping\n"
        "import importlib\n"
        "importlib.reload(hierkern)      # runs hierkern/__init__.py again, now with transformers imported\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'hierkern' in AttentionInterface._global_mapping\n"
        "assert 'hierkern' in AttentionMaskInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_from_pretrained_loads_with_hierkern(tmp_path):
    ours, sdpa = model_pair(AutoModelForCausalLM, llama_config())
    sdpa.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hierkern")
    assert loaded.config._attn_implementation == "hierkern"
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, sdpa(input_ids=ids).logits, **TOL)
    assert paths(loaded) == {"varlen-position-ids"}


# -- the causal decoder with GQA ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_form", ["flash-kwargs", "position-ids", "padded", "left-padded"])
def test_decoder_matches_sdpa_on_the_padded_batch(device, batch_form):
    ours, sdpa = model_pair(AutoModelForCausalLM, llama_config(), device)
    docs = documents()
    # Left padding shifts positions (Llama counts them from the row start), so its reference is sdpa on the
    # same left-padded batch; the other forms are compared with the right-padded batch.
    ids, mask, labels = padded(docs, device, left=batch_form == "left-padded")
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    valid = mask.bool()

    if batch_form in ("flash-kwargs", "position-ids"):
        out = ours(**flattened(docs, device, flash_kwargs=batch_form == "flash-kwargs"))
        logits = out.logits[0]
        expected_path = "varlen-packed" if batch_form == "flash-kwargs" else "varlen-position-ids"
    else:
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits[valid]
        expected_path = "varlen-unpadded"
    out.loss.backward()
    assert paths(ours) == {expected_path}
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(logits, ref.logits[valid], **TOL)
    assert_same_grads(ours, sdpa)


def test_decoder_without_padding_runs_rows():
    ours, sdpa = model_pair(AutoModelForCausalLM, llama_config())
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    out, ref = ours(input_ids=ids, labels=ids), sdpa(input_ids=ids, labels=ids)
    assert paths(ours) == {"varlen-position-ids"}  # Llama passes position_ids: one sequence per row
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def test_generate_with_cache_and_left_padding_matches_sdpa():
    ours, sdpa = model_pair(AutoModelForCausalLM, llama_config(pad_token_id=0, eos_token_id=None, bos_token_id=None))
    ids, mask, _ = padded(documents(2, (5, 2, 8)), left=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = ours.generate(ids, **kwargs)
    assert paths(ours) == {"varlen-unpadded"}  # decoding steps: one query per row against the cache
    assert torch.equal(out, sdpa.generate(ids, **kwargs))


# -- the bidirectional encoder -------------------------------------------------------------------------------


def masked_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    return ids.masked_fill(~pick.to(ids.device) | (mask == 0), -100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_form", ["flash-kwargs", "padded"])
@pytest.mark.parametrize("config", [bert_config, modernbert_config])
def test_encoder_matches_sdpa_on_the_padded_batch(device, batch_form, config):
    ours, sdpa = model_pair(AutoModelForMaskedLM, config(), device)
    docs = documents(4)
    ids, mask, _ = padded(docs, device)
    labels = masked_labels(ids, mask)
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    valid = mask.bool()
    if batch_form == "flash-kwargs":
        batch = flattened(docs, device)
        batch["labels"] = labels[valid][None]
        out = ours(**batch)
        logits, expected_path = out.logits[0], "varlen-packed"
    else:
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        logits, expected_path = out.logits[valid], "varlen-unpadded"
    out.loss.backward()
    assert paths(ours) == {expected_path}
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(logits, ref.logits[valid], **TOL)
    assert_same_grads(ours, sdpa)


# -- training ------------------------------------------------------------------------------------------------


def test_padding_free_training_reduces_the_loss():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation="hierkern")
    gen = torch.Generator().manual_seed(5)
    # Learnable documents: each repeats a short random motif, so the loss can fall well below log(VOCAB).
    docs = []
    for n in (12, 30, 5, 21, 9, 17, 3, 26):
        motif = torch.randint(0, VOCAB, (3,), generator=gen)
        docs.append(motif.repeat(n // 3 + 1)[:n].tolist())
    batches = [flattened(docs[:4]), flattened(docs[4:])]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(16):
        loss = model(**batches[step % 2]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert paths(model) == {"varlen-packed"}
    assert sum(losses[-2:]) < 0.6 * sum(losses[:2]), losses


# -- what the kernels cannot honour ---------------------------------------------------------------------------


def test_attention_weights_are_refused():
    ours, _ = model_pair(AutoModelForCausalLM, llama_config())
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="output_attentions"):
        ours(input_ids=ids, output_attentions=True)


def direct_call(seed=None, **kwargs):
    """One attention call outside a model: ``(B=1, H=4, L=6, D=8)``, GQA 2 kv heads; seeded inputs."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    q = torch.randn(1, 4, 6, 8, generator=gen)
    kv = torch.randn(1, 2, 6, 8, generator=gen)
    return module, hf.hierkern_attention_forward(
        module, q, kv, kv.clone(), kwargs.pop("attention_mask", None), **kwargs
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(softcap=30.0), "soft-capping"),
        (dict(s_aux=torch.zeros(4)), "sinks"),
        (dict(sinks=torch.zeros(4)), "sinks"),
    ],
)
def test_unsupported_features_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        direct_call(**kwargs)


def test_padding_mask_and_cu_seq_lens_together_are_refused():
    request = hf.hierkern_mask(1, 6, 6, attention_mask=torch.ones(1, 6, dtype=torch.bool))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="both an attention_mask and cu_seq_lens"):
        direct_call(attention_mask=request, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)


def test_cu_seq_lens_on_another_device_is_refused_by_name():
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seq_lens_q is on meta"):
        direct_call(cu_seq_lens_q=cu, max_length_q=4)


@pytest.mark.parametrize("batch_form", ["flash-kwargs", "padded"])
def test_sliding_window_wider_than_every_document_runs_varlen(batch_form):
    ours, sdpa = model_pair(AutoModelForCausalLM, mistral_config(sliding_window=max(LENGTHS)))
    docs = documents(6)
    ids, mask, labels = padded(docs)
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    if batch_form == "flash-kwargs":
        out = ours(**flattened(docs))
        logits = out.logits[0]
    else:
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits[mask.bool()]
    assert paths(ours) == {"varlen-packed" if batch_form == "flash-kwargs" else "varlen-unpadded"}
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(logits, ref.logits[mask.bool()], **TOL)


@pytest.mark.parametrize("batch_form", ["flash-kwargs", "position-ids", "padded", "left-padded"])
def test_causal_sliding_window_narrower_than_documents_runs_varlen(batch_form):
    # Mistral keeps keys less than 3 tokens back; documents run to 13 tokens.
    ours, sdpa = model_pair(AutoModelForCausalLM, mistral_config(sliding_window=3))
    docs = documents(6)
    ids, mask, labels = padded(docs, left=batch_form == "left-padded")
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    valid = mask.bool()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.HierkernFallbackWarning)
        if batch_form in ("flash-kwargs", "position-ids"):
            out = ours(**flattened(docs, flash_kwargs=batch_form == "flash-kwargs"))
            logits = out.logits[0]
            expected_path = "varlen-packed" if batch_form == "flash-kwargs" else "varlen-position-ids"
        else:
            out = ours(input_ids=ids, attention_mask=mask, labels=labels)
            logits = out.logits[valid]
            expected_path = "varlen-unpadded"
        out.loss.backward()
    assert paths(ours) == {expected_path}
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(logits, ref.logits[valid], **TOL)
    assert_same_grads(ours, sdpa)


@pytest.mark.parametrize("batch_form", ["flash-kwargs", "padded", "left-padded", "rows"])
def test_bidirectional_sliding_window_narrower_than_documents_runs_varlen(batch_form):
    # ModernBERT's local layers see 2 tokens on each side; documents run to 13 tokens.
    ours, sdpa = model_pair(AutoModelForMaskedLM, modernbert_config(local_attention=4))
    docs = documents(4)
    if batch_form == "rows":
        # Unpadded rows: sdpa and hierkern both attend over each whole row.
        ids = torch.randint(0, VOCAB, (3, 15), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
    else:
        ids, mask, _ = padded(docs, left=batch_form == "left-padded")
    labels = masked_labels(ids, mask)
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    valid = mask.bool()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.HierkernFallbackWarning)
        if batch_form == "flash-kwargs":
            batch = flattened(docs)
            batch["labels"] = labels[valid][None]
            out = ours(**batch)
            logits, expected_path = out.logits[0], "varlen-packed"
        elif batch_form == "rows":
            out = ours(input_ids=ids, labels=labels)
            logits, expected_path = out.logits[valid], "varlen-rows"
        else:
            out = ours(input_ids=ids, attention_mask=mask, labels=labels)
            logits, expected_path = out.logits[valid], "varlen-unpadded"
        out.loss.backward()
    assert paths(ours) == {expected_path}
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(logits, ref.logits[valid], **TOL)
    assert_same_grads(ours, sdpa)


def test_generate_with_a_sliding_window_and_left_padding_matches_sdpa():
    # Prompts longer than the window; the sliding cache then keeps only the last window - 1 keys.
    ours, sdpa = model_pair(AutoModelForCausalLM, mistral_config(sliding_window=3))
    ids, mask, _ = padded(documents(2, (5, 2, 8)), left=True)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.HierkernFallbackWarning)
        out = ours.generate(ids, **kwargs)
    ref = sdpa.generate(ids, **kwargs)
    # The last step's keys are the cache's last 3 columns, past every row's padding.
    assert paths(ours) == {"varlen-rows"}
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)


@pytest.mark.parametrize(
    "mask_function,window",
    [
        (sliding_window_causal_mask_function(5), (4, 0)),  # kv_idx > q_idx - 5
        (sliding_window_bidirectional_mask_function(5), (5, 5)),  # abs(q_idx - kv_idx) <= 5
        (and_masks(sliding_window_causal_mask_function(5), packed_sequence_mask_function(torch.zeros(1, 6))), (4, 0)),
    ],
)
def test_sliding_window_overlays_become_window_size(mask_function, window):
    request = hf.hierkern_mask(1, 6, 6, mask_function=mask_function)
    assert request.window == window and request.unsupported is None


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_argument_is_read_as_flash_attention_reads_it(causal):
    """No mask built: ``sliding_window=w`` is FlashAttention's ``(w - 1, w - 1)``, right 0 when causal; that is
    transformers' causal overlay of ``w`` and its bidirectional overlay of ``w - 1`` (ModernBERT passes
    ``config.sliding_window + 1``)."""
    w, length = 3, 10
    mask_function = (
        sliding_window_causal_mask_function(w) if causal else sliding_window_bidirectional_mask_function(w - 1)
    )
    idx = torch.arange(length)
    allowed = mask_function(0, 0, idx[:, None], idx[None, :])
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = causal, 2
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, length, 8, generator=gen)
    k, v = torch.randn(2, 1, 2, length, 8, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.HierkernFallbackWarning)
        out, _ = hf.hierkern_attention_forward(module, q, k, v, None, sliding_window=w)
    assert module.hierkern_last_path == "varlen-rows"
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)


def test_sliding_window_over_padding_between_real_tokens_falls_back_to_sdpa_visibly():
    # The window counts the padding columns between real tokens; gathering them would close the gap.
    ours, sdpa = model_pair(AutoModelForCausalLM, mistral_config(sliding_window=3))
    ids, mask, labels = padded(documents(6))
    mask[0, 2:4] = 0
    labels[0, 2:4] = -100
    with pytest.warns(hf.HierkernFallbackWarning, match="padding between the real tokens"):
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert all(p.startswith("sdpa: ") for p in paths(ours))
    ref = sdpa(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)


def test_sliding_window_argument_without_a_mask_is_refused_where_sdpa_would_drop_it():
    with pytest.raises(ValueError, match="sliding_window=3"):
        direct_call(sliding_window=3, position_bias=torch.zeros(1, 4, 6, 6))


def test_dropout_is_applied_in_training_only():
    module, (plain, _) = direct_call(seed=0)
    _, (dropped, _) = direct_call(seed=0, dropout=0.5)
    _, (evaluated, _) = direct_call(seed=0, dropout=0.0)
    assert module.hierkern_last_path == "varlen-rows"
    assert torch.equal(plain, evaluated) and not torch.allclose(plain, dropped)


def test_precomputed_4d_mask_falls_back_to_sdpa():
    ours, sdpa = model_pair(AutoModelForCausalLM, llama_config())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    # A prefix-LM mask (the first 3 tokens see each other): not causal, not bidirectional.
    allowed = torch.ones(6, 6).tril().bool()
    allowed[:3, :3] = True
    mask4d = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with pytest.warns(hf.HierkernFallbackWarning, match="4-D attention mask"):
        out = ours(input_ids=ids, attention_mask=mask4d)
    torch.testing.assert_close(out.logits, sdpa(input_ids=ids, attention_mask=mask4d).logits, **TOL)


def test_unrecognised_mask_function_falls_back():
    def prefix_lm(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < 2)

    request = hf.hierkern_mask(1, 6, 6, mask_function=prefix_lm, attention_mask=None, allow_is_causal_skip=False)
    assert request.causal is None and "not causal or bidirectional" in request.unsupported
    with pytest.warns(hf.HierkernFallbackWarning):
        module, (out, weights) = direct_call(attention_mask=request)
    assert module.hierkern_last_path.startswith("sdpa: ") and weights is None and out.shape == (1, 6, 4, 8)


def test_mask_request_recognises_packed_sequences():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    from transformers.masking_utils import and_masks, packed_sequence_mask_function

    fn = and_masks(causal_mask_function, packed_sequence_mask_function(ids))
    request = hf.hierkern_mask(1, 6, 6, mask_function=fn)
    layout = request.layout(1, 6, 6, None, torch.device("cpu"))
    assert request.causal and layout.cu_q.tolist() == [0, 2, 5, 6] and layout.max_q == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_padding_free_call_does_not_sync_the_device():
    q = torch.randn(1, 4, 29, 64, device="cuda")
    kv = torch.randn(1, 2, 29, 64, device="cuda")
    cu = torch.tensor([0, 5, 14, 17, 29], dtype=torch.int32, device="cuda")
    module = torch.nn.Module()
    module.is_causal = True
    request = hf.hierkern_mask(1, 29, 29, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = hf.hierkern_attention_forward(
            module, q, kv, kv, request, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (1, 29, 4, 64) and module.hierkern_last_path == "varlen-packed"


def test_a_mask_without_padding_runs_rows_without_a_gather():
    ours, sdpa = model_pair(AutoModelForMaskedLM, bert_config())
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    out = ours(input_ids=ids, attention_mask=mask).logits
    assert paths(ours) == {"varlen-rows"}
    torch.testing.assert_close(out, sdpa(input_ids=ids, attention_mask=mask).logits, **TOL)
