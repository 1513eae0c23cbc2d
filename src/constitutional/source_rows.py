"""Rows from a source spec: built-in prompt sets, local files and Hugging Face datasets.

A spec is `builtin` (an asset in `constitutional/assets/`), a Hugging Face dataset (below), or a
path: `.jsonl`, `.json` (a list of rows), `.csv` (with a header row) or `.txt` (one prompt per
non-blank line), each optionally gzipped (`.gz`). Each row comes with where it was read
("file:LINE", "file: item N", "hf:... row N") for error messages; `sources.py` makes prompts and
preference pairs of them. Files are read line by line (gzip decompressed as it goes): a capped
load stops early, and no file is ever held whole in memory, except a `.json` list, which is
parsed as one document.

A Hugging Face dataset is `hf:<dataset id>[:<split>][?<option>=<value>&...]`, loaded with
`datasets.load_dataset(id, name=..., data_dir=..., split=..., revision=...)`. The options:

- `name`: the config name (for datasets that define several configs);
- `data_dir`: the folder inside the repository to read (HH-RLHF keeps `harmless-base`,
  `helpful-base`, ... as folders of one repository);
- `split`: the split, default `train` (also written `hf:<id>:<split>`; not both); slices such as
  `train[:1000]` are passed on as they are;
- `revision`: a commit, tag or branch of the repository (ignored for a local folder).

For example `hf:Anthropic/hh-rlhf?data_dir=harmless-base&split=test&revision=<commit>`. A local
folder (relative to the config's folder) works as the id too. A malformed spec, an unknown option,
config name or split is a one-line `UserError` that starts with the spec.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional.errors import UserError

Row = Any  # a dict (or, in .json lists and JSONL, a bare string) as read from the source

FILE_TYPES = (".jsonl", ".json", ".csv", ".txt")

HF_OPTIONS = ("name", "data_dir", "split", "revision")
HF_SYNTAX = "hf:<dataset id>[:<split>][?name=<config>&data_dir=<folder>&split=<split>&revision=<commit>]"

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class HfSpec:
    """A parsed `hf:` spec: what `datasets.load_dataset` is given (see the module docstring)."""

    dataset_id: str
    name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None


def parse_hf_spec(spec: str) -> HfSpec:
    """Parse `hf:<dataset id>[:<split>][?name=..&data_dir=..&split=..&revision=..]`.

    Args:
        spec: the source spec, starting with "hf:".

    Returns:
        The dataset id (as written: a local folder is resolved when loading) and its options.

    Raises:
        UserError: no dataset id, an option without a value, an unknown or repeated option, or the
            split given both as `:<split>` and as `split=`.
    """
    base, question, query = spec.removeprefix("hf:").partition("?")
    dataset_id, _, split = base.partition(":")
    if not dataset_id:
        raise UserError(f"{spec}: expected {HF_SYNTAX}")
    options: dict[str, str] = {}
    if question:
        for item in query.split("&"):
            if not item:
                raise UserError(f"{spec}: empty option: write <option>=<value> after '?', joined by '&' ({HF_SYNTAX})")
            key, equals, value = item.partition("=")
            if key not in HF_OPTIONS:
                known = ", ".join(HF_OPTIONS)
                raise UserError(f"{spec}: unknown option {key!r} (expected {known}; syntax {HF_SYNTAX})")
            if not (equals and value):
                raise UserError(f"{spec}: option {key!r} needs a value ({key}=<value>; syntax {HF_SYNTAX})")
            if key in options:
                raise UserError(f"{spec}: option {key!r} given twice")
            options[key] = value
    if split and "split" in options:
        raise UserError(f"{spec}: the split is given twice (as ':{split}' and as 'split='): give one")
    if split:
        options["split"] = split
    return HfSpec(dataset_id, **options)


def _hf_rows(spec: str, base_dir: Path) -> Iterator[tuple[str, Row]]:
    """Rows of an `hf:` spec; a local folder (relative to base_dir) works as the id."""
    parsed = parse_hf_spec(spec)
    local = Path(parsed.dataset_id).expanduser()
    local = local if local.is_absolute() else base_dir / local
    source = str(local) if local.exists() else parsed.dataset_id
    if parsed.revision is not None and local.exists():
        log.warning("%s: revision %r is ignored: %s is a local folder", spec, parsed.revision, local)
    import datasets  # lazy: only hf: sources need it, and it is slow to import

    try:
        dataset = datasets.load_dataset(
            source, name=parsed.name, data_dir=parsed.data_dir, split=parsed.split, revision=parsed.revision
        )
    # What loading can meet that is the input's fault or the network's: the library's own errors,
    # files or hub entries missing, unreachable or refused (OSError: the hub's HTTP errors are
    # OSErrors), an unknown config, an unknown split or a column that does not cast (ValueError).
    # Anything else is a bug.
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        raise UserError(f"{spec}: could not load dataset: {_load_problem(error)}") from None
    return ((f"{spec} row {index}", row) for index, row in enumerate(dataset, start=1))


def _load_problem(error: Exception) -> str:
    """`datasets`' error in one line; an unknown config or split says what the dataset has."""
    message = " ".join(str(error).split()) or type(error).__name__
    hint = "pick one with ?name=<config>"
    if match := re.search(r"BuilderConfig '(.*?)' not found\. Available: (\[.*?\])", message):
        return f"unknown config name {match[1]!r} (available: {_names(match[2])}; {hint})"
    if match := re.search(r"Config name is missing\..*?available configs: (\[.*?\])", message):
        return f"the dataset has several configs and no name was given (available: {_names(match[1])}; {hint})"
    if match := re.search(r'Unknown split "(.*?)"\. Should be one of (\[.*?\])', message):
        return f"unknown split {match[1]!r} (available: {_names(match[2])})"
    return message


def _names(listed: str) -> str:
    """A list as `datasets` prints it ("['a', 'b']") as "a, b"; the text itself if it is not one."""
    try:
        names = ast.literal_eval(listed)
    except (ValueError, SyntaxError):
        return listed
    return ", ".join(str(name) for name in names) if isinstance(names, list) else listed
