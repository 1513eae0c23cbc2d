import json

import pytest

from constitutional.errors import UserError
from constitutional.records import RunDir, append_records, read_records


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
    run.start_stage("critique", {"prompts": "abc"})
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "running" and manifest["inputs"] == {"prompts": "abc"}
    assert "torch" in manifest["versions"] and manifest["started"]
    run.fail_stage("critique", "interrupted")
    assert run.stage_status("critique") == "failed"
    run.start_stage("critique", {"prompts": "abc"})
    run.finish_stage("critique", {"records": 3})
    manifest = run.read_manifest()["stages"]["critique"]
    assert manifest["status"] == "done" and manifest["counts"] == {"records": 3} and manifest["error"] is None
