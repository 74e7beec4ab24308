"""Embedded, deterministic benchmark workloads: segment layouts of real-looking nested text, and stress cases.

Nothing is downloaded. English text is synthesised from two distributions:

* word lengths (characters per word, token-weighted: every occurrence of "the" counts) from the table in
  ``ENGLISH_WORD_LENGTH_PERCENT``;
* sentence lengths (words per sentence) from a log-normal with mean 15 words, clipped to
  ``[1, MAX_SENTENCE_WORDS]``. Sentence lengths of written English are close to log-normal (Williams, 1940,
  "A note on the statistical analysis of sentence-length as a criterion of literary style", Biometrika
  31:356-361); sigma = 0.7 gives the long tail (about 1% of sentences above 60 words).

A workload fixes only the layout (segment lengths) and the attention shape; ``make_qkv`` draws the tensors
from a seeded generator, so every run of every machine times the same problem.

Sizes count words of text (``SIZES``); a stress workload has about as many tokens as the English chars level
of the same size, so rows of a report are comparable, except ``long-among-tiny``: four times its long
segment, so that a quarter of its tokens sit in the long segment.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from ..layout import Segments

__all__ = [
    "ENGLISH_WORD_LENGTH_PERCENT",
    "MAX_SENTENCE_WORDS",
    "SIZES",
    "SENTENCE_LENGTH_MEAN",
    "Workload",
    "english_text",
    "make_qkv",
    "workloads",
    "SEED_MODEL_WORDS",
    "SEED_MODEL_VOCAB",
    "seed_model_batch",
]

# Token-weighted English word lengths, percent of word occurrences for lengths 1..20, from P. Norvig,
# "English Letter Frequency Counts: Mayzner Revisited" (2013, norvig.com/mayzner.html; 743 billion word
# occurrences of the Google Books Ngram corpus). The published column sums to ~99% (longer words omitted);
# sampling normalises it. Mean of this table: ~4.7 characters. Printed English text averages ~4.5-4.8
# characters per word depending on the corpus; this is the largest published count. The values were entered
# from that page and cross-checked against its cumulative shares as quoted elsewhere (words of at most 4, 5
# and 6 letters: ~56%, ~67% and ~75% of occurrences; this table gives 55.9%, 66.6% and 75.0%).
ENGLISH_WORD_LENGTH_PERCENT: dict[int, float] = {
    1: 2.998,
    2: 17.651,
    3: 20.511,
    4: 14.787,
    5: 10.629,
    6: 8.401,
    7: 7.987,
    8: 6.050,
    9: 4.151,
    10: 2.799,
    11: 1.536,
    12: 0.829,
    13: 0.445,
    14: 0.166,
    15: 0.058,
    16: 0.028,
    17: 0.012,
    18: 0.005,
    19: 0.002,
    20: 0.001,
}

SENTENCE_LENGTH_MEAN = 15.0
_SENTENCE_SIGMA = 0.7
MAX_SENTENCE_WORDS = 130

# Words of synthetic text per size, per device type. "default" on the CPU is issue 4's target (~4k words).
SIZES: dict[str, dict[str, int]] = {
    "small": {"cpu": 512, "cuda": 4096},
    "default": {"cpu": 4096, "cuda": 65536},
    "large": {"cpu": 16384, "cuda": 262144},  # cuda: ~1.2M characters
}

# Words per seed-model batch: a training batch of the character-level model (~68 sentences at the default
# size), not the attention core's 4k words. The padded PyTorch twin's training step costs seconds per round on
# a 2-core CPU at this size already; the batch scales with the size flag like the other workloads.
SEED_MODEL_WORDS: dict[str, dict[str, int]] = {
    "small": {"cpu": 256, "cuda": 4096},
    "default": {"cpu": 1024, "cuda": 32768},
    "large": {"cpu": 4096, "cuda": 131072},
}
# Character ids of the seed model: the size of a CharVocab built from English text (letters of both cases,
# digits, punctuation and the three special ids).
SEED_MODEL_VOCAB = 100

# The GPU target shape (issue 8): 2**20 characters of English words, H=8, D=64, bfloat16.
TARGET_CHARS = 1 << 20

# Tile-boundary lengths of the stress workloads (1 and tiles 16/32/64 and one past each).
_UNIFORM_LENGTHS = (1, 5, 16, 17, 32, 33, 64, 65)


@dataclass(frozen=True)
class Workload:
    """One attention problem: self-attention within each segment of a packed batch.

    Attributes:
        name: short id, used in benchmark group names (``"chars-in-words"``, ``"uniform-17"``, ...).
        lengths: per-segment token counts (zeros allowed).
        num_heads: ``H``.
        head_dim: ``D`` (``embed_dim = H * D``).
        description: one line for reports.
        dtypes: the dtypes (names, ``"bfloat16"``) to benchmark it in; ``None``: every dtype of the device.
    """

    name: str
    # Left out of repr: pytest-benchmark writes each parameter's repr into the JSON, for every entry.
    lengths: tuple[int, ...] = field(repr=False)
    num_heads: int = 8
    head_dim: int = 32
    description: str = ""
    dtypes: tuple[str, ...] | None = None  # benchmark only these dtypes (``"bfloat16"``, ...); None: all

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @property
    def mean_len(self) -> float:
        """Mean segment length over all segments (empty ones included)."""
        return self.total / self.num_segments if self.lengths else 0.0

    @property
    def padded_tokens(self) -> int:
        """Tokens of the padded ``(S, max_len)`` batch the torch baselines see."""
        return self.num_segments * self.max_len

    def attention_pairs(self) -> int:
        """Useful (query, key) pairs: sum of squared lengths. Padded attention does ``S * max_len**2``."""
        return sum(n * n for n in self.lengths)

    def segments(self, device: torch.device | str = "cpu") -> Segments:
        return Segments.from_lengths(list(self.lengths), device=device)


def english_text(num_words: int, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Synthetic English text layout: characters per word and words per sentence.

    Args:
        num_words: words to generate; the last sentence is cut so the text has exactly this many.
        seed: generator seed (the same seed gives the same text on every machine and Python version).

    Returns:
        ``(word_lengths, sentence_lengths)``: ``len(word_lengths) == sum(sentence_lengths) == num_words``.
    """
    if isinstance(num_words, bool) or not isinstance(num_words, int) or num_words < 1:
        raise ValueError(f"num_words must be a positive int, got {num_words!r}")
    rng = random.Random(seed)
    sizes, weights = zip(*ENGLISH_WORD_LENGTH_PERCENT.items())
    words = tuple(rng.choices(sizes, weights=weights, k=num_words))
    mu = math.log(SENTENCE_LENGTH_MEAN) - _SENTENCE_SIGMA**2 / 2  # so that the mean is 15 words
    sentences = []
    remaining = num_words
    while remaining > 0:
        n = min(MAX_SENTENCE_WORDS, max(1, round(rng.lognormvariate(mu, _SENTENCE_SIGMA))))
        n = min(n, remaining)
        sentences.append(n)
        remaining -= n
    return words, tuple(sentences)


def _stress(name: str, target_tokens: int, seed: int, long_len: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    if name == "long-among-tiny":
        tiny, total = [], long_len
        while total < target_tokens:
            tiny.append(rng.randint(1, 8))
            total += tiny[-1]
        half = len(tiny) // 2
        return tuple(tiny[:half]) + (long_len,) + tuple(tiny[half:])
    if name == "zero-length":
        # Word-like lengths with a quarter of the segments empty, including a run of empties at the start.
        sizes, weights = zip(*ENGLISH_WORD_LENGTH_PERCENT.items())
        lengths, total = [0, 0, 0], 0
        while total < target_tokens:
            lengths.append(0 if rng.random() < 0.25 else rng.choices(sizes, weights=weights)[0])
            total += lengths[-1]
        return tuple(lengths) + (0,)
    length = int(name.split("-")[1])
    return (length,) * max(1, round(target_tokens / length))


def workloads(
    size: str = "default", device_type: str = "cpu", *, num_heads: int = 8, head_dim: int = 32, seed: int = 0
) -> list[Workload]:
    """The benchmark workloads for one size and device type.

    Args:
        size: ``"small"``, ``"default"`` or ``"large"`` (see ``SIZES``).
        device_type: ``"cpu"`` or ``"cuda"``; the GPU sizes are larger.
        num_heads, head_dim: attention shape (default ``E = 256``, ``H = 8``).
        seed: layout seed.

    Returns:
        ``chars-in-words`` (English characters within words), ``words-in-sentences`` (the same text's words
        within sentences), then the stress layouts ``uniform-<L>``, ``long-among-tiny`` and ``zero-length``;
        on CUDA (default and large sizes) also ``chars-1M-d64``, the GPU target shape (2^20 characters,
        H=8, D=64, bfloat16 only).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if device_type not in SIZES[size]:
        raise ValueError(f"device_type must be one of {sorted(SIZES[size])}, got {device_type!r}")
    num_words = SIZES[size][device_type]
    words, sentences = english_text(num_words, seed)
    shape = dict(num_heads=num_heads, head_dim=head_dim)
    out = [
        Workload(
            "chars-in-words",
            words,
            description=f"{num_words} English words, characters attend within their word",
            **shape,
        ),
        Workload(
            "words-in-sentences",
            sentences,
            description=f"the same {num_words} words, words attend within their sentence",
            **shape,
        ),
    ]
    target = sum(words)
    long_len = min(4096, max(64, 1 << (num_words.bit_length() - 3)))  # 1024 at 4096 words
    for length in _UNIFORM_LENGTHS:
        name = f"uniform-{length}"
        out.append(
            Workload(
                name,
                _stress(name, target, seed, long_len),
                description=f"every segment {length} tokens (tile boundaries)",
                **shape,
            )
        )
    out.append(
        Workload(
            "long-among-tiny",
            _stress("long-among-tiny", 4 * long_len, seed, long_len),
            description=f"one {long_len}-token segment among segments of 1-8 tokens",
            **shape,
        )
    )
    out.append(
        Workload(
            "zero-length",
            _stress("zero-length", target, seed, long_len),
            description="word-like lengths, a quarter of the segments empty",
            **shape,
        )
    )
    if device_type == "cuda" and size != "small":
        out.append(
            Workload(
                "chars-1M-d64",
                _english_chars(TARGET_CHARS, seed),
                num_heads=8,
                head_dim=64,
                dtypes=("bfloat16",),
                description="the GPU target: 2^20 characters of English words, H=8, D=64, bfloat16",
            )
        )
    return out


def _english_chars(total: int, seed: int) -> tuple[int, ...]:
    """English word lengths summing to exactly ``total`` characters (the last word cut to fit)."""
    words, _ = english_text(int(total / 4) + 1000, seed)  # mean ~4.7 characters: enough words
    out, filled = [], 0
    for n in words:
        if filled + n >= total:
            out.append(total - filled)
            break
        out.append(n)
        filled += n
    return tuple(out)


def make_qkv(
    workload: Workload, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded packed ``q, k, v``, each ``(total, num_heads, head_dim)`` in ``dtype`` on ``device``.

    Drawn in float32 on the CPU and then converted, so every device and dtype sees the same values (up to
    rounding).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (workload.total, workload.num_heads, workload.head_dim)
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))


def seed_model_batch(
    size: str = "default", device_type: str = "cpu", seed: int = 0, device: torch.device | str | None = None
):
    """A ``hierkern.TextBatch`` of synthetic English for the seed-model benchmark.

    The layout is ``english_text(SEED_MODEL_WORDS[size][device_type], seed)`` (word lengths of English, mean
    ~15 words per sentence); the character ids are drawn uniformly from the non-special ids of a
    ``SEED_MODEL_VOCAB``-sized vocabulary (attention cost depends on the layout, not on the ids).

    Args:
        size, device_type: pick the batch size (``SEED_MODEL_WORDS``).
        seed: layout and id seed.
        device: where the batch lives (default: the CPU).
    """
    from ..text import CharVocab, TextBatch

    if size not in SEED_MODEL_WORDS:
        raise ValueError(f"size must be one of {sorted(SEED_MODEL_WORDS)}, got {size!r}")
    if device_type not in SEED_MODEL_WORDS[size]:
        raise ValueError(f"device_type must be one of {sorted(SEED_MODEL_WORDS[size])}, got {device_type!r}")
    words, sentences = english_text(SEED_MODEL_WORDS[size][device_type], seed)
    gen = torch.Generator().manual_seed(seed)
    first = CharVocab.CLS + 1
    ids = torch.randint(first, SEED_MODEL_VOCAB, (sum(words),), generator=gen)
    device = "cpu" if device is None else device
    return TextBatch(
        ids.to(device),
        Segments.from_lengths(list(words), device=device),
        Segments.from_lengths(list(sentences), device=device),
    )
