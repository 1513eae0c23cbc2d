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


def test_the_rl_held_out_difference_is_shown_as_the_pms_figure_not_a_verdict(tmp_path):
    run = RunDir(tmp_path / "run")
    append_records(run.path("rl_metrics"), [{"step": 1, "mean_reward": -6.0, "kl": 0.01}])
    counts = {"held_out_prompts": 32, "held_out_reward_difference": 0.994,
              "held_out_reward_difference_ci95": [0.197, 1.792]}  # fmt: skip
    run.manifest_path.write_text(json.dumps({"stages": {"rl": {"status": "done", "counts": counts}}}), encoding="utf-8")
    report = build_report(run)
    assert "On 32 held-out prompts" in report and "+0.99 [95% CI +0.20, +1.79]" in report
    assert "excludes zero" in report and "Scored by the PM that RL optimised" in report
    counts["held_out_reward_difference_ci95"] = [-0.5, 1.8]
    run.manifest_path.write_text(json.dumps({"stages": {"rl": {"status": "done", "counts": counts}}}), encoding="utf-8")
    assert "contains zero" in build_report(run)
