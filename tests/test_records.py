import json

import pytest

from constitutional.errors import UserError
from constitutional.records import append_records, read_ai_labels, read_critiques, read_pairs, read_records
from constitutional.rundir import ARTEFACTS, RunDir


def test_append_then_read(tmp_path):
    path = tmp_path / "data" / "x.jsonl"
    assert append_records(path, [{"id": "a", "text": "ünïcode"}, {"id": "b"}]) == 2
    assert append_records(path, []) == 0
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    assert "ünïcode" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes


def test_partial_last_line_from_a_crash_is_dropped_only_when_repairing(tmp_path):
    path = tmp_path / "x.jsonl"
    append_records(path, [{"id": "a"}])
    with path.open("a") as handle:
        handle.write('{"id": "b", "te')
    with pytest.raises(UserError, match=r"x.jsonl:2: invalid JSON"):
        read_records(path)
    assert [r["id"] for r in read_records(path, repair=True)] == ["a"]
    assert path.read_text() == json.dumps({"id": "a"}) + "\n"


def test_malformed_and_non_utf8_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object"):
        read_records(path)
    path.write_bytes(b'{"id": 1}\n{"id": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_records(path)


def test_manifest_tracks_stage_status(tmp_path):
    run = RunDir(tmp_path)
    assert run.stage_status("critique") == "pending"
    run.start_stage("critique", {"critique.rounds": 2}, {"prompts": "abc"})
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "running" and manifest["inputs"] == {"prompts": "abc"}
    assert manifest["settings"] == {"critique.rounds": 2}
    assert "torch" in manifest["versions"] and manifest["started"]
    run.fail_stage("critique", "interrupted")
    assert run.stage_status("critique") == "failed"
    run.start_stage("critique", {"critique.rounds": 2}, {"prompts": "abc"})
    run.finish_stage("critique", {"records": 3})
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "done" and manifest["counts"] == {"records": 3} and manifest["error"] is None


PAIR = {"id": "p1", "prompt": "q", "response_a": "a", "response_b": "b"}


def test_typed_readers_name_the_file_line_even_after_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n\n" + json.dumps({"id": "p2", "prompt": "q", "response_a": "a"}) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:4: missing field 'response_b'"):
        read_pairs(path)
    path.write_text(json.dumps({**PAIR, "history": [{"role": "robot", "text": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: field 'history'"):
        read_pairs(path)
    with pytest.raises(UserError, match=r"missing.jsonl: not found; run stage 'pairs' first"):
        read_pairs(tmp_path / "missing.jsonl")


def test_critique_and_label_readers_check_their_own_fields(tmp_path):
    critiques = tmp_path / "critiques.jsonl"
    append_records(critiques, [{"id": "c", "kind": "other", "prompt": "p", "final_response": "r"}])
    with pytest.raises(UserError, match=r"critiques.jsonl:1: field 'kind': expected red_team or helpful"):
        read_critiques(critiques)
    labels = tmp_path / "ai_labels.jsonl"
    append_records(
        labels, [{**PAIR, "principle_id": "harm", "p_a": 0.3}, {**PAIR, "id": "p2", "principle_id": "harm", "p_a": 1.5}]
    )
    with pytest.raises(UserError, match=r"ai_labels.jsonl:2: field 'p_a': expected a probability in \[0, 1\], got 1.5"):
        read_ai_labels(labels)
    labels.write_text(json.dumps({**PAIR, "principle_id": "harm", "p_a": 0.3}) + "\n")
    assert read_ai_labels(labels)[0]["p_a"] == 0.3


def test_every_artefact_has_one_place_and_one_maker(tmp_path):
    run = RunDir(tmp_path)
    paths = [run.path(name) for name in ARTEFACTS]
    assert len(set(paths)) == len(paths)
    assert (
        run.path("pairs") == tmp_path / "data" / "pairs.jsonl" and run.path("sl_cai") == tmp_path / "models" / "sl-cai"
    )


def test_fingerprints_follow_content_and_archive_moves_without_deleting(tmp_path):
    run = RunDir(tmp_path)
    assert run.fingerprint("pairs") is None
    append_records(run.path("pairs"), [PAIR])
    before = run.fingerprint("pairs")
    append_records(run.path("pairs"), [{**PAIR, "id": "p2"}])
    assert run.fingerprint("pairs") != before
    model = run.path("sl_cai")
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"1234")
    model_print = run.fingerprint("sl_cai")
    (model / "model.safetensors").write_bytes(b"123456")
    assert run.fingerprint("sl_cai") != model_print
    (run.checkpoints("pairs") / "checkpoint-1").mkdir(parents=True)
    run.start_stage("pairs", {}, {})
    run.finish_stage("pairs", {"pairs": 2})
    target = run.archive(["pairs"])
    assert not run.path("pairs").exists() and not run.checkpoints("pairs").exists()
    assert len(read_records(target / "data" / "pairs.jsonl")) == 2
    assert (target / "checkpoints" / "pairs" / "checkpoint-1").is_dir()
    assert json.loads((target / "manifest.json").read_text())["stages"]["pairs"]["status"] == "done"
    assert run.stage_status("pairs") == "pending" and run.path("sl_cai").exists()
    assert run.archive(["pairs"]) != target  # a second archive in the same second gets its own folder


def test_write_records_atomic_replaces_the_whole_file(tmp_path):
    from constitutional.records import write_records_atomic

    path = tmp_path / "new" / "rows.jsonl"
    write_records_atomic(path, [PAIR, {**PAIR, "id": "p2"}])
    assert [row["id"] for row in read_records(path)] == ["p1", "p2"]
    write_records_atomic(path, [{**PAIR, "id": "p3"}])
    assert [row["id"] for row in read_records(path)] == ["p3"]
    write_records_atomic(path, [])
    assert path.exists() and read_records(path) == [] and not path.with_name("rows.jsonl.tmp").exists()
