"""Bad-input campaign: property-based (hypothesis) inputs for every loader of user files.

The property, for each loader: it returns a result, or raises `UserError` with one non-empty line
that names the file (or, for config values, the key). Any other exception is a bug: hypothesis
shrinks it to a minimal input. Every malformed input is also run through `cai run` (in the config,
or as the file a config names): exit 2, and no run directory.

`CAI_FUZZ_EXAMPLES` sets the examples per loader (default 60: seconds in `make test`); the
figures in docs/reliability.md come from `CAI_FUZZ_EXAMPLES=1000`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constitutional.cli import main
from constitutional.config import Config, load_config
from constitutional.constitution import load_constitution
from constitutional.errors import UserError
from constitutional.evaluation.questions import load_mc_eval
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


def assert_one_line(error: UserError, *names: str) -> None:
    message = str(error)
    assert message.strip() and "\n" not in message, repr(message)
    assert any(name in message for name in names), (message, names)


def check_loader(loader: str, call, path: Path, *also: str) -> bool:
    """`call()` returns, or raises a one-line UserError naming `path` (or one of `also`); True if it raised."""
    try:
        call()
    except UserError as error:
        assert_one_line(error, path.name, *also)
        OUTCOMES[loader, "one-line error"] += 1
        return True
    OUTCOMES[loader, "accepted"] += 1
    return False


def scratch_file(name: str, content: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="cai-fuzz-"))
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
section_names = st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8)


@st.composite
def config_documents(draw):
    """A mapping of real sections to real (or misspelt) keys with arbitrary values; sometimes not a mapping."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    document = {}
    for name in draw(st.lists(section_names, max_size=4, unique=True)):
        keys = SECTIONS.get(name) or []
        if keys and draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys) | st.text(max_size=6), max_size=3, unique=True))
            document[name] = {key: draw(values) for key in chosen}
        else:
            document[name] = draw(values)
    return document


@FUZZ
@given(document=config_documents())
def test_config_loader(document):
    path = scratch_file("config.yaml", yaml.safe_dump(document, allow_unicode=True).encode())
    try:
        load_config(path)
    except UserError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, repr(message)
        run_dir = path.parent / "run"
        assert main(["run", str(path), "--run-dir", str(run_dir)]) == 2
        assert not run_dir.exists()
        OUTCOMES["config", "one-line error, cai run exit 2, nothing written"] += 1
    else:
        OUTCOMES["config", "accepted"] += 1


@FUZZ
@given(content=garbage | st.text(max_size=200).map(str.encode))
def test_config_loader_on_garbage(content):
    path = scratch_file("config.yaml", content)
    check_loader("config (raw bytes)", lambda: load_config(path), path, "config key", ":")


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
    if check_loader("constitution (YAML)", lambda: load_constitution(str(path)), path):
        data = tiny_config_data(tiny_model_dir, path.parent)
        refused_by_cai_run({**data, "constitution": str(path)}, "critique", "constitution (YAML)")


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(["CritiqueRevisionInstructions.json", "RLMadisonInstructions.json",
                         "CritiqueRevisionFewShotPrompts.json", "RLMadisonFewShotPrompts.json",
                         "RLMadisonPrecogFewShotPrompts.json"]),
        values.map(lambda value: json.dumps(value).encode()) | garbage,
        min_size=1,
    )
)  # fmt: skip
def test_constitution_paper_folder_loader(files, tiny_model_dir):
    folder = Path(tempfile.mkdtemp(prefix="cai-fuzz-"))
    for name, content in files.items():
        (folder / name).write_bytes(content)
    loader = "constitution (paper's JSON files)"
    if check_loader(loader, lambda: load_constitution(str(folder)), folder, *files):
        data = tiny_config_data(tiny_model_dir, Path(tempfile.mkdtemp(prefix="cai-fuzz-")))
        refused_by_cai_run({**data, "constitution": str(folder)}, "critique", loader)


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


def refused_by_cai_run(config_data: dict, stages: str, loader: str) -> None:
    """`cai run` on a config that reads the bad file: exit 2 and no run directory."""
    folder = Path(tempfile.mkdtemp(prefix="cai-fuzz-run-"))
    config = folder / "run-config.yaml"
    config.write_text(yaml.safe_dump(config_data), encoding="utf-8")
    assert main(["run", str(config), "--run-dir", str(folder / "run"), "--stages", stages]) == 2
    assert not (folder / "run").exists()
    OUTCOMES[loader, "refused by cai run (exit 2, nothing written)"] += 1


@FUZZ
@given(file=row_files(), field=st.none() | st.sampled_from(["prompt", "text", "nope"]))
def test_prompt_loader(file, field, tiny_model_dir):
    path = scratch_file(*file)
    check_loader("prompts", lambda: load_prompts(str(path), prefix="p", field=field), path)
    try:
        load_prompts(str(path), prefix="p")
    except UserError:
        data = tiny_config_data(tiny_model_dir, path.parent, data={"red_team": str(path)})
        refused_by_cai_run(data, "critique", "prompts")


transcripts = st.lists(
    st.tuples(st.sampled_from(["Human", "Assistant", "human", "System", ""]), st.text(max_size=20)), max_size=4
).map(lambda turns: "".join(f"\n\n{role}: {text}" for role, text in turns))
preference_rows = st.fixed_dictionaries({}, optional={"chosen": transcripts | values, "rejected": transcripts | values,
                                                      "extra": values})  # fmt: skip


@FUZZ
@given(items=st.lists(preference_rows | values, max_size=5), gz=st.booleans(), limit=st.none() | st.integers(0, 3))
def test_preference_loader(items, gz, limit, tiny_model_dir):
    content = encode_rows("jsonl", items)
    path = scratch_file("pairs.jsonl.gz" if gz else "pairs.jsonl", gzip.compress(content) if gz else content)
    check_loader("preferences", lambda: load_preference_pairs(str(path), limit=limit), path)
    try:
        load_preference_pairs(str(path))
    except UserError:
        data = tiny_config_data(tiny_model_dir, path.parent, data={"human_preferences": str(path)})
        refused_by_cai_run(data, "pm", "preferences")


mc_rows = st.fixed_dictionaries(
    {}, optional={"prompt": values, "corrects": values, "incorrects": values, "target_scores": values,
                  "input": values, "id": values}
)  # fmt: skip


@FUZZ
@given(document=st.lists(mc_rows, max_size=4) | st.fixed_dictionaries({"examples": st.lists(mc_rows, max_size=4)})
       | values)  # fmt: skip
def test_mc_eval_loader(document, tiny_model_dir):
    path = scratch_file("mc.json", json.dumps(document).encode())
    if check_loader("MC eval", lambda: load_mc_eval(path), path):
        data = tiny_config_data(tiny_model_dir, path.parent, eval={"mc_files": [str(path)]})
        refused_by_cai_run(data, "eval", "MC eval")
