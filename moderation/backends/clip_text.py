"""CLIP's byte-pair tokenizer without torch: the same token ids as open_clip's
``SimpleTokenizer`` (tested for equality), as numpy arrays, for backends that run without
torch (ONNX Runtime). Ported from open_clip's ``tokenizer.py``, itself copied from
https://github.com/openai/CLIP (MIT License, Copyright (c) 2021 OpenAI).

The merges file (``bpe_simple_vocab_16e6.txt.gz``) is open_clip's; ``moderation model export``
copies it into the exported folder.
"""

from __future__ import annotations

import gzip
import html
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

__all__ = ["ClipTokenizer"]

CLEANERS = ("lower", "whitespace", "canonicalize")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Each byte → a printable character (the BPE works on those, never on whitespace or
    control characters)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word, word[1:], strict=False)}


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.lower().split()).strip()


class ClipTokenizer:
    """``tokenizer(texts)`` → ndarray of shape (n, context_length), int64: start token, the
    text's byte-pair tokens, end token, zeros after; a text too long is cut and ends with the
    end token, as open_clip does."""

    def __init__(self, bpe_path: Path, context_length: int = 77, clean: str = "lower") -> None:
        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}; known: {', '.join(CLEANERS)}")
        self.byte_encoder = _bytes_to_unicode()
        merges_text = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab += special
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, str] = {t: t for t in special}
        self.pattern = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]
        self.context_length = context_length
        self.clean = clean

    def _cleaned(self, text: str) -> str:
        if self.clean == "canonicalize":
            return _canonicalize(_basic_clean(text))
        cleaned = _whitespace_clean(_basic_clean(text))
        return cleaned.lower() if self.clean == "lower" else cleaned

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        joined = " ".join(word)
        self.cache[token] = joined
        return joined

    def encode(self, text: str) -> list[int]:
        tokens: list[int] = []
        for piece in regex.findall(self.pattern, self._cleaned(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.encoder[t] for t in self._bpe(piece).split(" "))
        return tokens

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            out[row, : len(tokens)] = tokens
        return out
