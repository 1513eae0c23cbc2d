"""Bad-input campaign: property-based (hypothesis) inputs for every loader of user files.

The property, for each loader: it returns a result, or raises `UserError` with one non-empty line
that names the file by its path (for config values: the key, as a `section.key` path of the
document, whose removal changes the refusal). Any other exception is a bug: hypothesis shrinks it
to a minimal input. Every malformed input also goes through `cai run` (the config itself, or a
config naming the bad file): exit 2, one line on stderr, the loader's own message, and nothing
written (no run directory; for preference files, a run whose feedback is done and that `cai run
--stages pm` leaves unchanged, so that only the preference loader can be what refuses).

`CAI_FUZZ_EXAMPLES` sets the examples per loader (default 60: seconds in `make test`); the
figures in docs/reliability.md come from `CAI_FUZZ_EXAMPLES=1000`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constitutional.cli import main
from constitutional.config import Config, config_from_dict, load_config
from constitutional.constitution import load_constitution
from constitutional.errors import UserError
from constitutional.evaluation.questions import load_mc_eval
from constitutional.records import read_ai_labels
from constitutional.rundir import RunDir
from constitutional.sources import load_preference_pairs, load_prompts

from conftest import tiny_config_data

EXAMPLES = int(os.environ.get("CAI_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# Values a YAML or JSON file can hold, nested a little.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
garbage = st.binary(max_size=200)  # not UTF-8, not YAML, not JSON, half a gzip stream...
OUTCOMES: Counter = Counter()  # (loader, "accepted" | "one-line error") over the campaign


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    """Print what the campaign tried (pytest -s shows it): the figures of docs/reliability.md."""
    yield
    print("\nbad-input campaign:", json.dumps({f"{loader}: {outcome}": n for (loader, outcome), n in OUTCOMES.items()}))


def assert_one_line(message: str) -> None:
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


def names_file(message: str, *paths: Path) -> bool:
    """The message names one of `paths` in full (a bare `:` or a file's base name is not a name)."""
    return any(str(path) and str(path) in message for path in paths)


def check_loader(loader: str, call, *paths: Path) -> str | None:
    """`call()` returns, or raises a one-line UserError naming one of `paths`; the message if it raised."""
    try:
        call()
    except UserError as error:
        message = str(error)
        assert_one_line(message)
        assert names_file(message, *paths), (message, [str(path) for path in paths])
        OUTCOMES[loader, "one-line error naming the file"] += 1
        return message
    OUTCOMES[loader, "accepted"] += 1
    return None


def cai_run(*args: str) -> tuple[int, str]:
    """`cai run ARGS` in this process: (exit status, what it wrote to stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["run", *args])
    return status, stderr.getvalue()


def assert_cai_refused(status: int, stderr: str, message: str) -> None:
    """Exit 2 and exactly one line on stderr: `cai: error: ` and the loader's own message."""
    assert status == 2, (status, stderr[-2000:])
    assert stderr == f"cai: error: {message}\n", (stderr[-2000:], message)


SCRATCH: list[Path] = []  # this module's scratch root, under pytest's basetemp (pytest cleans it up)


@pytest.fixture(scope="module", autouse=True)
def _scratch_root(tmp_path_factory):
    SCRATCH.append(tmp_path_factory.mktemp("fuzz"))
    yield
    SCRATCH.clear()


def scratch_folder(prefix: str = "cai-fuzz-") -> Path:
    """A fresh folder for one fuzzed example (hypothesis calls a test many times; tmp_path is one per test)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH[0]))


def scratch_file(name: str, content: bytes) -> Path:
    folder = scratch_folder()
    path = folder / name
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------------------- config


def _section_fields() -> dict[str, list[str]]:
    """Every config section and its keys, from the dataclasses: the fuzzer aims at real keys."""
    hints = typing.get_type_hints(Config)
    sections = {}
    for field in dataclasses.fields(Config):
        kind = hints.get(field.name)
        if dataclasses.is_dataclass(kind):
            sections[field.name] = [inner.name for inner in dataclasses.fields(kind)]
        else:
            sections[field.name] = []
    return sections


SECTIONS = _section_fields()


def misspelt(draw, size: int) -> list[str]:
    """One time in five, a name that is (most likely) no key at all."""
    return [draw(st.text(max_size=size))] if draw(st.integers(0, 4)) == 0 else []


@st.composite
def config_documents(draw):
    """A mapping of real sections to real keys with arbitrary values; now and then a misspelt section or key,
    a section that is not a mapping, or a document that is not a mapping at all.

    Misspellings are kept rare: the first unknown key is refused before any value is looked at, so
    the values of real keys (types, ranges, the checks across keys) are reached only without one.
    """
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    document = {}
    names = draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)) + misspelt(draw, 8)
    for name in names:
        keys = SECTIONS.get(name) or []
        if keys and draw(st.integers(0, 4)) > 0:
            chosen = draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)) + misspelt(draw, 6)
            document[name] = {key: draw(values) for key in chosen}
        else:
            document[name] = draw(values)
    return document


def key_paths(document: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a document's mappings, at any depth: ("critique",), ("critique", "rounds"), ..."""
    paths = []
    if isinstance(document, dict):
        for key, value in document.items():
            path = (*prefix, str(key))
            paths += [path, *key_paths(value, path)]
    return paths


def names_key(message: str, key: str) -> bool:
    """The message names config key `key` ("critique.rounds"): quoted, or as a whole dotted path.

    A key without a dot (a section) must start the message ("critique: expected a mapping") or be
    quoted; an empty key must be quoted.
    """
    if repr(key) in message or f'"{key}"' in message:
        return True
    if not key.strip():
        return False
    end = r"(?=$|[\s'\"),:\[])"
    if "." not in key:
        return re.match(re.escape(key) + end, message) is not None
    return re.search(r"(?:^|(?<=[\s'\"(,]))" + re.escape(key) + end, message) is not None


def without(document: dict, path: tuple[str, ...]) -> dict:
    """A copy of `document` without the entry at `path`."""
    document = copy.deepcopy(document)
    node = document
    for part in path[:-1]:
        node = next(value for key, value in node.items() if str(key) == part)
    for key in [key for key in node if str(key) == path[-1]]:
        del node[key]
    return document


def check_config_refusal(message: str, path: Path, document: object) -> str:
    """One line naming the config file, or a key of `document` whose removal changes the refusal.

    Returns:
        What the message names: "file" or "key".
    """
    assert_one_line(message)
    if names_file(message, path):
        return "file"
    named = [key for key in key_paths(document) if names_key(message, ".".join(key))]
    assert named, f"{message!r} names neither {path} nor a key of {document!r}"
    for key in named:  # the key named is the one at fault: without it the config loads or is refused otherwise
        try:
            config_from_dict(without(document, key), str(path.parent))
        except UserError as error:
            if str(error) == message:
                continue
        return "key"
    raise AssertionError(f"{message!r} names {named}, but the same refusal comes without them")


def check_config(loader: str, path: Path) -> None:
    """`load_config(path)` returns, or refuses naming the file or the key; a refused config also through `cai run`."""
    try:
        load_config(path)
    except UserError as error:
        message = str(error)
    else:
        OUTCOMES[loader, "accepted"] += 1
        return
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        document = None
    named = check_config_refusal(message, path, document)
    run_dir = path.parent / "run"
    assert_cai_refused(*cai_run(str(path), "--run-dir", str(run_dir)), message)
    assert not run_dir.exists()
    OUTCOMES[loader, f"one-line error naming the {named}, cai run exit 2 with it, nothing written"] += 1


@FUZZ
@given(document=config_documents())
def test_config_loader(document):
    check_config("config", scratch_file("config.yaml", yaml.safe_dump(document, allow_unicode=True).encode()))


@FUZZ
@given(content=garbage | st.text(max_size=200).map(str.encode))
def test_config_loader_on_garbage(content):
    check_config("config (raw bytes)", scratch_file("config.yaml", content))


# ----------------------------------------------------------------------------- constitution

principle = st.fixed_dictionaries(
    {}, optional={"id": values, "critique": values, "revision": values, "text": values, "extra": values}
)
constitution_keys = st.sampled_from(
    ["name", "critique_principles", "feedback_principles", "critique_fewshot", "feedback_fewshot", "cot_fewshot"]
) | st.text(max_size=8)


@st.composite
def constitution_documents(draw):
    document = {}
    for key in draw(st.lists(constitution_keys, max_size=5, unique=True)):
        document[key] = draw(st.lists(principle, max_size=3) | values)
    return document


@FUZZ
@given(document=constitution_documents())
def test_constitution_yaml_loader(document, tiny_model_dir):
    path = scratch_file("constitution.yaml", yaml.safe_dump(document, allow_unicode=True).encode())
    message = check_loader("constitution (YAML)", lambda: load_constitution(str(path)), path)
    if message:
        data = tiny_config_data(tiny_model_dir, path.parent)
        refused_by_cai_run({**data, "constitution": str(path)}, "critique", "constitution (YAML)", message)


PAPER_FILES = ["CritiqueRevisionInstructions.json", "RLMadisonInstructions.json", "CritiqueRevisionFewShotPrompts.json",
               "RLMadisonFewShotPrompts.json", "RLMadisonPrecogFewShotPrompts.json"]  # fmt: skip


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(PAPER_FILES), values.map(lambda value: json.dumps(value).encode()) | garbage, min_size=1
    )
)
def test_constitution_paper_folder_loader(files, tiny_model_dir):
    folder = scratch_folder()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    loader = "constitution (paper's JSON files)"
    # The refusal names the file of the folder at fault (a malformed one, or one that is missing).
    message = check_loader(loader, lambda: load_constitution(str(folder)), *(folder / name for name in PAPER_FILES))
    if message:
        data = tiny_config_data(tiny_model_dir, scratch_folder())
        refused_by_cai_run({**data, "constitution": str(folder)}, "critique", loader, message)


# ----------------------------------------------------------------------------- prompts and preferences

row_fields = st.sampled_from(["prompt", "chosen", "rejected", "instruction", "question", "text", "goal", "turns",
                              "Behavior", "id"]) | st.text(max_size=6)  # fmt: skip
rows = st.dictionaries(row_fields, values, max_size=4) | values


def encode_rows(kind: str, items: list) -> bytes:
    if kind == "jsonl":
        return "\n".join(json.dumps(item) for item in items).encode()
    if kind == "json":
        return json.dumps(items).encode()
    if kind == "csv":
        return "\n".join(",".join(str(value) for value in (item.values() if isinstance(item, dict) else [item]))
                         for item in items).encode()  # fmt: skip
    return "\n".join(str(item) for item in items).encode()


@st.composite
def row_files(draw):
    """(file name, bytes): rows in one of the formats, or garbage, sometimes gzipped."""
    kind = draw(st.sampled_from(["jsonl", "json", "csv", "txt"]))
    content = draw(st.lists(rows, max_size=5).map(lambda items: encode_rows(kind, items)) | garbage)
    if draw(st.booleans()):
        return f"rows.{kind}.gz", gzip.compress(content) if draw(st.booleans()) else content
    return f"rows.{kind}", content


def refused_by_cai_run(config_data: dict, stages: str, loader: str, message: str, run_dir: Path | None = None) -> None:
    """`cai run` on a config that reads the bad file refuses with the loader's `message`, and writes nothing.

    Args:
        run_dir: an existing run to run `stages` in (left unchanged); default a fresh one (never created).
    """
    folder = scratch_folder("cai-fuzz-run-")
    config = folder / "run-config.yaml"
    config.write_text(yaml.safe_dump(config_data), encoding="utf-8")
    target = run_dir or folder / "run"
    before = tree_digest(target) if run_dir else None
    assert_cai_refused(*cai_run(str(config), "--run-dir", str(target), "--stages", stages), message)
    if run_dir:
        assert tree_digest(target) == before
    else:
        assert not target.exists()
    OUTCOMES[loader, "refused by cai run with the loader's line (exit 2, nothing written)"] += 1


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (and every folder, as "dir") with the SHA-256 of its bytes."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(root.rglob("*"))}  # fmt: skip


@FUZZ
@given(file=row_files(), field=st.none() | st.sampled_from(["prompt", "text", "nope"]))
def test_prompt_loader(file, field, tiny_model_dir):
    path = scratch_file(*file)
    check_loader("prompts", lambda: load_prompts(str(path), prefix="p", field=field), path)
    try:
        load_prompts(str(path), prefix="p")
    except UserError as error:
        assert names_file(str(error), path), str(error)
        data = tiny_config_data(tiny_model_dir, path.parent, data={"red_team": str(path)})
        refused_by_cai_run(data, "critique", "prompts", str(error))


transcripts = st.lists(
    st.tuples(st.sampled_from(["Human", "Assistant", "human", "System", ""]), st.text(max_size=20)), max_size=4
).map(lambda turns: "".join(f"\n\n{role}: {text}" for role, text in turns))
preference_rows = st.fixed_dictionaries({}, optional={"chosen": transcripts | values, "rejected": transcripts | values,
                                                      "extra": values})  # fmt: skip


@pytest.fixture(scope="module")
def feedback_done(tmp_path_factory, tiny_model_dir) -> tuple[dict, Path]:
    """(config data, a run where stages critique, pairs and feedback are done): what stage `pm` reads is there.

    A malformed preference file run through `cai run --stages pm` here can only be refused by the
    preference loader: a fresh directory would be refused anyway, for the missing `ai_labels`.
    """
    folder = tmp_path_factory.mktemp("feedback-done")
    data = tiny_config_data(tiny_model_dir, folder, pairs={"model": str(tiny_model_dir), "max_new_tokens": 8})
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    run_dir = folder / "run"
    assert main(["run", str(config), "--run-dir", str(run_dir), "--stages", "critique,pairs,feedback"]) == 0
    assert RunDir(run_dir).stage_status("feedback") == "done" and read_ai_labels(RunDir(run_dir).path("ai_labels"))
    # With well-formed comparisons the same command goes on: nothing but the preference file can refuse it.
    assert main(["plan", str(config), "--run-dir", str(run_dir), "--stages", "pm"]) == 0
    return data, run_dir


@FUZZ
@given(items=st.lists(preference_rows | values, max_size=5), gz=st.booleans(), limit=st.none() | st.integers(0, 3))
def test_preference_loader(items, gz, limit, feedback_done):
    content = encode_rows("jsonl", items)
    path = scratch_file("pairs.jsonl.gz" if gz else "pairs.jsonl", gzip.compress(content) if gz else content)
    check_loader("preferences", lambda: load_preference_pairs(str(path), limit=limit), path)
    try:
        load_preference_pairs(str(path))
    except UserError as error:
        assert names_file(str(error), path), str(error)  # the preference loader's refusal, not a missing upstream file
        data, run_dir = feedback_done
        data = {**data, "data": {**data["data"], "human_preferences": str(path)}}
        refused_by_cai_run(data, "pm", "preferences", str(error), run_dir=run_dir)


mc_rows = st.fixed_dictionaries(
    {}, optional={"prompt": values, "corrects": values, "incorrects": values, "target_scores": values,
                  "input": values, "id": values}
)  # fmt: skip


@FUZZ
@given(document=st.lists(mc_rows, max_size=4) | st.fixed_dictionaries({"examples": st.lists(mc_rows, max_size=4)})
       | values)  # fmt: skip
def test_mc_eval_loader(document, tiny_model_dir):
    path = scratch_file("mc.json", json.dumps(document).encode())
    message = check_loader("MC eval", lambda: load_mc_eval(path), path)
    if message:
        data = tiny_config_data(tiny_model_dir, path.parent, eval={"mc_files": [str(path)]})
        refused_by_cai_run(data, "eval", "MC eval", message)
