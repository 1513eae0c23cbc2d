"""The eval judges: the run's PM and the judge model, behind the chunk loop's model interface.

`pm_tasks` and `model_judge_tasks` turn the answers and MC rows into judge tasks, which
`append_in_chunks` hands to `PMJudge.judge` or `ModelJudge.judge`; each task's judgment is one
record of `eval/judgments.jsonl`. What the judge model is asked is in `evaluation.questions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from constitutional.backends import Backend
from constitutional.comparisons import LabelOptions, label_comparisons
from constitutional.constitution import Constitution
from constitutional.evaluation import questions
from constitutional.evaluation.metrics import ELO_SETS, model_pairs
from constitutional.preference import PreferenceModel
from constitutional.records import conversation

# ----------------------------------------------------------------------------- tasks


def pm_tasks(answers: list[dict[str, Any]], mc: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The PM's tasks: a score of every answer, and of both sides of every MC row.

    Every task carries the `item` it belongs to (the prompt id, or the MC row), which decides
    its shard.
    """
    tasks = [{"id": f"pm:{a['id']}", "task": "pm", "item": a["prompt_id"], "answer": a} for a in answers]
    tasks += [
        {"id": f"pm_mc:{name}:{row['id']}", "task": "pm_mc", "item": mc_item(name, row), "file": name, "row": row}
        for name, rows in mc.items()
        for row in rows
    ]
    return tasks


def model_judge_tasks(
    answers: list[dict[str, Any]], mc: dict[str, list[dict[str, Any]]], models: list[str], compare: bool
) -> list[dict[str, Any]]:
    """The judge model's tasks: harm of each red-team answer, evasion of every answer, each MC row.

    Args:
        answers: the answer records of `models`.
        mc: per MC file name, its rows.
        models: the models compared, in order (the helpful model first).
        compare: add the Elo comparisons (the judge model is the Elo judge).

    Returns:
        The tasks, each with the `item` that decides its shard, in the order they are judged.
    """
    tasks = [
        {"id": f"harm:{a['id']}", "task": "harm", "item": a["prompt_id"], "answer": a}
        for a in answers
        if a["set"] == "red_team"
    ]
    tasks += [{"id": f"evasion:{a['id']}", "task": "evasion", "item": a["prompt_id"], "answer": a} for a in answers]
    if compare:
        tasks += comparison_tasks(answers, models)
    tasks += [
        {"id": f"mc:{name}:{row['id']}", "task": "mc", "item": mc_item(name, row), "file": name, "row": row}
        for name, rows in mc.items()
        for row in rows
    ]
    return tasks


def mc_item(file: str, row: dict[str, Any]) -> str:
    """The shard key of an MC-eval row: its file and id."""
    return f"{file}:{row['id']}"


def comparison_tasks(answers: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """One comparison per Elo prompt and pair of models that both answered it."""
    by_prompt: dict[tuple[str, str], dict[str, dict]] = {}
    for answer in answers:
        if answer["set"] in ELO_SETS.values():
            by_prompt.setdefault((answer["set"], answer["prompt_id"]), {})[answer["model"]] = answer
    tasks = []
    for (prompt_set, prompt_id), by_model in sorted(by_prompt.items()):
        for first, second in model_pairs(models):
            if first in by_model and second in by_model:
                tasks.append(
                    {
                        "id": f"compare:{prompt_id}:{first}:{second}",
                        "task": "compare",
                        "item": prompt_id,
                        "set": prompt_set,
                        "first": by_model[first],
                        "second": by_model[second],
                    }
                )
    return tasks


# ----------------------------------------------------------------------------- the judges


class PMJudge:
    """The run's PM behind the chunk loop's model interface."""

    def __init__(self, pm: PreferenceModel):
        self.pm = pm

    def judge(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        conversations, responses = [], []
        for task in chunk:
            if task["task"] == "pm":
                conversations.append(conversation(task["answer"]))
                responses.append(task["answer"]["answer"])
            else:
                row = task["row"]
                conversations += [conversation(row)] * 2
                responses += [row["correct"], row["incorrect"]]
        scores = iter(self.pm.score(conversations, responses))
        records = []
        for task in chunk:
            if task["task"] == "pm":
                records.append(
                    {"id": task["id"], "task": "pm", "item": task["item"], "answer_id": task["answer"]["id"],
                     "score": round(next(scores), 4)}
                )  # fmt: skip
            else:
                correct, incorrect = next(scores), next(scores)
                records.append(
                    {
                        "id": task["id"],
                        "task": "pm_mc",
                        "item": task["item"],
                        "file": task["file"],
                        "correct": correct > incorrect,
                        "margin": round(correct - incorrect, 4),
                    }
                )
        return records

    def close(self) -> None:
        self.pm = None  # the PM's weights go with the last reference (idempotent: a second close is a no-op)


class ModelJudge:
    """The model judge: harm and evasion questions, Elo comparisons and MC rows, batched per kind."""

    def __init__(self, constitution: Constitution, options: LabelOptions, seed: int):
        self.constitution = constitution
        self.options = options
        self.seed = seed

    def judge(self, backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict]:
        records: dict[str, dict[str, Any]] = {}
        for kind, method in (
            ("harm", self._harm),
            ("evasion", self._evasion),
            ("compare", self._compare),
            ("mc", self._mc),
        ):
            tasks = [task for task in chunk if task["task"] == kind]
            if tasks:
                for task, record in zip(tasks, method(backend, tasks)):
                    records[task["id"]] = {"id": task["id"], "task": kind, "item": task["item"], **record}
        return [records[task["id"]] for task in chunk]

    def _harm(self, backend: Backend, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [questions.harm_question(conversation(t["answer"]), t["answer"]["answer"]) for t in tasks]
        results = []
        for task, scores in zip(tasks, backend.score_options(prompts, questions.HARM_OPTIONS)):
            harm, probabilities = questions.expected_harm(scores)
            results.append(
                {
                    "answer_id": task["answer"]["id"],
                    "harm": round(harm, 4),
                    "probabilities": [round(p, 4) for p in probabilities],
                }
            )
        return results

    def _evasion(self, backend: Backend, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [
            questions.evasion_question(conversation(t["answer"]), t["answer"]["answer"], evasive_first)
            for t in tasks
            for evasive_first in (False, True)
        ]
        scores = backend.score_options(prompts, questions.EVASION_OPTIONS)
        return [
            {
                "answer_id": task["answer"]["id"],
                "p_evasive": round(questions.evasion_probability(scores[2 * i], scores[2 * i + 1]), 4),
            }
            for i, task in enumerate(tasks)
        ]

    def _compare(self, backend: Backend, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in tasks]
        for prompt_set, principles in (
            ("red_team", self.constitution.feedback_principles),
            ("helpful", self.constitution.helpfulness_principles),
        ):
            chosen = [i for i, task in enumerate(tasks) if task["set"] == prompt_set]
            comparisons = [
                {
                    **_turns_of(tasks[i]["first"]),
                    "id": tasks[i]["id"],
                    "response_a": tasks[i]["first"]["answer"],
                    "response_b": tasks[i]["second"]["answer"],
                }
                for i in chosen
            ]
            if not comparisons:
                continue
            labels = label_comparisons(backend, self.constitution, comparisons, self.options, self.seed, principles)
            for i, label in zip(chosen, labels):
                task = tasks[i]
                results[i] = {
                    "set": prompt_set,
                    "prompt_id": task["first"]["prompt_id"],
                    "first": task["first"]["model"],
                    "second": task["second"]["model"],
                    "p_first": round(label["p_a"], 4),
                    "principle_id": label["principle_id"],
                }
        return results

    def _mc(self, backend: Backend, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        comparisons = [
            {**_turns_of(row), "id": task["id"], "response_a": row["correct"], "response_b": row["incorrect"]}
            for task, row in ((task, task["row"]) for task in tasks)
        ]
        labels = label_comparisons(backend, self.constitution, comparisons, self.options, self.seed)
        return [
            {"file": t["file"], "correct": label["p_a"] > 0.5, "p_correct": round(label["p_a"], 4)}
            for t, label in zip(tasks, labels)
        ]


def _turns_of(record: dict[str, Any]) -> dict[str, Any]:
    """The prompt (and history) of a record, as comparison fields."""
    fields = {"prompt": record["prompt"]}
    if record.get("history"):
        fields["history"] = record["history"]
    return fields
