"""Text pipeline: tokenisation rules, CharVocab, TextBatch packing, DataLoader collation, device moves."""

import os
import pickle

import pytest
import torch
from conftest import requires_cuda
from torch.utils.data import DataLoader

from hierkern import CharVocab, Segments, TextBatch, collate_fn
from hierkern.corpus import default_corpus
from hierkern.text import split_words

SENTENCES = ['"Hello, world!" she said.', "Don't panic: it's well-known...", "a  b\tc"]


def test_split_words_punctuation_rule():
    assert split_words('"Hello, world!"') == ['"', "Hello", ",", "world", '!"']
    # Inner punctuation is part of the spelling; edge runs stay together.
    assert split_words("Don't panic: e.g. well-known...") == ["Don't", "panic", ":", "e.g", ".", "well-known", "..."]
    assert split_words("...") == ["..."]
    assert split_words('"Hello, world!"', split_punctuation=False) == ['"Hello,', 'world!"']
    assert split_words(" a\t b\n") == ["a", "b"]
    assert split_words("   ") == []


def test_split_words_truncation_keeps_head_and_tail():
    word = "antidisestablishmentarianism"  # 28 characters
    assert split_words(word, max_word_len=7) == ["antiism"]  # 4 head + 3 tail
    assert split_words(word, max_word_len=8) == ["antiism"[:4] + "nism"]
    assert split_words(word, max_word_len=1) == ["a"]
    assert split_words(word, max_word_len=28) == [word]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_word_len"):
            split_words(word, max_word_len=bad)
    with pytest.raises(TypeError, match="sentence"):
        split_words(b"bytes")


def test_vocab_encode_decode_save_load(tmp_path):
    vocab = CharVocab.from_texts(SENTENCES)
    assert (CharVocab.UNK, CharVocab.MASK, CharVocab.CLS) == (0, 1, 2)
    assert len(vocab) == 3 + len(set("".join(SENTENCES)))
    text = "Hello, it's known"
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.decode(torch.tensor(vocab.encode(text))) == text
    # Most frequent first, ties by code point: independent of the input order.
    assert CharVocab.from_texts(SENTENCES[::-1]) == vocab
    assert vocab.encode("Z\u00e9") == [CharVocab.UNK, CharVocab.UNK]
    assert vocab.decode([CharVocab.UNK, CharVocab.MASK, CharVocab.CLS]) == "<unk><mask><cls>"
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([len(vocab)])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = CharVocab.load(path)
    assert loaded == vocab and loaded.encode(text) == vocab.encode(text)
    unicode = CharVocab.from_texts(["na\u00efve caf\u00e9 \u4e2d\u6587"])
    unicode.save(path)
    assert CharVocab.load(path).decode(unicode.encode("caf\u00e9")) == "caf\u00e9"
    small = CharVocab.from_texts(["aaab"], max_size=4)
    assert small.chars == ["a"] and small.encode("b") == [CharVocab.UNK]
    assert CharVocab.from_texts(["aaab"], min_count=2).chars == ["a"]
    with pytest.raises(ValueError, match="hierkern.CharVocab"):
        CharVocab.from_dict({"chars": ["a"]})
    with pytest.raises(ValueError, match="duplicates"):
        CharVocab(["a", "a"])


def test_batch_packs_chars_words_sentences():
    vocab = CharVocab.from_texts(SENTENCES)
    batch = TextBatch.from_sentences(SENTENCES, vocab, max_word_len=6)
    words = [split_words(s, max_word_len=6) for s in SENTENCES]
    assert batch.sentence_words(vocab) == words
    flat = [w for ws in words for w in ws]
    assert batch.words.lengths.tolist() == [len(w) for w in flat]
    assert batch.sentences.lengths.tolist() == [len(ws) for ws in words]
    assert batch.char_ids.tolist() == vocab.encode("".join(flat))
    assert batch.char_ids.dtype == torch.int64
    assert batch.words.max_len <= 6
    assert (len(batch), batch.num_words, batch.num_chars) == (3, len(flat), sum(map(len, flat)))


def test_batch_rejects_bad_input():
    vocab = CharVocab.from_texts(SENTENCES)
    for bad in (["fine", ""], ["fine", " \t "]):
        with pytest.raises(ValueError, match=r"sentences\[1\]"):
            TextBatch.from_sentences(bad, vocab)
    with pytest.raises(ValueError, match="must not be empty"):
        TextBatch.from_sentences([], vocab)
    with pytest.raises(TypeError, match="single str"):
        TextBatch.from_sentences("one sentence", vocab)
    with pytest.raises(TypeError, match=r"sentences\[0\]"):
        TextBatch.from_sentences([3], vocab)
    with pytest.raises(TypeError, match="vocab"):
        TextBatch.from_sentences(["x"], {"x": 3})
    with pytest.raises(ValueError, match="words covers"):
        TextBatch(torch.zeros(3, dtype=torch.int64), Segments.from_lengths([2]), Segments.from_lengths([1]))
    with pytest.raises(ValueError, match="sentences covers"):
        TextBatch(torch.zeros(2, dtype=torch.int64), Segments.from_lengths([2]), Segments.from_lengths([2]))


def test_dataloader_collate_fn_and_to():
    corpus = default_corpus(40, seed=3)
    vocab = CharVocab.from_texts(corpus)
    collate = collate_fn(vocab, max_word_len=10)
    pickle.loads(pickle.dumps(collate))  # workers need a picklable collate_fn
    loader = DataLoader(corpus, batch_size=16, collate_fn=collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [16, 16, 8]
    assert batches[0].sentence_words(vocab) == [split_words(s, max_word_len=10) for s in corpus[:16]]
    moved = batches[0].to("cpu")
    assert moved.words.max_len == batches[0].words.max_len
    assert torch.equal(moved.char_ids, batches[0].char_ids)
    meta = batches[0].to("meta")
    assert meta.device.type == "meta" and meta.words.device.type == "meta" and meta.sentences.device.type == "meta"
    assert meta.words.max_len == batches[0].words.max_len and meta.sentences.total == batches[0].num_words


def test_default_corpus_is_deterministic_and_wordy():
    a, b = default_corpus(200, seed=1), default_corpus(200, seed=1)
    assert a == b and a != default_corpus(200, seed=2)
    words = [w for s in a for w in split_words(s)]
    assert all(split_words(s) for s in a)
    assert 3.0 < sum(map(len, words)) / len(words) < 6.0  # English-like word lengths


@requires_cuda
def test_pin_memory_and_cuda_transfer():
    corpus = default_corpus(16)
    vocab = CharVocab.from_texts(corpus)
    loader = DataLoader(corpus, batch_size=8, collate_fn=collate_fn(vocab), pin_memory=True)
    batch = next(iter(loader))
    assert isinstance(batch, TextBatch) and batch.is_pinned()
    cuda = batch.to("cuda", non_blocking=True)
    assert cuda.char_ids.is_cuda and cuda.words.offsets.is_cuda and cuda.sentences.offsets.is_cuda
    assert torch.equal(cuda.char_ids.cpu(), batch.char_ids)


def test_vocab_save_round_trips_any_character(tmp_path):
    path = tmp_path / "vocab.json"
    vocab = CharVocab(["a", "\ud800", "\u00e9", "\U0001f600"])  # a lone surrogate cannot be UTF-8 encoded
    vocab.save(path)
    assert CharVocab.load(path) == vocab and os.listdir(tmp_path) == ["vocab.json"]


def test_vocab_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "vocab.json"
    CharVocab(["a"]).save(path)
    before = path.read_bytes()
    broken = CharVocab(["b"])
    # A value json cannot write, after some it can: a non-atomic save would leave a truncated file.
    monkeypatch.setattr(broken, "to_dict", lambda: {"format": "hierkern.CharVocab", "chars": ["b", object()]})
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["vocab.json"]
