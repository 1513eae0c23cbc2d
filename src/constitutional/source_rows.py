"""Rows from a source spec: built-in prompt sets, local files and Hugging Face datasets.

A spec is `builtin` (an asset in `constitutional/assets/`), `hf:<dataset id>[:<split>]`, or a
path: `.jsonl`, `.json` (a list of rows), `.csv` (with a header row) or `.txt` (one prompt per
non-blank line), each optionally gzipped (`.gz`). Each row comes with where it was read
("file:LINE", "file: item N", "hf:... row N") for error messages; `sources.py` makes prompts and
preference pairs of them. Files are read line by line (gzip decompressed as it goes): a capped
load stops early, and no file is ever held whole in memory, except a `.json` list, which is
parsed as one document.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional.errors import UserError

Row = Any  # a dict (or, in .json lists and JSONL, a bare string) as read from the source

FILE_TYPES = (".jsonl", ".json", ".csv", ".txt")


def open_source(spec: str, base_dir: Path, builtin: str | None) -> tuple[str, Iterator[tuple[str, Row]]]:
    """Resolve a spec to (a name for messages, an iterator of ("name:LINE", row))."""
    if spec == "builtin":
        if builtin is None:
            raise UserError("'builtin' is not available for this source: give a path or hf:<dataset id>")
        name = f"constitutional/assets/{builtin}"
        try:
            data = resources.files("constitutional").joinpath("assets", builtin).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{name}: no such built-in prompt set") from None
        return name, _rows_from_bytes(data, name, builtin)
    if spec.startswith("hf:"):
        return spec, _hf_rows(spec, base_dir)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return str(path), _file_rows(path)


def _file_rows(path: Path) -> Iterator[tuple[str, Row]]:
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    _file_type(path)  # reject an unknown extension before reading anything
    return _rows_from_lines(_decoded_lines(_file_lines(path), str(path)), str(path), path.name)


def _file_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (without their newline), read one at a time: a file of any size is never held whole."""
    if not path.name.lower().endswith(".gz"):
        with path.open("rb") as handle:
            yield from (line.removesuffix(b"\n") for line in handle)
        return
    try:
        with gzip.open(path, "rb") as handle:
            for line in handle:
                yield line.removesuffix(b"\n")
    except (OSError, EOFError, zlib.error) as error:  # gzip's own errors, raised as it decompresses
        raise UserError(f"{path}: not a valid gzip file ({error})") from None


def _file_type(path: Path | str) -> str:
    name = Path(path).name.lower().removesuffix(".gz")
    for suffix in FILE_TYPES:
        if name.endswith(suffix):
            return suffix
    expected = ", ".join(FILE_TYPES)
    raise UserError(f"{path}: unknown file type (expected {expected}, optionally gzipped as .gz)")


def _rows_from_bytes(data: bytes, name: str, filename: str) -> Iterator[tuple[str, Row]]:
    return _rows_from_lines(_decoded_lines(data.split(b"\n"), name), name, filename)


def _rows_from_lines(lines: Iterable[tuple[int, str]], name: str, filename: str) -> Iterator[tuple[str, Row]]:
    """Rows of a file's numbered lines; JSONL, CSV and text stream, a .json list is parsed whole."""
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".txt": _txt_rows}
    return readers[_file_type(filename)](lines, name)


def _decoded_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded one at a time so a bad byte is reported by line."""
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = error.object[error.start]
            raise UserError(
                f"{name}:{number}: not valid UTF-8 (byte {byte:#04x} at column {error.start + 1})"
            ) from None
        yield number, line.removeprefix("\ufeff") if number == 1 else line


def _jsonl_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{name}:{number}: invalid JSON: {error.msg} (column {error.colno})") from None
        yield f"{name}:{number}", row


def _json_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    text = "\n".join(line for _, line in lines)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{name}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(rows, list):
        raise UserError(f"{name}: expected a JSON list of rows, got {type(rows).__name__}")
    # A parsed list has no line numbers; name the item (1-based) instead.
    for index, row in enumerate(rows, start=1):
        yield f"{name}: item {index}", row


def _csv_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    # Fed line by line: the reader pulls the next line itself for a quoted field that spans lines.
    reader = csv.DictReader(line + "\n" for _, line in lines)
    try:
        for row in reader:
            # line_num is the reader's physical line: right even for quoted multi-line fields.
            yield f"{name}:{reader.line_num}", {key: value for key, value in row.items() if key is not None}
    except csv.Error as error:
        raise UserError(f"{name}:{reader.line_num}: invalid CSV: {error}") from None


def _txt_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    for number, line in lines:
        if line.strip():
            yield f"{name}:{number}", line.strip()


def _hf_rows(spec: str, base_dir: Path) -> Iterator[tuple[str, Row]]:
    """Rows of `hf:<dataset id>[:<split>]`; a local folder (relative to base_dir) works as the id."""
    dataset_id, _, split = spec.removeprefix("hf:").partition(":")
    if not dataset_id:
        raise UserError(f"{spec}: expected hf:<dataset id> or hf:<dataset id>:<split>")
    local = Path(dataset_id).expanduser()
    local = local if local.is_absolute() else base_dir / local
    source = str(local) if local.exists() else dataset_id
    import datasets  # lazy: only hf: sources need it, and it is slow to import

    try:
        dataset = datasets.load_dataset(source, split=split or "train")
    # What loading can meet that is the input's fault or the network's: the library's own errors,
    # files or hub entries missing, unreachable or refused (OSError: the hub's HTTP errors are
    # OSErrors), an unknown split or a column that does not cast (ValueError). Anything else is a bug.
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{spec}: could not load dataset: {message}") from None
    return ((f"{spec} row {index}", row) for index, row in enumerate(dataset, start=1))
