"""`cai report` on a run whose config.yaml no longer parses: it says so, and shows no other constitution's texts."""

import html
import json
import logging

from constitutional.constitution import load_constitution
from constitutional.evaluation.report import build_report
from constitutional.records import append_records
from constitutional.rundir import RunDir


def test_a_config_that_no_longer_parses_leaves_the_principle_texts_out_and_says_so(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    principle = load_constitution("default", tmp_path).critique_principles[0]
    text = html.escape(principle.critique_request, quote=True)  # as the report writes it
    step = {"principle_id": principle.id, "critique": "c", "revision": "r"}
    append_records(run.path("critiques"), [{"id": "rt1", "kind": "red_team", "prompt": "p", "initial_response": "i",
                                            "revisions": [step], "final_response": "r"}])  # fmt: skip
    run.manifest_path.write_text(json.dumps({"stages": {}}), encoding="utf-8")
    run.config_path.write_text("constitution: default\n", encoding="utf-8")
    assert text in build_report(run)  # readable: the run's own texts
    run.config_path.write_text("constitution: [unclosed\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        report = build_report(run)
    assert text not in report and principle.id in report
    assert "not a readable config; principle texts left out" in caplog.text
