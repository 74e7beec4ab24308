"""Raw text -> characters / words / sentences -> packed batches (no padding anywhere).

Tokenisation rules (``split_words``):

* A sentence splits into words on Unicode whitespace (``str.split()``).
* Punctuation: with ``split_punctuation=True`` (the default) a run of punctuation characters (Unicode
  category ``P*``) at the start or end of a whitespace-separated chunk becomes a word of its own, so
  ``'"Hello, world!"'`` -> ``['"', 'Hello', ',', 'world', '!"']``. Punctuation *inside* a chunk stays in
  its word (``don't``, ``e.g``, ``well-known``), since it is part of the spelling. With
  ``split_punctuation=False`` chunks are kept as they are.
* Long words: a word longer than ``max_word_len`` characters keeps its first ``ceil(max_word_len / 2)``
  and its last ``floor(max_word_len / 2)`` characters. Prefixes and suffixes carry most of the morphology
  (``un...able``, ``...ization``), and the limit bounds the longest character segment, so the cost of
  the character stage.
* A sentence with no words (empty or whitespace only) is a ``ValueError``: a sentence segment of length
  zero has no output row to give back.

Characters the vocabulary has not seen map to ``CharVocab.UNK``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import IO

import torch

from .layout import Segments

__all__ = ["CharVocab", "TextBatch", "TextCollator", "collate_fn", "split_words", "DEFAULT_MAX_WORD_LEN"]

DEFAULT_MAX_WORD_LEN = 24


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool) -> None:
    """Write ``path`` through ``write(file)`` so that it holds either its old content or all of the new.

    The data goes to a temporary file in the same directory (``os.replace`` is atomic only within one file
    system), is flushed to disk (so a crash after the rename cannot leave an empty file) and then replaces
    ``path``; the temporary file is removed whatever fails, interrupts included.
    """
    path = os.fspath(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    # "x": never clobbers a file this call did not create, so the cleanup below only removes our own.
    f = open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def split_words(
    sentence: str, *, max_word_len: int = DEFAULT_MAX_WORD_LEN, split_punctuation: bool = True
) -> list[str]:
    """Split one sentence into words by the rules in this module's docstring.

    Args:
        sentence: the raw text of one sentence.
        max_word_len: longest word kept in full; longer words keep their head and tail.
        split_punctuation: split leading/trailing punctuation runs into words of their own.

    Returns:
        The list of words (possibly empty), each ``1..max_word_len`` characters long.
    """
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a str, got {type(sentence).__name__}")
    if isinstance(max_word_len, bool) or not isinstance(max_word_len, int) or max_word_len < 1:
        raise ValueError(f"max_word_len must be a positive int, got {max_word_len!r}")
    words: list[str] = []
    for chunk in sentence.split():
        if split_punctuation:
            start, end = 0, len(chunk)
            while start < end and _is_punct(chunk[start]):
                start += 1
            while end > start and _is_punct(chunk[end - 1]):
                end -= 1
            pieces = [chunk[:start], chunk[start:end], chunk[end:]]
        else:
            pieces = [chunk]
        words.extend(p for p in pieces if p)
    head = (max_word_len + 1) // 2
    tail = max_word_len - head
    return [w if len(w) <= max_word_len else w[:head] + (w[len(w) - tail :] if tail else "") for w in words]


class CharVocab:
    """A character vocabulary with the special ids a padding-free model needs.

    Ids ``0..2`` are special and fixed: ``UNK`` (a character not in the vocabulary), ``MASK`` (a masked
    character, for the masked-character objective) and ``CLS`` (the word-CLS token the encoder prepends
    to each word when it pools with ``"cls"``). There is no padding id: batches are packed.

    Args:
        chars: the ordinary characters, each a one-character string, in id order (ids start at 3).
    """

    UNK, MASK, CLS = 0, 1, 2
    SPECIALS = ("<unk>", "<mask>", "<cls>")

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"chars must be single characters, got {ch!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not contain duplicates")
        self.chars = chars
        self._index = {ch: i + len(self.SPECIALS) for i, ch in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None) -> CharVocab:
        """Build from raw texts: the characters seen at least ``min_count`` times, most frequent first.

        Whitespace is kept (words never contain it, but then ``decode(encode(text)) == text`` for any
        text of known characters). ``max_size`` caps the total size (specials included). Ties break by
        code point so the result does not depend on the input order.
        """
        counts: Counter[str] = Counter()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            counts.update(text)
        ranked = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda ch: (-counts[ch], ord(ch)))
        if max_size is not None:
            if max_size < len(cls.SPECIALS):
                raise ValueError(f"max_size must be at least {len(cls.SPECIALS)}, got {max_size}")
            ranked = ranked[: max_size - len(cls.SPECIALS)]
        return cls(ranked)

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"

    def encode(self, text: str) -> list[int]:
        """Character ids of ``text`` (``UNK`` for unknown characters)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        get = self._index.get
        return [get(ch, self.UNK) for ch in text]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; special ids render as ``<unk>``, ``<mask>``, ``<cls>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self):
                raise ValueError(f"id {i} is out of range for a vocabulary of size {len(self)}")
            out.append(self.SPECIALS[i] if i < len(self.SPECIALS) else self.chars[i - len(self.SPECIALS)])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"format": "hierkern.CharVocab", "version": 1, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        if not isinstance(data, dict) or data.get("format") != "hierkern.CharVocab":
            raise ValueError("data is not a serialised hierkern.CharVocab")
        if data.get("version") != 1:
            raise ValueError(f"unsupported CharVocab version {data.get('version')!r}")
        return cls(data["chars"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically (a failed save leaves the previous file as it was).

        Non-ASCII characters are written as ``\\u`` escapes: every ``str`` character round-trips that
        way, lone surrogates included, which no UTF-8 encoder accepts.
        """
        text = json.dumps(self.to_dict(), ensure_ascii=True)
        _atomic_write(path, lambda f: f.write(text), binary=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharVocab:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


class TextBatch:
    """A mini-batch of sentences, packed twice: characters into words, words into sentences.

    Attributes:
        char_ids: int64 ``(total_chars,)`` character ids, words end to end.
        words: ``Segments`` of characters per word (``num_segments == total_words``).
        sentences: ``Segments`` of words per sentence (``total == total_words``).
    """

    __slots__ = ("char_ids", "words", "sentences")

    def __init__(self, char_ids: torch.Tensor, words: Segments, sentences: Segments):
        if not isinstance(char_ids, torch.Tensor) or char_ids.dtype != torch.int64 or char_ids.dim() != 1:
            raise TypeError("char_ids must be a 1-D int64 tensor")
        if not isinstance(words, Segments) or not isinstance(sentences, Segments):
            raise TypeError("words and sentences must be hierkern.Segments")
        if words.total != char_ids.shape[0]:
            raise ValueError(f"words covers {words.total} characters but char_ids has {char_ids.shape[0]}")
        if sentences.total != words.num_segments:
            raise ValueError(f"sentences covers {sentences.total} words but words has {words.num_segments}")
        if words.device != char_ids.device or sentences.device != char_ids.device:
            raise ValueError("char_ids, words and sentences must be on one device")
        self.char_ids = char_ids
        self.words = words
        self.sentences = sentences

    @classmethod
    def from_sentences(
        cls,
        sentences: Sequence[str],
        vocab: CharVocab,
        *,
        max_word_len: int = DEFAULT_MAX_WORD_LEN,
        split_punctuation: bool = True,
    ) -> TextBatch:
        """Tokenise and pack raw sentences (rules in this module's docstring).

        Args:
            sentences: a non-empty sequence of raw sentences.
            vocab: the character vocabulary.
            max_word_len: longest word kept in full.
            split_punctuation: split leading/trailing punctuation into words of their own.

        Returns:
            A CPU ``TextBatch``.
        """
        if isinstance(sentences, str):
            raise TypeError("sentences must be a sequence of str, not a single str")
        if not isinstance(vocab, CharVocab):
            raise TypeError(f"vocab must be a hierkern.CharVocab, got {type(vocab).__name__}")
        if len(sentences) == 0:
            raise ValueError("sentences must not be empty")
        ids: list[int] = []
        word_lens: list[int] = []
        sent_lens: list[int] = []
        for i, sentence in enumerate(sentences):
            if not isinstance(sentence, str):
                raise TypeError(f"sentences[{i}] must be a str, got {type(sentence).__name__}")
            words = split_words(sentence, max_word_len=max_word_len, split_punctuation=split_punctuation)
            if not words:
                raise ValueError(f"sentences[{i}] has no words ({sentence!r}); remove empty sentences before batching")
            for word in words:
                ids.extend(vocab.encode(word))
                word_lens.append(len(word))
            sent_lens.append(len(words))
        return cls(
            torch.tensor(ids, dtype=torch.int64), Segments.from_lengths(word_lens), Segments.from_lengths(sent_lens)
        )

    @property
    def num_sentences(self) -> int:
        return self.sentences.num_segments

    @property
    def num_words(self) -> int:
        return self.words.num_segments

    @property
    def num_chars(self) -> int:
        return self.words.total

    @property
    def device(self) -> torch.device:
        return self.char_ids.device

    def __len__(self) -> int:
        return self.num_sentences

    def _map(self, fn) -> TextBatch:
        words = Segments(fn(self.words.offsets), self.words.max_len, self.words.total, validate=False)
        sents = Segments(fn(self.sentences.offsets), self.sentences.max_len, self.sentences.total, validate=False)
        return TextBatch(fn(self.char_ids), words, sents)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        """The batch on ``device`` (host-side lengths stay on the host: no sync later)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TextBatch:
        """Page-locked copy, so ``to("cuda", non_blocking=True)`` overlaps; called by
        ``DataLoader(pin_memory=True)``."""
        return self._map(torch.Tensor.pin_memory)

    def is_pinned(self) -> bool:
        return self.char_ids.is_pinned() and self.words.offsets.is_pinned() and self.sentences.offsets.is_pinned()

    def sentence_words(self, vocab: CharVocab) -> list[list[str]]:
        """The words of each sentence, decoded (after truncation and with ``UNK`` shown as ``<unk>``)."""
        ids = self.char_ids.tolist()
        woff = self.words.offsets.tolist()
        soff = self.sentences.offsets.tolist()
        return [
            [vocab.decode(ids[woff[w] : woff[w + 1]]) for w in range(soff[s], soff[s + 1])]
            for s in range(self.num_sentences)
        ]

    def __repr__(self) -> str:
        return (
            f"TextBatch(sentences={self.num_sentences}, words={self.num_words}, chars={self.num_chars}, "
            f"device={self.device})"
        )


class TextCollator:
    """``collate_fn`` for ``torch.utils.data.DataLoader`` over a dataset of raw sentences (picklable, so it
    works with ``num_workers > 0``)."""

    def __init__(self, vocab: CharVocab, *, max_word_len: int = DEFAULT_MAX_WORD_LEN, split_punctuation: bool = True):
        self.vocab = vocab
        self.max_word_len = max_word_len
        self.split_punctuation = split_punctuation

    def __call__(self, sentences: Sequence[str]) -> TextBatch:
        return TextBatch.from_sentences(
            sentences, self.vocab, max_word_len=self.max_word_len, split_punctuation=self.split_punctuation
        )


def collate_fn(
    vocab: CharVocab, *, max_word_len: int = DEFAULT_MAX_WORD_LEN, split_punctuation: bool = True
) -> TextCollator:
    """A ``DataLoader`` ``collate_fn`` turning a list of raw sentences into a ``TextBatch``.

    ``DataLoader(sentences, batch_size=32, collate_fn=hierkern.collate_fn(vocab), pin_memory=True)``.
    """
    return TextCollator(vocab, max_word_len=max_word_len, split_punctuation=split_punctuation)
