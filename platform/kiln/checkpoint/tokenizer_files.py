"""The tokenizer of a model kiln exports or samples from: which one a checkpoint was trained with
(`checkpoint_tokenizer`), or a `--tokenizer` option (`tokenizer_from_option`); the files kiln-export
writes for it (`write_tokenizer`) and reading them back (`export_tokenizer`).

    tokenizer.json         for `tokenizers` and `transformers.AutoTokenizer` (for the byte
    tokenizer_config.json  tokenizer: an equivalent byte-level BPE without merges, built here;
                           see BYTE_TOKENIZER_NOTE)
    kiln_tokenizer.json    kiln's own description of that tokenizer (its manifest entry): what
                           kiln-generate uses, exact for every tokenizer type
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from kiln.config.schema import DataConfig
from kiln.data.plan import load_source_tokenizer
from kiln.data.sources import resolve_sources
from kiln.data.tokenizer import DEFAULT_EOS, build_tokenizer, load_tokenizer_file, tokenizer_from_manifest
from kiln.errors import DataError, KilnError

KILN_TOKENIZER_FILE = "kiln_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"

BYTE_TOKENIZER_NOTE = (
    "kiln's byte tokenizer: token i < 256 is the UTF-8 byte i, token 256 is the end of a document. "
    "Hugging Face has no stock tokenizer with these 257 ids (ByT5's byte tokenizer shifts every byte "
    "by 3 special tokens, so its ids do not fit this model). kiln-export therefore also writes "
    "tokenizer.json: a byte-level BPE with no merges, built locally with the `tokenizers` library, "
    "whose ids are exactly these (AutoTokenizer.from_pretrained(export_dir) loads it). Without it: "
    "ids = list(text.encode('utf-8')); text = bytes(i for i in ids if i < 256).decode('utf-8', "
    "errors='replace'). For a subword vocabulary, build the data with `kiln-data --tokenizer bpe`."
)


CHECKPOINT_TOKENIZER_DIR = "tokenizer"  # <checkpoint>/kiln/tokenizer/: write_tokenizer's files


def checkpoint_tokenizer(meta: dict, ckpt: str | os.PathLike | None = None):
    """The tokenizer the run's data was written with: the copy inside the checkpoint (kiln keeps
    one in <ckpt>/kiln/tokenizer/), else, for checkpoints written before it did, the manifest of
    the local dataset directory its config names. A checkpoint is data from elsewhere: kiln never
    runs a `pipe:` command or fetches a URL that one names."""
    if ckpt is not None and (Path(ckpt) / "kiln" / CHECKPOINT_TOKENIZER_DIR / KILN_TOKENIZER_FILE).is_file():
        return export_tokenizer(Path(ckpt) / "kiln" / CHECKPOINT_TOKENIZER_DIR)
    data = meta["config"]["data"]
    named = [data.get("path"), data.get("manifest")] + [v for m in data.get("mixture", [])
                                                        for v in (m.get("path"), m.get("manifest"))]
    remote = [str(v) for v in named if v and (str(v).startswith("pipe:") or "://" in str(v))]
    if remote:
        raise DataError(f"this checkpoint holds no tokenizer of its own and names its data as {remote[0]!r}; "
                        f"kiln never runs a command or fetches a URL that a checkpoint names\n  fix: pass "
                        f"--tokenizer byte|PATH/tokenizer.json (the tokenizer the data was written with)")
    try:
        sources = resolve_sources(DataConfig.from_dict(data))
        return load_source_tokenizer(sources[0], data["cache_dir"])
    except (KilnError, OSError) as e:
        where = data.get("path") or [m.get("path") for m in data.get("mixture", [])]
        raise DataError(f"cannot load the tokenizer of the data this checkpoint was trained on ({where}): "
                        f"{e}\n  fix: restore that dataset directory (its manifest.json, and tokenizer.json "
                        f"unless it is byte-tokenized), or pass --tokenizer byte|PATH/tokenizer.json") from e


def tokenizer_from_option(spec: str):
    """--tokenizer: `byte`, or the path of a tokenizer.json."""
    return build_tokenizer(spec)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer applies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_json(eos_token: str = "<|endoftext|>") -> str:
    """A Hugging Face tokenizer.json with exactly kiln's byte ids: byte-level BPE without merges
    (token i = byte i) plus `eos_token` = 256."""
    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    assert tok.token_to_id(eos_token) == 256
    return tok.to_str(pretty=True)


def write_tokenizer(tokenizer, out: Path, block_size: int) -> dict:
    """tokenizer.json + tokenizer_config.json (for transformers) and kiln_tokenizer.json (for kiln);
    returns kiln's entry."""
    entry = dict(tokenizer.to_manifest())
    if entry["type"] == "byte":
        eos_token = DEFAULT_EOS
        (out / HF_TOKENIZER_FILE).write_text(byte_tokenizer_json(eos_token))
        entry["note"] = BYTE_TOKENIZER_NOTE
    else:
        eos_token = entry["eos_token"]
        (out / HF_TOKENIZER_FILE).write_bytes(tokenizer.file_bytes())
        entry["file"] = HF_TOKENIZER_FILE
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token, "eos_token": eos_token, "unk_token": None, "pad_token": None,
        "model_max_length": block_size, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / KILN_TOKENIZER_FILE).write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def export_tokenizer(path: str | os.PathLike):
    """The tokenizer of an export directory: kiln's own entry when kiln wrote it (exact for every
    type), else a plain tokenizer.json."""
    p = Path(path).expanduser()
    for name in (KILN_TOKENIZER_FILE, HF_TOKENIZER_FILE):
        if not (p / name).is_file():
            continue
        try:
            if name == KILN_TOKENIZER_FILE:
                return tokenizer_from_manifest(json.loads((p / name).read_text()), p)
            return load_tokenizer_file(p / name)
        except KilnError:
            raise
        except Exception as e:  # whatever the file holds (it may come from elsewhere): name it
            raise DataError(f"{p / name} is damaged: it cannot be read as a tokenizer ({type(e).__name__}: "
                            f"{str(e)[:200]}); copy the checkpoint or export again, or pass --tokenizer "
                            f"byte|PATH/tokenizer.json") from None
    raise DataError(f"{p} holds no tokenizer ({KILN_TOKENIZER_FILE} or {HF_TOKENIZER_FILE}); "
                    f"pass --tokenizer byte|PATH/tokenizer.json")
