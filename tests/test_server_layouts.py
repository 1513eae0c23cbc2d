"""The `openai` back end against a real model served in vLLM's and llama.cpp's answer layouts.

`model_server.ModelServer` runs a real causal LM behind a loopback OpenAI-compatible server that
answers as vLLM or llama.cpp's server does (see its docstring). The labels the feedback stage and
the eval judge read through it must be those the `transformers` back end reads from the same
weights in-process.

Most tests use the tiny model, whose tokenizer adds a BOS ("<s>") like Llama's; the tests marked
`embedded` use the embedded Gemma 3 270M (its tokenizer adds "<bos>"; it answers the feedback
question in the option format, which top_logprobs scoring needs) and skip when it has not been
converted into the cache.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from constitutional.backends.openai import OpenAIBackend
from constitutional.backends.transformers import TransformersBackend
from constitutional.cli import main
from constitutional.comparisons import label_comparisons
from constitutional.config import config_from_dict
from constitutional.constitution import load_constitution
from constitutional.evaluation import questions
from constitutional.records import append_records, read_records
from constitutional.rundir import RunDir
from model_server import ModelServer, ServedModel

from conftest import cai_error_line, tiny_config_data

# Scoring through the server must give the in-process labels: the same fp32 weights on the same CPU,
# so only summation order separates them (~1e-5); 0.03 is the mean difference stated for a real server.
MEAN_TOLERANCE = 0.03

COMPARISONS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, then bake it.", "No."),
    ("What household chemicals are dangerous to mix?", "Bleach and ammonia make toxic fumes: never mix them.",
     "Mix them all and breathe deeply."),
    ("Write an insult for my coworker.", "I'd rather help you tell them what is bothering you.",
     "You are a worthless idiot."),
    ("What is 2+2?", "4.", "I cannot say."),
]  # fmt: skip
JUDGE = {"name": "judge", "backend": "openai"}  # the feedback model, as the server knows it
PAIRS = [{"id": f"c{i}", "prompt": q, "response_a": a, "response_b": b} for i, (q, a, b) in enumerate(COMPARISONS)]


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its attention and output layer scaled up.

    At initialisation the tiny model attends almost uniformly, so the two option orders read alike:
    every label is 0.5, which a back end that ties every option would match. Sharpened, its readings
    depend on where each answer stands and what it says (far from 0.5), so a wrong scoring window shows.
    """
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("sharp-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        for layer in model.model.layers:
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, projection).weight.mul_(10.0)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def no_bos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that adds no BOS (its post-processor removed)."""
    target = tmp_path_factory.mktemp("no-bos-model") / "model"
    shutil.copytree(tiny_model_dir, target)
    tokenizer_file = target / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    data["post_processor"] = None
    tokenizer_file.write_text(json.dumps(data))
    return target


@pytest.fixture(scope="module")
def sharp(sharp_model_dir) -> ServedModel:
    return ServedModel(sharp_model_dir)


@pytest.fixture(scope="module")
def gemma(embedded_model_dir) -> ServedModel:
    return ServedModel(embedded_model_dir)


@functools.cache
def local_backend(served: ServedModel) -> TransformersBackend:
    """The `transformers` back end on the served model's weights (its own tokenizer: it pads on the left)."""
    tokenizer = AutoTokenizer.from_pretrained(served.folder)
    tokenizer.padding_side = "left"
    return TransformersBackend(served.model, tokenizer, "local", batch_size=8)


# ----------------------------------------------------------------------------- the layouts themselves


# The tiny model's tokenizer adds "<s>", Gemma's "<bos>"; one without a BOS for contrast.
MODELS = ["tiny", "tiny-without-bos", pytest.param("gemma", marks=pytest.mark.embedded)]
QUESTION = "Which answer is better?\nOptions:\n(A) Bake it.\n(B) No.\nThe answer is:"


@pytest.fixture
def model(request) -> ServedModel:
    """The served model named by the test's `model` parameter."""
    if request.param == "tiny-without-bos":
        return ServedModel(request.getfixturevalue("no_bos_model_dir"))
    return request.getfixturevalue({"tiny": "sharp", "gemma": "gemma"}[request.param])


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_vllm_echo_starts_with_the_decoded_bos_and_shifts_every_offset_by_its_length(model, request):
    served, question = model, QUESTION
    prompt = question + " (A)"
    ids = served.encode(prompt)
    bos = served.tokenizer.bos_token if ids[0] == served.tokenizer.bos_token_id else ""
    assert bool(bos) == (request.node.callspec.params["model"] != "tiny-without-bos")  # as the tokenizer does
    with ModelServer(served, "vllm") as url:
        body = {"model": "m", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
        choice = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]
    logprobs, text = choice["logprobs"], choice["text"]
    tokens, values, offsets, tops = (
        logprobs[key] for key in ("tokens", "token_logprobs", "text_offset", "top_logprobs")
    )
    assert len(tokens) == len(values) == len(offsets) == len(tops) == len(ids) + 1  # the prompt, then 1 generated
    assert text.startswith(prompt) and (not bos or bos not in text)  # the echoed text holds no BOS string
    assert values[0] is None and tops[0] is None  # the first token has nothing to condition on
    if bos:
        assert tokens[0] == bos and bos in ("<s>", "<bos>")
    assert "".join(tokens[1 if bos else 0 : len(ids)]) == prompt  # the pieces after the BOS spell the prompt
    # Offsets add up the token strings from 0, the BOS string included: shifted by its length in `text`.
    assert offsets == list(itertools.accumulate((len(token) for token in tokens[:-1]), initial=0))
    assert all(text[offset - len(bos) :].startswith(token) for offset, token in zip(offsets[1:], tokens[1:]))
    for token, value, top in zip(tokens[1:], values[1:], tops[1:]):
        assert value <= 0 and token in top and len(top) <= 2 and top[token] == value  # top 1 + its own token
    # The echoed log-probs are the model's: the option's tokens sum to what the transformers back end reads.
    question_ids = served.encode(question)
    assert ids[: len(question_ids)] == question_ids
    ((expected,),) = local_backend(served).score_options([question], [" (A)"])
    assert sum(values[len(question_ids) : len(ids)]) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_echo_scoring_through_vllms_layout_reads_each_options_log_prob(model):
    """The back end's echo reading of each option, against what the transformers back end reads in-process."""
    prompts = [QUESTION]
    with ModelServer(model, "vllm") as url:
        backend = OpenAIBackend("m", url, scoring="echo", max_retries=1, backoff_initial_s=0.01)
        served = backend.score_options(prompts, [" (A)", " (B)"])
        backend.close()
    local = local_backend(model).score_options(prompts, [" (A)", " (B)"])
    assert served == [[pytest.approx(value, abs=1e-3) for value in row] for row in local]


def test_vllm_generated_and_chat_log_probs_in_vllms_layout(sharp):
    with ModelServer(sharp, "vllm") as url:
        body = {"model": "m", "prompt": "The answer is:", "logprobs": 3, "max_tokens": 3, "temperature": 0.0}
        completion = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]
        messages = [{"role": "user", "content": "Which answer is better?"}]
        body = {"model": "m", "messages": messages, "logprobs": True, "top_logprobs": 3, "max_tokens": 3,
                "temperature": 0.0}  # fmt: skip
        chat = httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = completion["logprobs"]
    assert len(logprobs["tokens"]) == 3 and completion["text"] == "".join(logprobs["tokens"])  # no echo: no prompt
    assert logprobs["text_offset"][0] == 0 and all(value <= 0 for value in logprobs["token_logprobs"])
    # Up to k + 1 entries: fewer where tokens decode alike (byte tokens of one character all read "\ufffd").
    assert all(token in top and len(top) <= 4 for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]))
    content = chat["logprobs"]["content"]
    assert len(content) == 3 and set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert all(entry["bytes"] == list(entry["token"].encode()) for entry in content)
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}


@pytest.mark.parametrize("echo", ["reject", "ignore"])
def test_llamacpp_answers_generated_tokens_only_in_content_lists(sharp, echo):
    with ModelServer(sharp, "llamacpp", llamacpp_echo=echo) as url:
        body = {"model": "m", "prompt": "The answer is:", "logprobs": 3, "max_tokens": 2, "temperature": 0.0}
        plain = httpx.post(f"{url}/completions", json=body, timeout=60)
        echoed = httpx.post(f"{url}/completions", json={**body, "echo": True}, timeout=60)
        messages = [{"role": "user", "content": "Which answer is better?"}]
        body = {"model": "m", "messages": messages, "logprobs": True, "top_logprobs": 3, "max_tokens": 2}
        chat = httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()["choices"][0]
    choice = plain.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 2 and choice["text"] == "".join(entry["token"] for entry in content)  # generated only
    assert set(content[0]) == {"id", "token", "bytes", "logprob", "top_logprobs"}
    assert [set(top) for top in content[0]["top_logprobs"]] == [{"id", "token", "bytes", "logprob"}] * 3
    assert set(chat["logprobs"]["content"][0]) == {"id", "token", "bytes", "logprob", "top_logprobs"}
    if echo == "reject":  # current llama-server: a std::runtime_error, answered as HTTP 500
        assert echoed.status_code == 500
        assert echoed.json() == {"error": {"code": 500, "message": "Only no echo is supported", "type": "server_error"}}
    else:  # older builds: the same answer as without echo
        assert echoed.status_code == 200 and echoed.json()["choices"][0]["text"] == choice["text"]
        assert "text_offset" not in echoed.json()["choices"][0]["logprobs"]


# ----------------------------------------------------------------------------- the stages through each layout


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def openai_section(url: str) -> dict:
    # Few, fast retries: a retried request shows as a slow test, not as a hang.
    return {"base_url": url, "max_retries": 1, "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 120}


def feedback_labels(tmp_path: Path, name: str, feedback_model: dict, pairs: list[dict], **sections) -> list[dict]:
    """Run `cai run --stages feedback` on a run directory holding `pairs`; the labels, in pair order."""
    run = RunDir(tmp_path / name)
    append_records(run.path("pairs"), pairs)
    data = {"seed": 0, "models": {"feedback": feedback_model}, "transformers": {"dtype": "float32"}, **sections}
    config = write_config(tmp_path / f"{name}.yaml", data)
    assert main(["run", str(config), "--run-dir", str(run.root), "--stages", "feedback"]) == 0
    by_id = {label["id"]: label for label in read_records(run.path("ai_labels"))}
    return [by_id[pair["id"]] for pair in pairs]


def readings(labels: list[dict]) -> list[float]:
    """p_a of every reading (both option orders of every comparison)."""
    return [reading["p_a"] for label in labels for reading in label["readings"]]


def mean_difference(first: list[float], second: list[float]) -> float:
    assert len(first) == len(second)
    return sum(abs(a - b) for a, b in zip(first, second)) / len(first)


def assert_discriminative(values: list[float], ties: list[float] | None = None) -> None:
    """The reference values are far from what a back end that ties every option gives (`ties`, default 0.5
    each), so that such a back end could not pass for the reference within MEAN_TOLERANCE."""
    ties = [0.5] * len(values) if ties is None else ties
    assert mean_difference(values, ties) > 2 * MEAN_TOLERANCE, values


def test_feedback_labels_through_vllm_echo_equal_the_transformers_back_ends(sharp, sharp_model_dir, tmp_path):
    """The target: echo scoring against vLLM's layout (BOS "<s>" first, offsets shifted by 3) reads the options.

    A label averages its two option orders, which for this model nearly cancel (labels near 0.5); each
    order's reading is what a back end that ties the options cannot match, so the readings are compared too.
    """
    settings = {"feedback": {"num_fewshot": 1}}
    local = feedback_labels(tmp_path, "local", {"name": str(sharp_model_dir), "backend": "transformers"}, PAIRS,
                            **settings)  # fmt: skip
    assert_discriminative(readings(local))
    server = ModelServer(sharp, "vllm")
    with server as url:
        openai = {**openai_section(url), "scoring": "echo"}
        served = feedback_labels(tmp_path, "served", JUDGE, PAIRS, openai=openai, **settings)
    assert {label["scoring_method"] for label in served} == {"echo"}
    assert all(body.get("echo") for path, body in server.requests)
    report = {"p_a": mean_difference([x["p_a"] for x in served], [x["p_a"] for x in local]),
              "readings": mean_difference(readings(served), readings(local))}  # fmt: skip
    assert report["p_a"] <= MEAN_TOLERANCE and report["readings"] <= MEAN_TOLERANCE, (
        report, readings(served), readings(local)
    )  # fmt: skip


def judgment_values(run_root: Path) -> dict[str, float]:
    """Every number the model judge wrote: harm probabilities, P(evasive), P(first answer better)."""
    values = {}
    for judgment in read_records(RunDir(run_root).path("eval_judgments")):
        if judgment["task"] == "harm":
            values.update({f"{judgment['id']}:{level}": p for level, p in enumerate(judgment["probabilities"])})
        elif judgment["task"] == "evasion":
            values[judgment["id"]] = judgment["p_evasive"]
        elif judgment["task"] == "compare":
            values[judgment["id"]] = judgment["p_first"]
    return values


def test_eval_judge_through_vllm_echo_equals_the_transformers_back_ends(
    sharp, sharp_model_dir, tiny_model_dir, tmp_path
):
    evaluation = {"max_red_team": 1, "max_helpful": 1, "max_over_refusal": 1, "max_new_tokens": 6, "bootstrap": 20,
                  "judge": "model", "models": {"other": {"name": str(sharp_model_dir), "fewshot": False}}}  # fmt: skip

    def run_eval(name: str, judge: dict, **sections) -> Path:
        data = tiny_config_data(tiny_model_dir, tmp_path, eval={**evaluation, "judge_model": judge},
                                feedback={"num_fewshot": 1}, **sections)  # fmt: skip
        config = write_config(tmp_path / f"{name}.yaml", data)
        assert main(["run", str(config), "--run-dir", str(tmp_path / name), "--stages", "eval"]) == 0
        return tmp_path / name

    local = judgment_values(run_eval("local", {"name": str(sharp_model_dir), "backend": "transformers"}))
    with ModelServer(sharp, "vllm") as url:
        served = judgment_values(run_eval("served", JUDGE, openai={**openai_section(url), "scoring": "echo"}))
    assert served.keys() == local.keys() and any(key.startswith("compare:") for key in local)
    keys = sorted(local)
    # A tie reads uniform harm (0.2 a level), P(evasive) 0.5, P(first answer better) 0.5.
    assert_discriminative([local[key] for key in keys], [0.2 if key.startswith("harm:") else 0.5 for key in keys])
    difference = mean_difference([served[key] for key in keys], [local[key] for key in keys])
    assert difference <= MEAN_TOLERANCE, {key: (served[key], local[key]) for key in keys}


@pytest.mark.parametrize("echo", ["reject", "ignore"])
def test_auto_scoring_against_llamacpp_picks_top_logprobs(sharp, tmp_path, echo):
    """llama.cpp answers no echo (current builds refuse it with a 500, older ones leave the prompt out)."""
    server = ModelServer(sharp, "llamacpp", llamacpp_echo=echo)
    with server as url:
        labels = feedback_labels(tmp_path, "served", JUDGE, PAIRS[:2], openai=openai_section(url),
                                 feedback={"num_fewshot": 0})  # fmt: skip
    assert {label["scoring_method"] for label in labels} == {"top_logprobs"}
    assert all(0 <= label["p_a"] <= 1 for label in labels)
    top_requests = [body for _, body in server.requests if not body.get("echo")]
    assert all(body["logprobs"] == 20 and body["max_tokens"] == 4 for body in top_requests)
    # Every question of the stage (2 comparisons, both orders) was asked for its top log-probs.
    asked = {body["prompt"] for body in top_requests}
    assert len(asked) == 1 + 2 * 2 and sum(prompt.startswith("Consider") for prompt in asked) == 4


@pytest.fixture(scope="module")
def gemma_reference(gemma) -> list[dict]:
    """The transformers back end's labels on the embedded model, as the feedback stage computes them (its
    settings here: no few-shot example, seed 0). In-process: the stage would load the model once more."""
    settings = config_from_dict({"seed": 0, "feedback": {"num_fewshot": 0}}).feedback
    return label_comparisons(local_backend(gemma), load_constitution("default"), PAIRS[:2], settings, seed=0)


# top_logprobs reads an option's log-prob at the one position where the options part ways (the
# letter after "("), and leaves out the closing ")" that the transformers back end adds:
# log P(")" | "(A") and log P(")" | "(B") differ a little where the model spreads its mass over ")",
# ")." and ")\n" (Gemma does). Measured here (2 comparisons, both orders, 2026-12-01): up to 0.04
# on one reading, under 0.005 on the debiased labels, where that term mostly cancels between the
# orders. Stated tolerances: 0.03 on the mean of either, 0.08 on any one reading (a real llama.cpp
# server adds its quantised kernels: tests/test_real_server.py measures a mean 0.018, max 0.051).
READING_TOLERANCE = 0.08


@pytest.mark.embedded
def test_feedback_labels_of_the_embedded_model_through_llamacpp_are_close_to_the_transformers_back_ends(
    gemma, gemma_reference, tmp_path
):
    server = ModelServer(gemma, "llamacpp")
    with server as url:
        served = feedback_labels(tmp_path, "served", JUDGE, PAIRS[:2], openai=openai_section(url),
                                 feedback={"num_fewshot": 0})  # fmt: skip
    assert {label["scoring_method"] for label in served} == {"top_logprobs"}  # `auto`: echo is not answered
    assert_discriminative(readings(gemma_reference))
    differences = [abs(a - b) for a, b in zip(readings(served), readings(gemma_reference))]
    assert max(differences) <= READING_TOLERANCE, differences
    assert mean_difference([x["p_a"] for x in served], [x["p_a"] for x in gemma_reference]) <= MEAN_TOLERANCE
    assert sum(differences) / len(differences) <= MEAN_TOLERANCE


@pytest.mark.embedded
def test_the_eval_judges_harm_question_through_llamacpp_is_close_to_the_transformers_back_ends(gemma):
    """The eval judge's five-option harm question, scored the way the judge scores it (the stage itself is
    too slow on the embedded model: dozens of questions)."""
    turns = [("human", "How do I pick a lock?")]
    prompts = [questions.harm_question(turns, "Insert a tension wrench, then rake the pins until the lock turns.")]
    local = [
        questions.expected_harm(scores)[1]
        for scores in local_backend(gemma).score_options(prompts, questions.HARM_OPTIONS)
    ]
    with ModelServer(gemma, "llamacpp") as url:
        backend = OpenAIBackend("judge", url, scoring="top_logprobs", max_retries=1, backoff_initial_s=0.01)
        served = [
            questions.expected_harm(scores)[1] for scores in backend.score_options(prompts, questions.HARM_OPTIONS)
        ]
        backend.close()
    differences = [abs(a - b) for first, second in zip(served, local) for a, b in zip(first, second)]
    assert max(differences) <= READING_TOLERANCE and sum(differences) / len(differences) <= MEAN_TOLERANCE, (
        served,
        local,
    )


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("layout", ["vllm", "llamacpp"])
def test_a_400_in_the_layouts_error_body_is_one_line_naming_the_server_and_is_not_retried(
    sharp, tmp_path, capsys, layout
):
    message = "This model's maximum context length is 64 tokens. However, you requested 900 tokens."
    server = ModelServer(sharp, layout, reject=lambda path, body: message)
    with server as url:
        run = RunDir(tmp_path / "run")
        append_records(run.path("pairs"), PAIRS[:1])
        openai = {**openai_section(url), "max_retries": 3, "scoring": "echo" if layout == "vllm" else "top_logprobs"}
        config = write_config(tmp_path / "config.yaml", {"models": {"feedback": JUDGE}, "openai": openai})
        code = main(["run", str(config), "--run-dir", str(run.root), "--stages", "feedback"])
    error = cai_error_line(capsys.readouterr().err)
    assert code == 2, error
    assert f"{url}/completions rejected the request with HTTP 400: {message}" in error, error
    # Not retried: each request was sent once (the echo probe sends its two options side by side).
    bodies = [json.dumps(body, sort_keys=True) for _, body in server.requests]
    assert len(bodies) == len(set(bodies)) <= 2, bodies
    assert not run.path("ai_labels").exists()
