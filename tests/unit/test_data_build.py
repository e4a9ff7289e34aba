"""kiln-data, the shard-preparation side: every test reads back what was written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kiln.data.build as build_mod
from conftest import stdlib_files
from kiln.cli.data import main
from kiln.data.build import ShardSize, build_dataset, parse_shard_size
from kiln.data.manifest import Manifest, ShardInfo, load_manifest
from kiln.data.stream import read_documents
from kiln.data.tokenizer import (ByteTokenizer, load_tokenizer, load_tokenizer_file, tokenizer_from_manifest,
                                 train_bpe)
from kiln.errors import DataError


def shard_docs(m: Manifest, split: str = "train") -> list[list[np.ndarray]]:
    """The documents of each shard of a split, as written on disk."""
    dtype = np.dtype(m.token_dtype)
    return [list(read_documents(url, dtype)) for url in m.urls(split)]


def all_docs(m: Manifest, split: str = "train") -> list[np.ndarray]:
    return [d for shard in shard_docs(m, split) for d in shard]


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def small_stdlib(n: int, max_bytes: int = 40_000) -> list[Path]:
    """Real text nobody here wrote, without the few huge modules (so shard sizes can be checked)."""
    return [p for p in stdlib_files(n) if 0 < p.stat().st_size <= max_bytes]


@pytest.fixture(scope="module")
def bpe():
    texts = [p.read_text() for p in stdlib_files(30)]
    return train_bpe(texts, vocab_size=1000)


# ------------------------------------------------------------------------ shard-size syntax

@pytest.mark.parametrize("text,expected", [
    ("500000", ShardSize(500_000, "tokens")),
    ("500k", ShardSize(500_000, "tokens")),
    ("2M", ShardSize(2_000_000, "tokens")),
    ("2Mtok", ShardSize(2_000_000, "tokens")),
    ("1.5mtokens", ShardSize(1_500_000, "tokens")),
    ("64MB", ShardSize(64_000_000, "bytes")),
    ("512KB", ShardSize(512_000, "bytes")),
    ("64MiB", ShardSize(64 * 2**20, "bytes")),
    ("1gib", ShardSize(2**30, "bytes")),
    ("4096B", ShardSize(4096, "bytes")),
])
def test_shard_size_syntax(text, expected):
    assert parse_shard_size(text) == expected
    assert parse_shard_size(str(expected)) == expected  # the manifest's spelling reads back


@pytest.mark.parametrize("text", ["", "0", "64XB", "MB", "-5M", "2 M B", "64iB", "0.0001k"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_shard_size(text)


def test_cli_refuses_bad_shard_size(capsys):
    with pytest.raises(SystemExit) as e:
        main(["x", "--out", "y", "--shard-size", "64XB"])
    assert e.value.code == 2 and "is not a size" in capsys.readouterr().err


# ------------------------------------------------------------------------ determinism

@pytest.mark.timeout(90)
def test_workers_do_not_change_a_single_byte(tmp_path, monkeypatch):
    """BPE trained by the CLI and tokenized by 1 or 3 processes: identical shards, manifest and
    tokenizer.json. Small batches so that every worker gets several."""
    monkeypatch.setattr(build_mod, "BATCH_DOCS", 3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in stdlib_files(24):
        (corpus / p.name).write_bytes(p.read_bytes())
    common = [str(corpus / "*.py"), "--tokenizer", "bpe", "--vocab-size", "800", "--shard-size", "30k",
              "--val-fraction", "0.1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "w3"), "--workers", "3"]) == 0
    one, three = dir_bytes(tmp_path / "w1"), dir_bytes(tmp_path / "w3")
    assert sorted(one) == sorted(three)
    assert {"manifest.json", "tokenizer.json", "train-000000.tar", "train-000001.tar",
            "val-000000.tar"} <= set(one)
    assert [n for n in one if one[n] != three[n]] == []
    m = load_manifest(tmp_path / "w3")
    assert m.tokenizer["type"] == "bpe" and m.tokenizer["vocab_size"] == 800
    assert m.documents("train") + m.documents("val") == sum(1 for p in corpus.iterdir() if p.read_text())


# ------------------------------------------------------------------------ tokenizers

@pytest.mark.timeout(60)
def test_bpe_round_trip_on_stdlib_text(tmp_path, bpe):
    files = stdlib_files(30)
    texts = [t for t in (p.read_text() for p in files) if t]
    r = build_dataset([str(p) for p in files], tmp_path / "out", bpe, val_fraction=0.0, shuffle=False,
                      shard_size="20k", workers=2)
    m = load_manifest(tmp_path / "out")
    assert m.fingerprint == r.manifest.fingerprint
    tok = load_tokenizer(m)  # the saved tokenizer.json, not the object we built with
    docs = all_docs(m)
    assert [tok.decode(d) for d in docs] == texts
    assert [d.tolist() for d in docs] == [bpe.encode(t).tolist() for t in texts]
    n_tokens, n_bytes = sum(len(d) for d in docs), sum(len(t.encode()) for t in texts)
    assert n_tokens < 0.6 * n_bytes, "a trained BPE must compress source text well below 1 token a byte"
    assert max(int(d.max()) for d in docs) < tok.vocab_size
    assert not any((d == tok.eos_id).any() for d in docs), "eos is never inside a document"
    assert len(m.urls("train")) > 1


def test_bpe_training_is_deterministic_and_keeps_special_text_as_text(bpe):
    again = train_bpe([p.read_text() for p in stdlib_files(30)], vocab_size=1000)
    assert again.file_bytes() == bpe.file_bytes()
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eos_id not in ids.tolist() and bpe.decode(ids) == "a <|endoftext|> b"
    assert bpe.to_manifest()["eos_token"] == "<|endoftext|>"


@pytest.mark.timeout(60)
def test_hugging_face_tokenizer_json_by_path(tmp_path, bpe, capsys):
    given = tmp_path / "my-tokenizer.json"
    given.write_bytes(bpe.file_bytes())
    files = [str(p) for p in stdlib_files(8)]
    out = tmp_path / "out"
    assert main([*files, "--out", str(out), "--tokenizer", str(given), "--val-fraction", "0", "--no-shuffle",
                 "--workers", "2"]) == 0
    m = load_manifest(out)
    assert m.tokenizer == {"type": "hf", "vocab_size": bpe.vocab_size, "eos_id": bpe.eos_id,
                           "eos_token": "<|endoftext|>", "file": "tokenizer.json",
                           "sha256": bpe.to_manifest()["sha256"]}
    assert (out / "tokenizer.json").read_bytes() == given.read_bytes()
    tok = tokenizer_from_manifest(m.tokenizer, root=m.root)
    assert [tok.decode(d) for d in all_docs(m)] == [t for t in (Path(f).read_text() for f in files) if t]
    with pytest.raises(DataError, match="load_tokenizer"):
        tokenizer_from_manifest(m.tokenizer)  # the file lives beside the shards: root is needed
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace('"b"', '"B"', 1))
    with pytest.raises(DataError, match="changed since the shards were written"):
        load_tokenizer(m)


def test_tokenizer_json_without_a_known_eos_needs_eos_token(tmp_path, bpe, capsys):
    raw = json.loads(bpe.file_bytes())
    raw["added_tokens"][0]["content"] = "<|doc_end|>"
    vocab = raw["model"]["vocab"]
    vocab["<|doc_end|>"] = vocab.pop("<|endoftext|>")
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(raw))
    (tmp_path / "a.txt").write_text("some text")
    assert main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "o1"), "--tokenizer", str(path)]) == 2
    err = capsys.readouterr().err
    assert "odd.json has none of the usual end-of-document tokens" in err and "--eos-token" in err
    assert main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "o2"), "--tokenizer", str(path),
                 "--eos-token", "<|doc_end|>"]) == 0
    assert load_manifest(tmp_path / "o2").tokenizer["eos_token"] == "<|doc_end|>"
    with pytest.raises(DataError, match="has no token '<nope>'"):
        load_tokenizer_file(path, eos_token="<nope>")


def test_byte_manifest_entry_still_loads_without_root():
    tok = tokenizer_from_manifest({"type": "byte", "vocab_size": 257, "eos_id": 256})
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"


# ------------------------------------------------------------------------ inputs

@pytest.mark.timeout(60)
def test_parquet_input(tmp_path):
    texts = ["first row ✓", None, "", "third\nrow", "fourth"] * 3
    table = pa.table({"id": list(range(len(texts))), "body": texts})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=4)  # several row groups
    out = tmp_path / "out"
    assert main([str(tmp_path / "rows.parquet"), "--out", str(out), "--text-column", "body", "--no-shuffle",
                 "--val-fraction", "0", "--workers", "2"]) == 0
    m = load_manifest(out)
    assert [ByteTokenizer().decode(d) for d in all_docs(m)] == [t for t in texts if t]
    assert m.build["text_column"] == "body"


def test_glob_input_is_expanded_sorted_and_recursive(tmp_path):
    root = tmp_path / "corpus"
    for rel, text in [("b.txt", "B"), ("a.txt", "A"), ("sub/c.txt", "C"), ("sub/deep/d.txt", "D"),
                      ("notes.md", "not matched"), (".hidden/e.txt", "hidden")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    m = build_dataset([str(root / "**" / "*.txt")], tmp_path / "g", ByteTokenizer(), val_fraction=0,
                      shuffle=False).manifest
    assert [ByteTokenizer().decode(d) for d in all_docs(m)] == ["A", "B", "C", "D"]
    # A directory input takes every file, hidden ones left out, in sorted path order.
    m = build_dataset([str(root)], tmp_path / "d", ByteTokenizer(), val_fraction=0, shuffle=False).manifest
    assert [ByteTokenizer().decode(d) for d in all_docs(m)] == ["A", "B", "not matched", "C", "D"]


# ------------------------------------------------------------------------ shard sizes

@pytest.mark.timeout(60)
def test_shard_size_in_tokens_and_in_bytes(tmp_path):
    files = [str(p) for p in small_stdlib(60)]
    # Tokens: a shard closes as soon as it holds the target, so it exceeds it by less than its
    # last document.
    m = build_dataset(files, tmp_path / "tok", ByteTokenizer(), val_fraction=0, shard_size="50k").manifest
    per_shard = shard_docs(m)
    assert len(per_shard) >= 3
    for info, docs in zip(m.splits["train"][:-1], per_shard[:-1]):
        assert info.tokens == sum(len(d) for d in docs)
        assert 50_000 <= info.tokens < 50_000 + len(docs[-1])
    # Bytes: a shard never grows past the target, and is not closed much before it (documents
    # here are at most 80 KB of uint16 tokens).
    m = build_dataset(files, tmp_path / "bytes", ByteTokenizer(), val_fraction=0, shard_size="200KB").manifest
    sizes = [s.bytes for s in m.splits["train"]]
    assert len(sizes) >= 3
    assert all((tmp_path / "bytes" / s.file).stat().st_size == s.bytes for s in m.splits["train"])
    assert max(sizes) <= 200_000
    assert min(sizes[:-1]) >= 200_000 - 2 * 40_000 - 11_000
    assert m.build["shard_size"] == "200000B"
    # Both describe the same documents, in the same order.
    assert [d.tolist() for d in all_docs(m)] == [d.tolist() for shard in per_shard for d in shard]


def test_shard_tokens_alias_still_works(tmp_path):
    files = [str(p) for p in small_stdlib(10)]
    a = build_dataset(files, tmp_path / "a", ByteTokenizer(), val_fraction=0, shard_tokens=30_000).manifest
    assert main([*files, "--out", str(tmp_path / "b"), "--shard-tokens", "30000", "--val-fraction", "0"]) == 0
    assert a.fingerprint == load_manifest(tmp_path / "b").fingerprint


# ------------------------------------------------------------------------ bad input

BAD_INPUT = {
    # case: (file name, bytes, the message naming it)
    "binary": ("blob.txt", b"PK\x03\x04\x00\x00binary", "blob.txt: a binary file"),
    "not_utf8": ("latin.txt", "café au lait".encode("latin-1"), "latin.txt: not UTF-8 text"),
    "jsonl_not_json": ("docs.jsonl", b'{"text": "fine"}\nnot json\n', "docs.jsonl:2: not JSON"),
    "jsonl_no_field": ("docs.jsonl", b'{"text": "fine"}\n\n{"body": "x"}\n',
                       "docs.jsonl:3: no string field 'text'"),
}


def _write_bad(tmp_path: Path, case: str) -> tuple[Path, str, int]:
    """An input directory with one good file and one bad input; returns it, the message and the
    number of good documents."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text("good text")
    if case == "parquet_no_column":
        pq.write_table(pa.table({"body": ["x", "y"]}), d / "rows.parquet")
        return d, "rows.parquet: no column 'text' (columns: body)", 1
    name, data, msg = BAD_INPUT[case]
    (d / name).write_bytes(data)
    return d, msg, 2 if name.endswith(".jsonl") else 1


@pytest.mark.parametrize("case", [*BAD_INPUT, "parquet_no_column"])
def test_bad_input_stops_or_is_skipped(tmp_path, capsys, case):
    d, msg, good_docs = _write_bad(tmp_path, case)
    out = tmp_path / "raise"
    assert main([str(d), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert msg in err and "--on-error skip" in err and "Traceback" not in err
    assert not list(out.iterdir()), "a failed build leaves nothing behind"

    assert main([str(d), "--out", str(tmp_path / "skip"), "--on-error", "skip", "--val-fraction", "0",
                 "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "skipped 1 bad input(s):" in summary and msg in summary
    m = load_manifest(tmp_path / "skip")
    assert m.documents("train") == good_docs and m.build["skipped_inputs"] == 1


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_empty_input_is_an_error_under_both_policies(tmp_path, capsys, policy):
    (tmp_path / "nothing").mkdir()
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o1"), "--on-error", policy]) == 2
    assert "no input files" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n\n')
    assert main([str(tmp_path / "blank"), "--out", str(tmp_path / "o2"), "--on-error", policy]) == 2
    assert "hold no documents (all empty)" in capsys.readouterr().err
    assert main([str(tmp_path / "blank" / "*.parquet"), "--out", str(tmp_path / "o3"), "--on-error", policy]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_everything_skipped_is_an_error_naming_the_first(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.bin").write_bytes(b"\xff\xfe\xfd")
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--on-error", "skip"]) == 2
    err = capsys.readouterr().err
    assert "1 skipped as bad input, first:" in err and "x.bin: not UTF-8" in err


@pytest.mark.timeout(60)
def test_console_script_exits_2_without_traceback(tmp_path):
    d, msg, _ = _write_bad(tmp_path, "jsonl_not_json")
    proc = subprocess.run([Path(sys.executable).parent / "kiln-data", str(d), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert msg in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------ fingerprint

@pytest.mark.timeout(60)
def test_fingerprint_names_the_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in small_stdlib(12):
        (corpus / p.name).write_bytes(p.read_bytes())
    kw = dict(val_fraction=0.2, shard_size="30k")
    a = build_dataset([str(corpus)], tmp_path / "a", ByteTokenizer(), **kw).manifest
    b = build_dataset([str(corpus)], tmp_path / "b", ByteTokenizer(), workers=2, **kw).manifest
    assert a.fingerprint == b.fingerprint == load_manifest(tmp_path / "a").fingerprint
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["fingerprint"] == a.fingerprint
    # One changed byte in one input changes one shard, and so the fingerprint.
    victim = sorted(corpus.iterdir())[-1]
    victim.write_text(victim.read_text() + "#")
    c = build_dataset([str(corpus)], tmp_path / "c", ByteTokenizer(), **kw).manifest
    changed = [x.file for s in ("train", "val") for x, y in zip(a.splits[s], c.splits[s]) if x.sha256 != y.sha256]
    assert len(changed) == 1 and c.fingerprint != a.fingerprint
    # Every shard's checksum and the tokenizer are part of it.
    for split in ("train", "val"):
        for i, s in enumerate(a.splits[split]):
            edited = {k: list(v) for k, v in a.splits.items()}
            edited[split][i] = ShardInfo(s.file, s.documents, s.tokens, s.bytes, "0" * 64)
            assert Manifest(a.root, a.tokenizer, a.token_dtype, edited).fingerprint != a.fingerprint
    assert Manifest(a.root, {**a.tokenizer, "eos_id": 0}, a.token_dtype, a.splits).fingerprint != a.fingerprint


def test_manifest_without_fingerprint_loads_and_edited_one_is_refused(tmp_path):
    m = build_dataset([str(p) for p in small_stdlib(4)], tmp_path / "d", ByteTokenizer(), val_fraction=0).manifest
    path = tmp_path / "d" / "manifest.json"
    raw = json.loads(path.read_text())
    old = {k: v for k, v in raw.items() if k not in ("fingerprint", "build")}  # kiln-shards/1 as first written
    path.write_text(json.dumps(old))
    assert load_manifest(tmp_path / "d").fingerprint == m.fingerprint
    raw["splits"]["train"][0]["sha256"] = "f" * 64
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="fingerprint does not match"):
        load_manifest(tmp_path / "d")


# ------------------------------------------------------------------------ progress and summary

def test_progress_bar_and_closing_summary(tmp_path, capsys):
    files = [str(p) for p in small_stdlib(10)]
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    assert main([*files, str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o"), "--progress",
                 "--on-error", "skip", "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "tokenizing" in cap.err and "100%" in cap.err
    m = load_manifest(tmp_path / "o")
    total_docs = m.documents("train") + m.documents("val")
    total_tokens = m.tokens("train") + m.tokens("val")
    assert f"total: {total_docs:,} documents, {total_tokens:,} tokens, " in cap.out
    assert "tokens/s" in cap.out and "1 worker(s)" in cap.out
    assert "skipped 1 bad input(s):" in cap.out and "bad.txt: not UTF-8" in cap.out
    assert f"fingerprint {m.fingerprint}" in cap.out


# ------------------------------------------------------------------------ default corpus

@pytest.mark.timeout(120)
def test_default_corpus_stays_byte_level(tmp_path):
    from kiln.data.default_corpus import ensure_default_dataset

    m = load_manifest(ensure_default_dataset(str(tmp_path), log=lambda *a: None))
    assert m.tokenizer == {"type": "byte", "vocab_size": 257, "eos_id": 256}
    assert m.token_dtype == "uint16" and not (m.root / "tokenizer.json").exists()
    assert len(m.splits["train"]) > 4 and m.splits["val"]
