"""The lean local-shard reader yields exactly what webdataset yields, errors included: the same
documents, then the same exception or end, the same skip counts and warnings, on clean shards
and on shards truncated, corrupted or holding members kiln-data never writes."""

import io
import tarfile
import warnings

import numpy as np
import pytest

from conftest import stdlib_files
from kiln.data import reader
from kiln.data.build import build_shards
from kiln.data.manifest import load_manifest
from kiln.data.tokenizer import ByteTokenizer


def outcome(url, dtype, on_error, expected):
    stats, docs, err = {}, [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # garbage-collection timing, not behaviour
        try:
            for d in reader.read_documents(url, dtype, on_error, stats, expected):
                docs.append(d.tobytes())
        except Exception as e:
            err = (type(e).__name__, str(e))
    return docs, err, stats, [str(w.message) for w in caught]


def member(name, payload=b"", kind=tarfile.REGTYPE, fmt=tarfile.USTAR_FORMAT, **attrs):
    """One member's header and data, without the end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        info = tarfile.TarInfo(name)
        info.size, info.type = len(payload), kind
        for k, v in attrs.items():
            setattr(info, k, v)
        t.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
        end = t.offset
    return buf.getvalue()[:end]


def body_end(data: bytes) -> int:
    """Offset of the end-of-archive block of a plain tar."""
    off = 0
    while data[off:off + 512].count(0) != 512:
        off += 512 + -(-tarfile.nti(data[off + 124:off + 136]) // 512) * 512
    return off


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean") / "d"
    build_shards([str(p) for p in stdlib_files(3)], out, ByteTokenizer(), val_fraction=0.0, shard_tokens=20_000)
    m = load_manifest(out)
    first = m.splits["train"][0]
    return (out / first.file).read_bytes(), first.documents, np.dtype(m.token_dtype)


def variants(data: bytes):
    end = body_end(data)
    body = data[:end]
    yield "clean", data
    yield "empty", b""
    yield "no end block", body
    for cut in list(range(0, len(data), 509)) + [512, 1024, end - 1, end + 1]:
        yield f"cut at {cut}", data[:cut]
    headers = [i for i in range(0, end, 512) if data[i:i + 9].isdigit()]
    for h in headers[:3]:
        for field in (0, 50, 100, 124, 130, 148, 156, 257, 345, 400):
            b = bytearray(data)
            b[h + field] ^= 0x41
            yield f"header {h} byte {field}", bytes(b)
    odd = {
        "directory": member("dir/", kind=tarfile.DIRTYPE),
        "pax header": member("p.tokens.u16", b"ab", fmt=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}),
        "gnu long name": member("n" * 120 + ".tokens.u16", b"abcd", fmt=tarfile.GNU_FORMAT),
        "ustar prefix": member("d" * 80 + "/e.tokens.u16", b"abcd"),
        "metadata": member("__meta__", b"x"),
        "duplicate field": member("000000000.tokens.u16", b"abcd"),
        "no extension": member("README", b"abcd"),
        "odd payload": member("zzz.tokens.u16", b"abc"),
        "upper case": member("Up.TOKENS.U16", b"abcd"),
        "other field": member("zzz.json", b"{}"),
        "two fields": member("k.txt", b"hi") + member("k.tokens.u16", b"abcd"),
        "reserved suffix": member("k.__key__", b"x"),
        "symlink": member("link.tokens.u16", kind=tarfile.SYMTYPE, linkname="x"),
        "empty doc": member("e.tokens.u16", b""),
    }
    for name, extra in odd.items():
        yield f"{name} at the start", extra + data
        yield f"{name} at the end", body + extra + b"\0" * 1024


def test_lean_reader_matches_webdataset(shard, tmp_path, monkeypatch):
    data, docs, dtype = shard
    used_lean = 0
    for i, (what, content) in enumerate(variants(data)):
        path = tmp_path / f"v{i}.tar"
        path.write_bytes(content)
        for on_error in ("raise", "skip"):
            for expected in (None, docs):
                monkeypatch.setattr(reader, "_is_local_file", lambda url: False)
                want = outcome(str(path), dtype, on_error, expected)  # webdataset alone, as before
                monkeypatch.undo()
                got = outcome(str(path), dtype, on_error, expected)
                assert got == want, f"{what} (on_error={on_error}, expected={expected})"
        used_lean += what == "clean"
    assert used_lean


def test_clean_shard_is_read_without_webdataset(shard, tmp_path, monkeypatch):
    """A kiln-data shard never reaches the webdataset fallback."""
    data, docs, dtype = shard
    path = tmp_path / "clean.tar"
    path.write_bytes(data)

    def fail(*a, **k):
        raise AssertionError("fell back to webdataset")

    monkeypatch.setattr("webdataset.tariterators.tarfile_samples", fail)
    assert len(list(reader.read_documents(str(path), dtype, expected=docs))) == docs
