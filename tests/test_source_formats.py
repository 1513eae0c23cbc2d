"""Source formats beyond HH-RLHF text: `hf:` options (config, data_dir, split, revision) and message lists."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from constitutional.errors import UserError
from constitutional.source_rows import HfSpec, parse_hf_spec
from constitutional.sources import load_preference_pairs, load_prompts


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_user_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def hh(*turns: str) -> str:
    """An HH-RLHF transcript of alternating Human / Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))


# --------------------------------------------------------------------------- hf: spec syntax


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:Anthropic/hh-rlhf", HfSpec("Anthropic/hh-rlhf")),
        ("hf:Anthropic/hh-rlhf:test", HfSpec("Anthropic/hh-rlhf", split="test")),
        (
            "hf:Anthropic/hh-rlhf?data_dir=harmless-base&split=test&revision=abc123&name=default",
            HfSpec("Anthropic/hh-rlhf", name="default", data_dir="harmless-base", split="test", revision="abc123"),
        ),
        (
            "hf:Anthropic/hh-rlhf:test?data_dir=helpful-base",
            HfSpec("Anthropic/hh-rlhf", data_dir="helpful-base", split="test"),
        ),
        ("hf:org/set?split=train[:100]", HfSpec("org/set", split="train[:100]")),
        ("hf:org/set:", HfSpec("org/set")),  # as before: an empty split is the default
    ],
)
def test_parse_hf_spec(spec, expected):
    assert parse_hf_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("hf:", "expected hf:<dataset id>"),
        ("hf::train", "expected hf:<dataset id>"),
        ("hf:org/set?config=x", "unknown option 'config' (expected name, data_dir, split, revision"),
        ("hf:org/set?data_dir", "option 'data_dir' needs a value"),
        ("hf:org/set?data_dir=", "option 'data_dir' needs a value"),
        ("hf:org/set?name=a&name=b", "option 'name' given twice"),
        ("hf:org/set:test?split=train", "the split is given twice"),
        ("hf:org/set?", "empty option"),
        ("hf:org/set?name=a&&split=b", "empty option"),
    ],
)
def test_parse_hf_spec_errors(spec, fragment):
    message = assert_user_error(lambda: parse_hf_spec(spec), fragment)
    assert message.startswith(f"{spec}: ")
    # The loaders report the same, before anything is loaded.
    assert_user_error(lambda: load_prompts(spec, prefix="p"), f"{spec}: ", fragment)


@pytest.fixture
def fake_load_dataset(monkeypatch):
    """Replace `datasets.load_dataset` by a recorder that returns two HH rows."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return [
            {"chosen": hh("q1", "good"), "rejected": hh("q1", "bad")},
            {"chosen": hh("q2", "yes"), "rejected": hh("q2", "no")},
        ]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_options_reach_load_dataset(tmp_path, fake_load_dataset):
    spec = "hf:Anthropic/hh-rlhf?data_dir=harmless-base&split=test&revision=abc123&name=default"
    items = load_prompts(spec, prefix="rt", base_dir=tmp_path)
    assert [item.prompt for item in items] == ["q1", "q2"]
    pairs = load_preference_pairs("hf:Anthropic/hh-rlhf:train?data_dir=helpful-base", base_dir=tmp_path)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("q1", "good", "bad"), ("q2", "yes", "no")]
    load_prompts("hf:Anthropic/hh-rlhf", prefix="rt", base_dir=tmp_path)  # the old spelling, unchanged
    assert fake_load_dataset == [
        ("Anthropic/hh-rlhf", {"name": "default", "data_dir": "harmless-base", "split": "test", "revision": "abc123"}),
        ("Anthropic/hh-rlhf", {"name": None, "data_dir": "helpful-base", "split": "train", "revision": None}),
        ("Anthropic/hh-rlhf", {"name": None, "data_dir": None, "split": "train", "revision": None}),
    ]


def test_hf_row_errors_name_the_spec_and_row(tmp_path, fake_load_dataset):
    spec = "hf:Anthropic/hh-rlhf?data_dir=harmless-base"
    assert_user_error(lambda: load_prompts(spec, prefix="p", field="messages"), f"{spec} row 1: no field 'messages'")


@pytest.fixture
def hh_folder(tmp_path) -> Path:
    """A local copy of Anthropic/hh-rlhf's layout: harmless-base/ and helpful-base/, train and test."""
    folder = tmp_path / "hh-rlhf"
    for data_dir in ("harmless-base", "helpful-base"):
        for split in ("train", "test"):
            question = f"{data_dir} {split} question"
            write_jsonl(
                folder / data_dir / f"{split}.jsonl",
                [{"chosen": hh(question, "good"), "rejected": hh(question, "bad")}],
            )
    return folder


def test_hf_local_folder_data_dir_and_split(tmp_path, hf_offline, hh_folder, caplog):
    for data_dir in ("harmless-base", "helpful-base"):
        for split in ("train", "test"):
            items = load_prompts(f"hf:hh-rlhf?data_dir={data_dir}&split={split}", prefix="p", base_dir=tmp_path)
            assert [item.prompt for item in items] == [f"{data_dir} {split} question"]
    pairs = load_preference_pairs(f"hf:{hh_folder}:test?data_dir=helpful-base&name=default")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("helpful-base test question", "good", "bad")]
    with caplog.at_level(logging.WARNING, logger="constitutional.source_rows"):
        load_prompts(f"hf:{hh_folder}?data_dir=harmless-base&revision=abc123", prefix="p")
    assert "revision 'abc123' is ignored" in caplog.text


def test_hf_unknown_config_split_and_data_dir(tmp_path, hf_offline, hh_folder):
    spec = "hf:hh-rlhf?data_dir=harmless-base&name=nope"
    message = assert_user_error(
        lambda: load_prompts(spec, prefix="p", base_dir=tmp_path),
        f"{spec}: could not load dataset: unknown config name 'nope' (available: default;",
    )
    assert "?name=" in message
    spec = "hf:hh-rlhf?data_dir=harmless-base&split=validation"
    assert_user_error(
        lambda: load_preference_pairs(spec, base_dir=tmp_path),
        f"{spec}: could not load dataset: unknown split 'validation' (available: train, test)",
    )
    spec = "hf:hh-rlhf?data_dir=red-team-attempts"
    assert_user_error(lambda: load_prompts(spec, prefix="p", base_dir=tmp_path), f"{spec}: could not load dataset:")


def test_hf_configs_from_readme(tmp_path, hf_offline):
    """A dataset with named configs (its README's `configs:`): `?name=` picks one; none or a wrong one is an error."""
    folder = tmp_path / "configs"
    write_jsonl(folder / "a" / "train.jsonl", [{"prompt": "from a"}])
    write_jsonl(folder / "b" / "train.jsonl", [{"prompt": "from b"}])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: first\n  data_files:\n  - split: train\n    path: a/train.jsonl\n"
        "- config_name: second\n  data_files:\n  - split: train\n    path: b/train.jsonl\n---\n",
        encoding="utf-8",
    )
    assert [item.prompt for item in load_prompts("hf:configs?name=second", prefix="p", base_dir=tmp_path)] == ["from b"]
    assert_user_error(
        lambda: load_prompts("hf:configs?name=third", prefix="p", base_dir=tmp_path),
        "hf:configs?name=third: could not load dataset: unknown config name 'third' (available: first, second;",
    )
    assert_user_error(
        lambda: load_prompts("hf:configs", prefix="p", base_dir=tmp_path),
        "hf:configs: could not load dataset: the dataset has several configs and no name was given "
        "(available: first, second;",
    )


def test_hf_local_parquet_with_message_lists(tmp_path, hf_offline):
    """Message lists as `datasets` yields them from parquet (UltraFeedback's layout)."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ultrafeedback"
    folder.mkdir()
    rows = {
        "prompt": ["What is 2+2?"],
        "chosen": [[user("What is 2+2?"), assistant("4")]],
        "rejected": [[user("What is 2+2?"), assistant("5")]],
        "messages": [[user("What is 2+2?"), assistant("4")]],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "train_prefs.parquet"))
    spec = "hf:ultrafeedback?split=train"
    pairs = load_preference_pairs(spec, base_dir=tmp_path)
    assert [(p["prompt"], p["history"], p["chosen"], p["rejected"]) for p in pairs] == [("What is 2+2?", (), "4", "5")]
    items = load_prompts(spec, prefix="p", base_dir=tmp_path, field="messages")
    assert [(item.prompt, item.history) for item in items] == [("What is 2+2?", ())]


# --------------------------------------------------------------------------- messages: prompts


def test_prompts_from_message_lists(tmp_path):
    rows = [
        {"messages": [user("Hi"), assistant("Hello!"), user("Tell me more"), assistant("Sure: ...")]},
        {"messages": [system("Be terse."), user("One?")]},
        {"messages": [user("a"), system("mid-conversation note"), assistant("b"), user("c")]},
        {"prompt": [user("TRL-style prompt")]},
        {"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]},
        {"messages": [user("ignored")], "prompt": "A prompt field wins"},  # earlier fields keep priority
        {"messages": [user("x")], "history": [{"role": "human", "text": "before"}]},
    ]
    items = load_prompts(str(write_jsonl(tmp_path / "m.jsonl", rows)), prefix="m")
    assert [(item.prompt, item.history) for item in items] == [
        ("Tell me more", (("human", "Hi"), ("assistant", "Hello!"))),
        ("One?", ()),  # system messages are dropped
        ("c", (("human", "a"), ("assistant", "b"))),
        ("TRL-style prompt", ()),
        ("q", ()),
        ("A prompt field wins", ()),
        ("x", (("human", "before"),)),
    ]


def test_message_prompts_share_ids_with_hh_transcripts(tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("a"), assistant("b"), user("c")]}])
    transcript = write_jsonl(tmp_path / "t.jsonl", [{"prompt": hh("a", "b", "c") + "\n\nAssistant:"}])
    first, second = load_prompts(str(messages), prefix="p"), load_prompts(str(transcript), prefix="p")
    assert first == second


MESSAGE_PROMPT_ERRORS = [
    ({"messages": "Hi"}, "field 'messages' must be a list of {role, content} messages, got str"),
    ({"messages": ["Hi"]}, "field 'messages' message 1: expected a {role, content} object, got str"),
    ({"messages": [user("a"), {"content": "no role"}]}, "field 'messages' message 2: role None"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        "field 'messages' message 1: role 'tool' (expected 'user', 'assistant'",
    ),
    ({"messages": [{"role": "user"}]}, "field 'messages' message 1: 'content' must be a string, got NoneType"),
    (
        {"messages": [{"role": "user", "content": ["part"]}]},
        "field 'messages' message 1: 'content' must be a string, got list",
    ),
    ({"messages": [system("s"), assistant("only me")]}, "field 'messages': no user turn"),
    ({"messages": []}, "field 'messages': no user turn"),
    ({"messages": [user("  "), assistant("x")]}, "field 'messages': the last user turn is empty"),
    ({"prompt": [assistant("x")]}, "field 'prompt': no user turn"),
]


@pytest.mark.parametrize(("row", "fragment"), MESSAGE_PROMPT_ERRORS)
def test_message_prompt_errors(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:2: {fragment}")


def test_row_without_prompt_field_mentions_messages(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"answer": "x"}])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: no prompt field", "'messages' list")


def test_message_prompts_in_json_and_csv(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"messages": [user("from json")]}, {"messages": 3}]), encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}: item 2: field 'messages' must be a list")
    assert [item.prompt for item in load_prompts(str(path), prefix="p", limit=1)] == ["from json"]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('messages\n"[{""role"": ""user""}]"\n', encoding="utf-8")  # CSV cells are text
    assert_user_error(lambda: load_prompts(str(csv_path), prefix="p"), f"{csv_path}:2: field 'messages' must be a list")


# --------------------------------------------------------------------------- messages: preference pairs


def test_preference_pairs_from_message_lists(tmp_path, caplog):
    context = [system("You are helpful."), user("a"), assistant("b"), user("c")]
    rows = [
        # UltraFeedback: the prompt field repeats the user turn; the conversations are read.
        {
            "prompt": "What is 2+2?",
            "chosen": [user("What is 2+2?"), assistant("4")],
            "rejected": [user("What is 2+2?"), assistant("5")],
        },
        {"chosen": [*context, assistant("nice")], "rejected": [*context, assistant("rude")]},
        {"chosen": [*context, assistant("one"), assistant("two")], "rejected": [*context, assistant("three")]},
        # TRL's explicit prompt: chosen and rejected hold only the answers.
        {
            "prompt": [user("x"), assistant("y"), user("z")],
            "chosen": [assistant("good")],
            "rejected": [assistant("bad")],
        },
        {"prompt": "Plain prompt", "chosen": [assistant("yes")], "rejected": [assistant("no")]},
        # Differ before the answer: skipped with a warning, as HH rows are.
        {
            "chosen": [user("a"), assistant("b"), user("c"), assistant("1")],
            "rejected": [user("a"), assistant("DIFFERENT"), user("c"), assistant("2")],
        },
        {"chosen": [user("q"), assistant("one")], "rejected": [assistant("no user turn here")], "prompt": "q"},
        # An empty answer: skipped with a warning, as HH rows are.
        {"chosen": [user("q"), assistant("")], "rejected": [user("q"), assistant("x")]},
        {"chosen": [*context, assistant("nice")], "rejected": [*context, assistant("rude")]},  # duplicate
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="constitutional.sources"):
        pairs = load_preference_pairs(str(path))
    history = (("human", "a"), ("assistant", "b"))
    assert [(p["prompt"], p["history"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("What is 2+2?", (), "4", "5"),
        ("c", history, "nice", "rude"),
        ("c", history, "one\n\ntwo", "three"),
        ("z", (("human", "x"), ("assistant", "y")), "good", "bad"),
        ("Plain prompt", (), "yes", "no"),
    ]
    assert "skipped 2 rows whose chosen and rejected differ before the last reply" in caplog.text
    assert "skipped 1 rows whose final Assistant reply is empty" in caplog.text
    # The same comparison in HH text and in messages is the same pair, with the same id.
    hh_path = write_jsonl(
        tmp_path / "hh.jsonl", [{"chosen": hh("a", "b", "c", "nice"), "rejected": hh("a", "b", "c", "rude")}]
    )
    assert load_preference_pairs(str(hh_path)) == [pairs[1]]


OK_PAIR = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
PREFERENCE_MESSAGE_ERRORS = [
    (
        {"chosen": [user("q"), assistant("a")], "rejected": "\n\nHuman: q\n\nAssistant: b"},
        "field 'rejected' must be a list of {role, content} messages, got str",
    ),
    (
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q")]},
        "field 'rejected': the last message must be the assistant's answer (it ends with a user turn)",
    ),
    (
        {"chosen": [user("q"), assistant("a"), user("again")], "rejected": [user("q"), assistant("b")]},
        "field 'chosen': the last message must be the assistant's answer",
    ),
    (
        {"chosen": [], "rejected": [user("q"), assistant("b")]},
        "field 'chosen': the last message must be the assistant's answer (it has no user or assistant messages)",
    ),
    (
        {"chosen": [user("q"), {"role": "bot", "content": "a"}], "rejected": [user("q"), assistant("b")]},
        "field 'chosen' message 2: role 'bot'",
    ),
    (
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), "b"]},
        "field 'rejected' message 2: expected a {role, content} object",
    ),
    (
        {"chosen": [assistant("a")], "rejected": [assistant("b")]},
        "field 'chosen': no user turn (and no 'prompt' field)",
    ),
    (
        {"chosen": [user(" "), assistant("a")], "rejected": [user(" "), assistant("b")]},
        "field 'chosen': the last user turn is empty",
    ),
    (
        {"chosen": 3, "rejected": "x"},
        "fields 'chosen' and 'rejected' must be HH-RLHF transcripts (strings) or message lists, got int and str",
    ),
    ({"messages": [user("q"), assistant("a")]}, "no chosen/rejected fields"),
]


@pytest.mark.parametrize(("row", "fragment"), PREFERENCE_MESSAGE_ERRORS)
def test_preference_message_errors(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [OK_PAIR, row])
    assert_user_error(lambda: load_preference_pairs(str(path)), f"{path}:2: {fragment}")
