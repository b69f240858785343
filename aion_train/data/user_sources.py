"""A user's corpus as a stream of records: plain text files and folders, JSONL, Parquet, CSV,
and folders saved by Hugging Face `datasets` (``save_to_disk``).

:func:`resolve_sources` turns ``--from PATH...`` into an ordered list of :class:`Source`
(one file, or one HF dataset folder) and checks each up front (it exists, its format is known,
it has the text field), so a bad input is named before any work starts.
:func:`iter_raw` streams one source as raw records, never holding more than one record (or one
Parquet/Arrow batch) in memory; :func:`record_text` turns a raw record into its text (run in
worker processes with ``--workers``).

Formats (``auto`` picks one per file by its name): ``text`` (``.txt .md .rst``, files without a
known extension; ``.gz`` read transparently; a file with NUL bytes in its first 8 KB is skipped
as binary), ``jsonl`` (``.jsonl .ndjson .json``, one JSON object a line), ``csv`` (``.csv``,
``.tsv``), ``parquet`` (``.parquet``); in a folder, ``.json`` files are read as text, ``hf`` (a folder with ``dataset_info.json`` or
``state.json``, or a ``DatasetDict`` folder with ``dataset_dict.json``: every split, in name
order). A text file is one document; a file longer than ``max_doc_chars`` is cut at blank
lines into documents of about that size (bounded memory).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

FORMATS = ("auto", "text", "jsonl", "parquet", "csv", "hf")
_EXT = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
MAX_DOC_CHARS = 1_000_000
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class SourceError(ValueError):
    """An input that cannot be read as asked; the message names it."""


@dataclass(frozen=True)
class Source:
    path: str
    format: str  # text | jsonl | csv | parquet | hf


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _HF_MARKERS)


def _format_of(path: str, walked: bool = False) -> str:
    """The format of a file by its name; in a folder walk a ``.json`` file (often one JSON
    document, not JSONL) is read as text."""
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    return "text" if walked and ext == ".json" else _EXT.get(ext, "text")


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


def resolve_sources(paths: list[str], fmt: str = "auto") -> list[Source]:
    """The ordered, de-duplicated sources of ``paths`` (files, folders walked in name order)."""
    if fmt not in FORMATS:
        raise SourceError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not paths:
        raise SourceError("--from: give at least one file or folder")
    out: list[Source] = []
    seen: set[str] = set()
    for p in paths:
        if not os.path.exists(p):
            raise SourceError(f"--from {p}: no such file or folder")
        if _is_hf_dir(p) or fmt == "hf":
            if not _is_hf_dir(p):
                raise SourceError(
                    f"--from {p}: not a folder written by datasets' save_to_disk ({', '.join(_HF_MARKERS)})"
                )
            files = [(os.path.abspath(p), "hf")]
        elif os.path.isdir(p):
            files = [(os.path.abspath(f), fmt if fmt != "auto" else _format_of(f, walked=True)) for f in _walk(p)]
            if not files:
                raise SourceError(f"--from {p}: the folder holds no files")
        else:
            files = [(os.path.abspath(p), fmt if fmt != "auto" else _format_of(p))]
        for f, kind in files:
            if f not in seen:
                seen.add(f)
                out.append(Source(f, kind))
    return out


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _hf_datasets(path: str):
    from datasets import load_from_disk

    ds = load_from_disk(path)
    if hasattr(ds, "column_names") and isinstance(ds.column_names, list):
        return [("", ds)]
    return [(name, ds[name]) for name in sorted(ds.keys())]


def columns(src: Source) -> list[str] | None:
    """Field names of a record source (None for plain text)."""
    if src.format == "text":
        return None
    if src.format == "jsonl":
        with _open_binary(src.path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise SourceError(f"{src.path}:{n}: not JSON ({e}); is it JSONL?") from e
                    if not isinstance(rec, dict):
                        raise SourceError(f"{src.path}:{n}: a JSONL line must be an object, got {type(rec).__name__}")
                    return list(rec)
        return []
    if src.format == "csv":
        with open(src.path, newline="", encoding="utf-8", errors="replace") as f:
            return next(csv.reader(f, delimiter="\t" if src.path.endswith(".tsv") else ","), [])
    if src.format == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(src.path).schema_arrow.names)
    cols: list[str] = []
    for _, ds in _hf_datasets(src.path):
        cols.extend(c for c in ds.column_names if c not in cols)
    return cols


def check_sources(sources: list[Source], text_field: str) -> None:
    """Every record source has ``text_field`` (read from its schema or first record)."""
    for src in sources:
        cols = columns(src)
        if cols is not None and cols and text_field not in cols:
            raise SourceError(
                f"{src.path}: no field {text_field!r} (its fields: {', '.join(map(str, cols[:12]))}); "
                "pass --text-field NAME"
            )


def fingerprint(src: Source) -> dict:
    """Path, size and sha256 of a source (for an HF folder: of its files)."""
    files = _walk(src.path) if src.format == "hf" else [src.path]
    h, size = hashlib.sha256(), 0
    for f in files:
        with open(f, "rb") as fh:
            while b := fh.read(1 << 20):
                h.update(b)
                size += len(b)
    return {"path": src.path, "format": src.format, "bytes": size, "sha256": h.hexdigest()}


def _text_docs(path: str, max_doc_chars: int) -> Iterator[str]:
    with _open_binary(path) as f:
        head = f.read(8192)
        if b"\0" in head:
            yield b"\0"  # a binary file: one record, counted as "binary"
            return
        stream = io.TextIOWrapper(io.BufferedReader(_Prefixed(head, f)), encoding="utf-8", errors="replace")
        parts: list[str] = []
        size = 0
        for line in stream:
            parts.append(line)
            size += len(line)
            if size >= max_doc_chars and (not line.strip() or size >= 2 * max_doc_chars):
                yield "".join(parts)
                parts, size = [], 0
        if parts:
            yield "".join(parts)


class _Prefixed(io.RawIOBase):
    """A binary stream that first returns `head` (already read), then the rest of `f`."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def iter_raw(src: Source, text_field: str, max_doc_chars: int = MAX_DOC_CHARS) -> Iterator[object]:
    """Raw records of one source, in file order: text documents (str), JSONL lines (bytes), or
    the text field's value (CSV/Parquet/HF rows). Memory: one record or one batch."""
    if src.format == "text":
        yield from _text_docs(src.path, max_doc_chars)
    elif src.format == "jsonl":
        with _open_binary(src.path) as f:
            for line in f:
                if line.strip():
                    yield line
    elif src.format == "csv":
        with open(src.path, newline="", encoding="utf-8", errors="replace") as f:
            csv.field_size_limit(1 << 30)
            yield from (
                r.get(text_field) for r in csv.DictReader(f, delimiter="\t" if src.path.endswith(".tsv") else ",")
            )
    elif src.format == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(src.path).iter_batches(batch_size=1024, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        for _, ds in _hf_datasets(src.path):
            if text_field not in ds.column_names:
                continue
            col = ds.select_columns([text_field])
            for start in range(0, len(col), 1024):
                yield from col[start : start + 1024][text_field]


def record_text(fmt: str, text_field: str, raw: object) -> tuple[str | None, str]:
    """(text, "") of a raw record, or (None, why) for a record without usable text."""
    if fmt == "jsonl":
        try:
            rec = json.loads(raw)
        except ValueError:
            return None, "bad_json"
        raw = rec.get(text_field) if isinstance(rec, dict) else None
        if raw is None:
            return None, "missing_field"
    if raw is None:
        return None, "missing_field"
    if fmt == "text" and isinstance(raw, bytes):
        return None, "binary"
    if not isinstance(raw, str):
        return None, "not_text"
    text = raw.strip()
    return (text, "") if text else (None, "empty")
