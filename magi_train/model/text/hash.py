"""A tiny deterministic text encoder that stands in for T5 during synthetic training.

The synthetic dataset needs caption embeddings that (a) carry the caption's meaning well enough for a
model to learn text conditioning, and (b) cost nothing: no weights to download, no GPU. Each word is
mapped to a fixed pseudo-random unit vector, and a small sinusoidal position code is added so that
"red moves left" and "left moves red" are different inputs.

With `bigrams=True` (text.encoder=hash_bigram, --text-encoder hash_bigram:DIM) each word's row also holds the
vector of the word pair it ends, so a word carries its left neighbour as T5's contextual rows do. Why one
might want it: "left" is a heading in "moves left on the right" and a place in "moves right on the left"; the
DiT reads each caption row through one linear map (cross-attention has no text-side mixing), and the two
unigram "left" rows differ only by the faint position code (cosine > 0.95). Measured, it did not help the
demo model: experiment=demo at 6,000 steps on 320 clips scored colour / direction / switch 25.0 / 9.4 / 0.0%
with hash_bigram against 75.0 / 18.8 / 12.5% with hash (one run each, 16 held-out cases), so `make demo`
keeps hash.

Word vectors are seeded from `zlib.crc32`, never from Python's `hash()`: `hash(str)` is salted per
process (PYTHONHASHSEED), which would give every data-loader worker and every rank a different
"vocabulary".
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import torch

_WORD_SPLIT = re.compile(r"[^a-z0-9]+")

# The position code is kept small next to the unit-norm word vectors (its norm is about this value),
# so a word stays recognisable at any position while order still changes the embedding.
_POSITION_CODE_NORM = 0.2


def tokenize(text: str) -> list[str]:
    """Lower-case `text` and split it into words on every run of non-alphanumeric characters."""
    return [word for word in _WORD_SPLIT.split(text.lower()) if word]


class HashTextEncoder:
    """Bag of hashed word vectors plus a sinusoidal position code, shaped like a T5 encoder output.

    `encode` returns `(embeddings, mask)`: embeddings `(n, max_length, dim)` float32 and mask
    `(n, max_length)` bool. Row `j` of a text holds its `j`-th word; rows past the last word are zeros
    with mask False, and words past `max_length` are dropped.
    """

    def __init__(self, dim: int, max_length: int, seed: int = 0, bigrams: bool = False) -> None:
        if dim < 1:
            raise ValueError(f"HashTextEncoder dim ({dim}) must be >= 1")
        if max_length < 1:
            raise ValueError(f"HashTextEncoder max_length ({max_length}) must be >= 1")
        self.dim = dim
        self.max_length = max_length
        self.bigrams = bigrams
        # Two's-complement mask so negative seeds also work (numpy seeds must be non-negative).
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        self._position_code = self._make_position_code(max_length, dim)  # float64, read-only use

    @staticmethod
    def _make_position_code(length: int, dim: int) -> np.ndarray:
        """Transformer-style sin/cos code, (length, dim), scaled to a norm of about _POSITION_CODE_NORM."""
        positions = np.arange(length, dtype=np.float64)[:, None]
        pair = np.arange(dim, dtype=np.float64)[None, :] // 2
        angle = positions / np.power(10000.0, 2.0 * pair / dim)
        code = np.where(np.arange(dim)[None, :] % 2 == 0, np.sin(angle), np.cos(angle))
        # Each entry has mean square ~1/2, so the row norm is ~sqrt(dim / 2) before scaling.
        return code * (_POSITION_CODE_NORM / math.sqrt(max(dim / 2.0, 1.0)))

    def word_vector(self, word: str) -> np.ndarray:
        """The fixed unit vector (float64, shape (dim,)) of one already-tokenised word."""
        word_seed = zlib.crc32(word.encode("utf-8"))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, word_seed]))
        vector = rng.standard_normal(self.dim)
        return vector / np.linalg.norm(vector)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Words of each text; a count above `max_length` means `encode` keeps only the first `max_length`."""
        return [len(tokenize(text)) for text in texts]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed each text; see the class docstring for the layout."""
        embeddings = np.zeros((len(texts), self.max_length, self.dim), dtype=np.float64)
        mask = np.zeros((len(texts), self.max_length), dtype=bool)
        for row, text in enumerate(texts):
            words = tokenize(text)[: self.max_length]
            for position, word in enumerate(words):
                vector = self.word_vector(word)
                if self.bigrams:
                    # A pair key has a space, which no word has: pair and word vectors never collide. The
                    # 1/sqrt(2) keeps the row's norm ~1, so the position code weighs what it does unigram.
                    pair = (words[position - 1] if position else "") + " " + word
                    vector = (vector + self.word_vector(pair)) / math.sqrt(2.0)
                embeddings[row, position] = vector + self._position_code[position]
            mask[row, : len(words)] = True
        # Summing in float64 and casting once keeps the result independent of summation order details.
        return torch.from_numpy(embeddings.astype(np.float32)), torch.from_numpy(mask)
