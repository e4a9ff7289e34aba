"""Tokenizers that need no download. The manifest beside the shards names the tokenizer, so
training, evaluation and generation always use the one the data was written with."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256 between documents."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_manifest(self) -> dict:
        return {"type": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


TOKENIZERS = {"byte": ByteTokenizer}


def tokenizer_from_manifest(entry: dict):
    kind = entry.get("type")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer type {kind!r} in manifest; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind]()


def build_tokenizer(name: str):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()
