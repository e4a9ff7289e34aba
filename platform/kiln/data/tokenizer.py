"""Tokenizers that need no download. The manifest beside the shards names the tokenizer (and a
`tokenizer.json` beside them holds it when it is not `byte`), so training, evaluation and
generation always use the one the data was written with.

Every tokenizer offers `vocab_size`, `eos_id`, `encode(str) -> np.ndarray`, `encode_batch`,
`decode(ids) -> str`, `to_manifest() -> dict` and `file_bytes()` (what to save beside the shards,
or None). Load one back with `load_tokenizer(manifest)` or `tokenizer_from_manifest(entry, root)`.

    byte  UTF-8 bytes 0..255 plus end-of-document 256; nothing to save.
    bpe   byte-level BPE trained here on the corpus (`train_bpe`) with the Hugging Face
          `tokenizers` library; deterministic: the same corpus gives the same vocabulary.
    hf    any Hugging Face `tokenizer.json` given by path (`load_tokenizer_file`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
# A manifest's tokenizer file is a plain name beside the manifest: it is joined to local paths and,
# for pipe: sources, pasted into a shell command, so a manifest from elsewhere must not name more.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def tokenizer_file(entry: dict) -> str:
    """The file name a manifest's `tokenizer` entry gives (tokenizer.json when it gives none)."""
    name = entry.get("file", TOKENIZER_FILE)
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise DataError(f"the manifest's tokenizer file {name!r} is not a plain file name (letters, digits, "
                        f"'.', '_', '-'; no path, no shell characters); kiln-data writes {TOKENIZER_FILE}: "
                        f"rebuild the dataset, or correct the manifest's tokenizer.file")
    return name
DEFAULT_EOS = "<|endoftext|>"
# End-of-document tokens of common tokenizer families, tried in this order when none is named.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256 between documents."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_manifest(self) -> dict:
        return {"type": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def file_bytes(self) -> bytes | None:
        return None  # the manifest entry alone describes it


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer held as its tokenizer.json text.

    Documents are encoded without the tokenizer's own special-token templates (no BOS/EOS added:
    the streaming side puts `eos_id` between documents) and with special-token *text* inside a
    document encoded as ordinary text, so a file that mentions "<|endoftext|>" cannot end a
    document early.
    """

    def __init__(self, json_text: str, *, kind: str, eos_token: str | None = None, source: str = ""):
        self.name, self._json, self._source = kind, json_text, source or TOKENIZER_FILE
        try:
            self._tok = Tokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"{self._source} is not a Hugging Face tokenizer.json ({e})") from e
        self._tok.encode_special_tokens = True
        self.eos_token = eos_token or self._find_eos()
        eos_id = self._tok.token_to_id(self.eos_token)
        if eos_id is None:
            raise DataError(f"{self._source} has no token {self.eos_token!r}; pass --eos-token with "
                            f"a token from its vocabulary that ends a document")
        self.eos_id = int(eos_id)
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def _find_eos(self) -> str:
        for tok in EOS_CANDIDATES:
            if self._tok.token_to_id(tok) is not None:
                return tok
        raise DataError(f"{self._source} has none of the usual end-of-document tokens "
                        f"({', '.join(EOS_CANDIDATES)}); pass --eos-token with the one it uses")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def file_bytes(self) -> bytes:
        return self._json.encode("utf-8")

    def to_manifest(self) -> dict:
        return {"type": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "file": TOKENIZER_FILE,
                "sha256": hashlib.sha256(self.file_bytes()).hexdigest()}

    # Sent to tokenizing worker processes as its JSON text, rebuilt there.
    def __getstate__(self) -> dict:
        return {"json_text": self._json, "kind": self.name, "eos_token": self.eos_token,
                "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS,
              min_frequency: int = 2, show_progress: bool = False) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style: every byte is in the base alphabet, so any text encodes and
    decodes back exactly) with `eos_token` as its only special token, id 0."""
    if vocab_size < 258:
        raise DataError(f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs 256 "
                        f"byte tokens, the end-of-document token and at least one merge (>= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok.to_str(), kind="bpe", eos_token=eos_token, source="trained BPE")


def load_tokenizer_file(path: str | os.PathLike, eos_token: str | None = None) -> HFTokenizer:
    """A Hugging Face tokenizer.json by path; its end-of-document token is `eos_token` or the
    first of EOS_CANDIDATES it has."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist; pass --tokenizer byte, bpe, or the "
                        f"path of a Hugging Face tokenizer.json")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{p} cannot be read as a tokenizer.json ({e})") from e
    return HFTokenizer(text, kind="hf", eos_token=eos_token, source=str(p))


TOKENIZERS = {"byte": ByteTokenizer}  # the tokenizers built from a name alone


def build_tokenizer(name: str, eos_token: str | None = None):
    """`byte`, or a path to a tokenizer.json. (`bpe` needs a corpus: see `train_bpe`.)"""
    if name in TOKENIZERS:
        return TOKENIZERS[name]()
    if name == "bpe":
        raise ValueError("a bpe tokenizer is trained on the corpus: use train_bpe(texts, vocab_size)")
    if name.endswith(".json") or os.sep in name or Path(name).is_file():
        return load_tokenizer_file(name, eos_token)
    raise DataError(f"unknown tokenizer {name!r}; choose byte, bpe, or the path of a Hugging Face "
                    f"tokenizer.json")


def tokenizer_from_manifest(entry: dict, root: str | os.PathLike | None = None):
    """The tokenizer a manifest's `tokenizer` entry describes. `root` is the dataset directory:
    needed for every type but `byte`, whose tokenizer.json lies there."""
    kind = entry.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("bpe", "hf"):
        raise DataError(f"unknown tokenizer type {kind!r} in manifest; known: byte, bpe, hf")
    if root is None:
        raise DataError(f"the dataset's {kind} tokenizer is stored beside its shards: load it with "
                        f"load_tokenizer(manifest) or tokenizer_from_manifest(entry, root=manifest.root)")
    path = Path(root) / tokenizer_file(entry)
    if not path.is_file():
        raise DataError(f"{path} is missing: the dataset's tokenizer must stay beside its shards; "
                        f"restore it or rebuild the dataset with kiln-data")
    data = path.read_bytes()
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path} changed since the shards were written (sha256 differs from the "
                        f"manifest); restore it or rebuild the dataset with kiln-data")
    tok = HFTokenizer(data.decode("utf-8"), kind=kind, eos_token=entry.get("eos_token"), source=str(path))
    if (tok.vocab_size, tok.eos_id) != (entry.get("vocab_size"), entry.get("eos_id")):
        raise DataError(f"{path} does not match the manifest (vocab_size {tok.vocab_size} vs "
                        f"{entry.get('vocab_size')}, eos_id {tok.eos_id} vs {entry.get('eos_id')}); "
                        f"rebuild the dataset with kiln-data")
    return tok


def load_tokenizer(manifest):
    """The tokenizer a loaded Manifest's shards were written with."""
    return tokenizer_from_manifest(manifest.tokenizer, manifest.root)
