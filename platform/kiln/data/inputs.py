"""Reading the corpus: which files an input argument means, and the documents in each file.

An input is a file, a directory (walked recursively, hidden entries left out) or a glob
(`corpus/**/*.txt`, expanded by kiln, so quoting it in the shell is fine). Files are sorted so
the order never depends on the OS or the file system. A file's suffix decides how it is read:

    .jsonl .ndjson   one JSON object a line; the document is its `text_field`
    .parquet         one document a row; the document is its `text_column`
    anything else    UTF-8 text; the whole file is one document (newlines read as "\n")

Bad input (binary or non-UTF-8 files, lines that are not JSON or lack the field, Parquet files
without the column) goes to an `InputPolicy`: it raises a DataError naming the file and line, or
records the problem and skips it.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from kiln.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
PARQUET_BATCH_ROWS = 1024


@dataclass
class Document:
    id: str  # "path", "path:line" (JSONL, 1-based) or "path#row" (Parquet, 0-based): decides the split
    text: str


@dataclass
class InputPolicy:
    """What to do with bad input: "raise" (stop with a DataError) or "skip" (record and go on)."""

    on_error: str = "raise"
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {self.on_error!r}")

    def bad(self, msg: str) -> None:
        if self.on_error == "skip":
            self.skipped.append(msg)
            return
        raise DataError(msg + " (fix or remove it, or pass --on-error skip to skip such input)")


def is_glob(pattern: str) -> bool:
    return glob.has_magic(pattern)


def _walk(directory: Path) -> list[Path]:
    # Hidden entries (.git, .DS_Store, editor swap files) are never corpus text.
    return sorted(
        f for f in directory.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(directory).parts)
    )


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """The files the inputs name, in a stable order: each input's files sorted, inputs in the
    order given. Paths that do not exist and globs that match nothing are errors, never skipped:
    they are almost always typos."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files.extend(_walk(p))
        elif p.is_file():
            files.append(p)
        elif is_glob(raw):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"input pattern {raw!r} matches no files; check the path "
                                f"(use '**' to match in subdirectories, e.g. 'corpus/**/*.txt')")
            for m in matches:
                files.extend(_walk(m) if m.is_dir() else [m])
        else:
            raise DataError(f"input {raw} does not exist; pass text, .jsonl or .parquet files, "
                            f"directories, or glob patterns such as 'corpus/**/*.txt'")
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]  # overlapping inputs: first wins


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _decode_text(data: bytes) -> str | None:
    """The text, or None for bytes that are valid UTF-8 but hold NULs: text never does, binary
    files do. Raises UnicodeDecodeError for bytes that are not UTF-8."""
    text = data.decode("utf-8")
    return None if "\x00" in text else text


def _read_text(path: Path, policy: InputPolicy) -> Iterator[Document]:
    data = path.read_bytes()
    try:
        text = _decode_text(data)
    except UnicodeDecodeError as e:
        policy.bad(f"{path}: not UTF-8 text (invalid byte at offset {e.start}): a binary file, or "
                   f"text in another encoding to convert to UTF-8")
        return
    if text is None:
        policy.bad(f"{path}: a binary file (contains NUL bytes), not text")
        return
    if text:
        # Universal newlines, as Python's text mode reads them: the same document whatever
        # platform wrote the file.
        yield Document(str(path), text.replace("\r\n", "\n").replace("\r", "\n"))


def _read_jsonl(path: Path, text_field: str, policy: InputPolicy,
                progress: Callable[[int], None]) -> Iterator[Document]:
    with open(path, "rb") as fh:  # line by line: JSONL files can be far larger than memory
        for lineno, raw in enumerate(fh, 1):
            progress(len(raw))
            try:
                line = _decode_text(raw)
            except UnicodeDecodeError as e:
                policy.bad(f"{path}:{lineno}: not UTF-8 text (invalid byte at offset {e.start} of the line)")
                continue
            if line is None:
                policy.bad(f"{path}:{lineno}: binary data (NUL bytes), not a JSON line")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                policy.bad(f"{path}:{lineno}: not JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                policy.bad(f"{path}:{lineno}: no string field {text_field!r} (set --text-field)")
                continue
            if obj[text_field]:
                yield Document(f"{path}:{lineno}", obj[text_field])


def _read_parquet(path: Path, text_column: str, policy: InputPolicy,
                  progress: Callable[[int], None]) -> Iterator[Document]:
    import pyarrow as pa  # here: a heavy import, needed only for Parquet inputs
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        policy.bad(f"{path}: not a readable Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if text_column not in names:
        policy.bad(f"{path}: no column {text_column!r} (columns: {', '.join(names) or 'none'}); "
                   f"set --text-column")
        return
    col_type = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        policy.bad(f"{path}: column {text_column!r} holds {col_type}, not strings; set --text-column")
        return
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row, reported = 0, 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_column]):
            for text in batch.column(0).to_pylist():
                if text:  # null and "" are empty documents, passed over like empty files
                    yield Document(f"{path}#{row}", text)
                row += 1
            done = size * row // rows
            progress(done - reported)
            reported = done
    except pa.ArrowException as e:
        policy.bad(f"{path}: Parquet data unreadable at row {row} ({e})")
    progress(size - reported)


def iter_documents(files: Iterable[Path], policy: InputPolicy | None = None, *,
                   text_field: str = "text", text_column: str = "text",
                   progress: Callable[[int], None] | None = None) -> Iterator[Document]:
    """Every document of every file, in order. `progress(n)` is told each n input bytes read."""
    policy = policy or InputPolicy()
    progress = progress or (lambda n: None)
    for f in files:
        kind = file_kind(f)
        try:
            if kind == "jsonl":
                yield from _read_jsonl(f, text_field, policy, progress)
            elif kind == "parquet":
                yield from _read_parquet(f, text_column, policy, progress)
            else:
                yield from _read_text(f, policy)
                progress(f.stat().st_size)
        except OSError as e:  # permissions, a file deleted under us, an I/O error
            policy.bad(f"{f}: cannot be read ({e.strerror or e})")


def total_bytes(files: Iterable[Path]) -> int:
    return sum(f.stat().st_size for f in files)
