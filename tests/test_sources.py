"""Prompt and preference sources: transcript parsing, every container, built-in sets, real data, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from constitutional.errors import UserError
from constitutional.hh_rlhf import parse_transcript, prompt_from_transcript
from constitutional.sources import PromptItem, load_preference_pairs, load_prompts

from conftest import SHARED_DATA

HARMLESS = SHARED_DATA / "hh-rlhf/harmless-base-test.jsonl.gz"
HELPFUL = SHARED_DATA / "hh-rlhf/helpful-base-test.jsonl.gz"
SEED_TASKS = SHARED_DATA / "self-instruct/seed_tasks.jsonl"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"shared data not found: {path}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- transcripts


def test_parse_transcript_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: What time is it?\n\nAssistant: 3:30pm."
    assert parse_transcript(text) == [
        ("human", "Hi there"),
        ("assistant", "Hello!"),
        ("human", "What time is it?"),
        ("assistant", "3:30pm."),
    ]


def test_parse_transcript_keeps_colons_and_midline_markers():
    text = (
        "Human: Note: meet at 3:30pm.  Human: rights matter, Assistant: too\nHuman: not a turn\n\nAssistant: OK: noted."
    )
    assert parse_transcript(text) == [
        ("human", "Note: meet at 3:30pm.  Human: rights matter, Assistant: too\nHuman: not a turn"),
        ("assistant", "OK: noted."),
    ]


def test_parse_transcript_rejects_text_before_first_turn():
    with pytest.raises(ValueError):
        parse_transcript("Preamble\n\nHuman: hi")
    with pytest.raises(ValueError):
        parse_transcript("no markers at all")


def test_prompt_from_transcript_keeps_context_up_to_last_human_turn():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c: d\n\nAssistant: final answer"
    assert prompt_from_transcript(text) == ("c: d", (("human", "a"), ("assistant", "b")))
    assert prompt_from_transcript("\n\nHuman: only one\n\nAssistant:") == ("only one", ())


def test_prompt_from_transcript_without_human_turn():
    with pytest.raises(ValueError):
        prompt_from_transcript("\n\nAssistant: I talk alone")


# --------------------------------------------------------------------------- real data


@needs(HARMLESS)
def test_harmless_hh_prompts():
    items = load_prompts(str(HARMLESS), prefix="rt", limit=50)
    assert len(items) == 50
    assert all(item.prompt.strip() for item in items)
    assert not any("\n\nAssistant:" in item.prompt or "\n\nHuman:" in item.prompt for item in items)
    assert all(role in ("human", "assistant") for item in items for role, _ in item.history)
    assert any(item.history for item in items)  # multi-turn conversations keep their context
    assert len({item.id for item in items}) == 50


@needs(HELPFUL)
def test_helpful_hh_preference_pairs():
    pairs = load_preference_pairs(str(HELPFUL), limit=200)
    assert len(pairs) == 200
    assert set(pairs[0]) == {"id", "prompt", "history", "chosen", "rejected"}
    assert all(pair["prompt"] and "\n\nHuman:" not in pair["chosen"] for pair in pairs)
    assert sum(pair["chosen"] != pair["rejected"] for pair in pairs) >= 0.95 * len(pairs)
    # The first row, checked against a hand split of its raw transcripts.
    with gzip.open(HELPFUL, "rt", encoding="utf-8") as handle:
        row = json.loads(handle.readline())
    cut = row["chosen"].rindex("\n\nAssistant:")
    assert pairs[0]["chosen"] == row["chosen"][cut + len("\n\nAssistant:") :].strip()
    assert row["rejected"].startswith(row["chosen"][:cut])


@needs(SEED_TASKS)
def test_self_instruct_seed_tasks():
    rows = [json.loads(line) for line in SEED_TASKS.read_text(encoding="utf-8").splitlines() if line.strip()]
    expected = []
    for row in rows:
        text = row["instruction"].strip()
        extra = row["instances"][0]["input"].strip() if row["instances"] else ""
        text = f"{text}\n\n{extra}" if extra else text
        if text not in expected:
            expected.append(text)
    items = load_prompts(str(SEED_TASKS), prefix="si")
    assert [item.prompt for item in items] == expected
    assert len(items) == len(expected) <= 175


# --------------------------------------------------------------------------- built-in sets


@pytest.mark.parametrize("asset", ["red_team_prompts.jsonl", "helpful_prompts.jsonl"])
def test_builtin_sets(asset):
    first = load_prompts("builtin", prefix="b", builtin=asset)
    second = load_prompts("builtin", prefix="b", builtin=asset)
    assert len(first) >= 40
    assert len({item.id for item in first}) == len(first)
    assert first == second
    assert all(item.prompt and len(item.prompt) < 200 for item in first)


def test_builtin_red_team_has_two_turn_rows():
    items = load_prompts("builtin", prefix="rt", builtin="red_team_prompts.jsonl")
    two_turn = [item for item in items if item.history]
    assert two_turn and all([role for role, _ in item.history] == ["human", "assistant"] for item in two_turn)


def test_builtin_needs_a_named_set():
    with pytest.raises(UserError, match="builtin"):
        load_prompts("builtin", prefix="x")


def test_assistant_fewshot_asset():
    from importlib import resources

    text = resources.files("constitutional").joinpath("assets/assistant_fewshot.txt").read_text("utf-8")
    assert text.endswith("\n") and len(text.split()) < 300
    turns = parse_transcript(text[text.index("Human:") :])
    assert [role for role, _ in turns] == ["human", "assistant"] * (len(turns) // 2) and len(turns) >= 6
    assert not text.rstrip().endswith("Human:")


# --------------------------------------------------------------------------- containers


def test_ids_are_content_hashes_and_duplicates_collapse(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b"}, {"prompt": " a ", "id": 2}])
    items = load_prompts(str(path), prefix="p")
    assert [item.prompt for item in items] == ["a", "b"]
    assert items[0].id.startswith("p-") and len(items[0].id) == len("p-") + 12
    other = write_jsonl(tmp_path / "q.jsonl", [{"text": "a"}])
    assert load_prompts(str(other), prefix="p")[0].id == items[0].id
    with_history = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a", "history": [{"role": "human", "text": "x"}]}])
    assert load_prompts(str(with_history), prefix="p")[0].id != items[0].id


def test_limit_counts_after_deduplication(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ["a", "a", "b", "c", "d"]])
    assert [item.prompt for item in load_prompts(str(path), prefix="p", limit=3)] == ["a", "b", "c"]
    assert load_prompts(str(path), prefix="p", limit=0) == []


def test_row_fields_in_priority_order(tmp_path):
    rows = [
        {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me more\n\nAssistant:"},
        {"prompt": "Human rights: explain them.", "text": "ignored"},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {"instruction": "Translate.", "instances": [{"input": "bonjour", "output": "hello"}]},
        {"instruction": "Sum these.", "input": "1, 2"},
        {"instruction": "Name a color.", "instances": [{"input": "", "output": "red"}]},
        {"question": "Why?"},
        {"text": "Plain text."},
        "A bare string row.",
    ]
    items = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), prefix="p")
    assert [(item.prompt, item.history) for item in items] == [
        ("tell me more", (("human", "hi"), ("assistant", "hello"))),
        ("Human rights: explain them.", ()),
        ("q", ()),
        ("Translate.\n\nbonjour", ()),
        ("Sum these.\n\n1, 2", ()),
        ("Name a color.", ()),
        ("Why?", ()),
        ("Plain text.", ()),
        ("A bare string row.", ()),
    ]


def test_txt_csv_json_and_gzip_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second: with colon  \n", encoding="utf-8")
    assert [i.prompt for i in load_prompts("p.txt", prefix="t", base_dir=tmp_path)] == [
        "first prompt",
        "second: with colon",
    ]

    (tmp_path / "p.csv").write_text('id,question\n1,"A, quoted\nmulti-line question"\n2,Plain\n', encoding="utf-8")
    assert [i.prompt for i in load_prompts("p.csv", prefix="c", base_dir=tmp_path)] == [
        "A, quoted\nmulti-line question",
        "Plain",
    ]

    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "one"}, "two"]), encoding="utf-8")
    assert [i.prompt for i in load_prompts(str(tmp_path / "p.json"), prefix="j")] == ["one", "two"]

    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write('{"prompt": "zipped"}\n')
    assert [i.prompt for i in load_prompts("p.jsonl.gz", prefix="g", base_dir=tmp_path)] == ["zipped"]


def test_hf_local_folder(tmp_path, hf_offline):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(
        folder / "data.jsonl",
        [
            {"chosen": "\n\nHuman: q1\n\nAssistant: good", "rejected": "\n\nHuman: q1\n\nAssistant: bad"},
            {"chosen": "\n\nHuman: q2\n\nAssistant: yes", "rejected": "\n\nHuman: q2\n\nAssistant: no"},
        ],
    )
    items = load_prompts("hf:my_dataset", prefix="h", base_dir=tmp_path)
    assert [item.prompt for item in items] == ["q1", "q2"]
    pairs = load_preference_pairs(f"hf:{folder}:train", limit=1)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("q1", "good", "bad")]
    with pytest.raises(UserError) as error:
        load_prompts(f"hf:{folder}:no_such_split", prefix="h")
    assert str(error.value).startswith(f"hf:{folder}:no_such_split: could not load dataset") and "\n" not in str(
        error.value
    )


# --------------------------------------------------------------------------- preference pairs


def test_preference_pairs_multi_turn_and_presplit(tmp_path):
    context = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
    rows = [
        {"chosen": context + "\n\nAssistant: nice", "rejected": context + "\n\nAssistant: rude"},
        {"chosen": context + "\n\nAssistant: one\n\nAssistant: two", "rejected": context + "\n\nAssistant: three"},
        {
            "chosen": "\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant: 1",
            "rejected": "\n\nHuman: x\n\nAssistant: DIFFERENT\n\nHuman: z\n\nAssistant: 2",
        },
        {"prompt": "Plain question?", "chosen": " good ", "rejected": "bad"},
        {"chosen": context + "\n\nAssistant: nice", "rejected": context + "\n\nAssistant: rude"},  # duplicate
    ]
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert [(p["prompt"], p["history"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("c", (("human", "a"), ("assistant", "b")), "nice", "rude"),
        ("c", (("human", "a"), ("assistant", "b")), "one\n\ntwo", "three"),
        ("Plain question?", (), "good", "bad"),
    ]
    assert len({p["id"] for p in pairs}) == 3


# --------------------------------------------------------------------------- errors


def assert_user_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_missing_file_and_unknown_extension(tmp_path):
    assert_user_error(
        lambda: load_prompts("nope.jsonl", prefix="p", base_dir=tmp_path), str(tmp_path / "nope.jsonl"), "no such file"
    )
    (tmp_path / "p.xml").write_text("<x/>", encoding="utf-8")
    assert_user_error(
        lambda: load_prompts("p.xml", prefix="p", base_dir=tmp_path), str(tmp_path / "p.xml"), "unknown file type"
    )
    assert_user_error(
        lambda: load_preference_pairs("missing.jsonl.gz", base_dir=tmp_path), "missing.jsonl.gz", "no such file"
    )


def test_error_malformed_jsonl_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n', encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:3: invalid JSON")


def test_error_row_without_prompt_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"answer": "no prompt"}])
    assert_user_error(
        lambda: load_prompts(str(path), prefix="p"),
        f"{path}:2: no prompt field (expected one of prompt, chosen, instruction, question, text, goal, Behavior, "
        "turns)",
    )
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("title,body\nx,y\n", encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(csv_path), prefix="p"), f"{csv_path}:2: no prompt field")
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps(["ok", {"nothing": 1}]), encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(json_path), prefix="p"), f"{json_path}: item 2: no prompt field")


def test_error_bad_field_values(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "  "}])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: field 'prompt' is empty")
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": 3}])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: field 'prompt' must be a string")
    path = write_jsonl(tmp_path / "r.jsonl", [{"chosen": "\n\nAssistant: no human here"}])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: field 'chosen'", "Human")
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "history": [{"role": "robot", "text": "y"}]}])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: field 'history'")
    path = write_jsonl(tmp_path / "t.jsonl", [[1, 2]])
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:1: expected a JSON object")


def test_error_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:2: not valid UTF-8")
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"one\ntwo\nthr\xffee\n")
    assert_user_error(lambda: load_prompts(str(txt), prefix="p"), f"{txt}:3: not valid UTF-8")
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b"prompt\nok\n\x80bad\n")
    assert_user_error(lambda: load_prompts(str(csv_path), prefix="p"), f"{csv_path}:3: not valid UTF-8")


def test_error_empty_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}: no prompts found")
    txt = tmp_path / "p.txt"
    txt.write_text("", encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(txt), prefix="p"), f"{txt}: no prompts found")


def test_error_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_text('{"prompt": "not compressed"}\n', encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), str(path), "gzip")
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"prompt": "x"}\n' * 100)[:30])
    assert_user_error(lambda: load_preference_pairs(str(truncated)), str(truncated), "gzip")


def test_error_invalid_json_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]', encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}:3: invalid JSON")
    path.write_text('{"prompt": "a"}', encoding="utf-8")
    assert_user_error(lambda: load_prompts(str(path), prefix="p"), f"{path}: expected a JSON list")


def test_error_preference_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "only a prompt"}])
    assert_user_error(lambda: load_preference_pairs(str(path)), f"{path}:1: no chosen/rejected")
    path = write_jsonl(tmp_path / "q.jsonl", [{"chosen": "Preamble\n\nHuman: x", "rejected": "\n\nHuman: x"}])
    assert_user_error(lambda: load_preference_pairs(str(path)), f"{path}:1:")
    assert_user_error(lambda: load_preference_pairs("builtin"), "builtin")


def test_error_hf_unloadable(tmp_path, hf_offline):
    assert_user_error(
        lambda: load_prompts("hf:no-such-owner/no-such-dataset", prefix="p", base_dir=tmp_path),
        "hf:no-such-owner/no-such-dataset: could not load dataset",
    )


def test_prompt_item_is_frozen():
    item = PromptItem("p-1", "hi")
    with pytest.raises(AttributeError):
        item.prompt = "changed"  # type: ignore[misc]
