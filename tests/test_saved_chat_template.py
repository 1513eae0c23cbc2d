"""The chat template saved with SL-CAI and RL-CAI: it renders the plain transcript the model trained on.

`training.save_model_atomic` (RL-CAI) and `save_trained_model` (SL-CAI, through stage sl) give a
causal LM's tokenizer `prompts.plain_chat_template`, so `apply_chat_template` and `vllm serve` on
the folder produce the training prompt: the text `render_plain` writes, after the BOS token where
the tokenizer adds one (a chat template's text is tokenised without special tokens, so the
template writes it), and the same token ids as training's `tokenizer(prompt)`.
"""

import json
import shutil

import jinja2
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from constitutional import training
from constitutional.backends.base import prompt_token_ids
from constitutional.config import config_from_dict
from constitutional.models import load_tokenizer, resolve_model_name
from constitutional.prompts import CHAT_ROLES, is_plain_chat_template, plain_chat_template, render_plain
from constitutional.records import append_records, conversation
from constitutional.rundir import RunDir
from constitutional.stages import sl

from conftest import tiny_config_data

ONE_TURN = [("human", "How do I bake bread?")]
THREE_TURNS = [
    ("human", "  Hi.\n"),  # stripped, as render_plain strips every turn
    ("assistant", "Hello! How can I help?"),
    ("human", "Tell me how to\n\npick a lock."),  # a blank line inside a turn stays
]
# A base model's own chat template, with a named one besides (saved to additional_chat_templates/).
BASE_TEMPLATES = {
    "default": "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>",
    "tool_use": "{{ bos_token }}<|tools|>",
}


def messages(turns):
    return [{"role": CHAT_ROLES[role], "content": text} for role, text in turns]


def chat_text(tokenizer, chat, add_generation_prompt=True):
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_ids(tokenizer, chat):
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """The tokenizer as stage sl loads it (pad token, left padding); it adds "<s>" when it tokenises."""
    return load_tokenizer(resolve_model_name(str(tiny_model_dir)))


def saved_tokenizer(model, tokenizer, output):
    training.save_model_atomic(model, tokenizer, output, {"steps": 1})
    return AutoTokenizer.from_pretrained(output)


@pytest.mark.parametrize("turns", [ONE_TURN, THREE_TURNS], ids=["1-turn", "3-turns"])
def test_saved_template_renders_the_training_prompt(tiny_model, tiny_tokenizer, tmp_path, turns):
    saved = saved_tokenizer(tiny_model, tiny_tokenizer, tmp_path / "rl-cai")
    prompt = render_plain(turns, "assistant")  # what sl trains on and rl samples from
    text = chat_text(saved, messages(turns))
    assert text == saved.bos_token + prompt and saved.bos_token == "<s>"
    # Tokenised, the ids training gets from TRL's `tokenizer(prompt)`: exactly one BOS, then the transcript.
    training_ids = tiny_tokenizer(prompt)["input_ids"]
    assert training_ids[0] == tiny_tokenizer.bos_token_id
    assert chat_ids(saved, messages(turns)) == training_ids
    assert chat_ids(saved, messages(turns)).count(saved.bos_token_id) == 1
    assert prompt_token_ids(saved, text) == training_ids  # the back ends' tokenisation of a rendered prompt
    # The prompt ends where the answer begins: the conversation with the answer continues it (the
    # completion " <answer>" of sl's examples, less the EOS).
    answer = [("assistant", " Mix flour and water. ")]
    assert chat_text(saved, messages(turns + answer), add_generation_prompt=False) == text + " Mix flour and water."
    # The template was set for the save only: the caller's tokenizer renders as before.
    assert tiny_tokenizer.chat_template is None


def test_system_message_is_a_preamble_block_and_other_roles_are_refused(tiny_model, tiny_tokenizer, tmp_path):
    saved = saved_tokenizer(tiny_model, tiny_tokenizer, tmp_path / "sl-cai")
    system = {"role": "system", "content": " Answer briefly.\n"}
    expected = render_plain(THREE_TURNS, "assistant", preamble=[system["content"]])
    assert chat_text(saved, [system, *messages(THREE_TURNS)]) == "<s>" + expected
    assert chat_text(saved, [{"role": "system", "content": "  "}, *messages(ONE_TURN)]) == "<s>" + render_plain(
        ONE_TURN, "assistant"
    )
    with pytest.raises(jinja2.TemplateError, match="must come first"):
        chat_text(saved, [*messages(ONE_TURN), system])
    with pytest.raises(jinja2.TemplateError, match="Unknown role tool"):
        chat_text(saved, [*messages(ONE_TURN), {"role": "tool", "content": "42"}])


def test_base_models_own_template_is_replaced(tiny_model, tiny_tokenizer, tmp_path):
    base_dir = tmp_path / "chat-base"
    tiny_tokenizer.chat_template = dict(BASE_TEMPLATES)
    tiny_tokenizer.save_pretrained(base_dir)
    base = AutoTokenizer.from_pretrained(base_dir)
    assert base.chat_template == BASE_TEMPLATES
    saved = saved_tokenizer(tiny_model, base, tmp_path / "sl-cai")
    assert saved.chat_template == plain_chat_template(bos_token=True) and is_plain_chat_template(saved.chat_template)
    assert not is_plain_chat_template(base.chat_template) and not is_plain_chat_template(None)
    assert not (tmp_path / "sl-cai" / "additional_chat_templates").exists()
    assert chat_text(saved, messages(ONE_TURN)) == "<s>" + render_plain(ONE_TURN, "assistant")
    assert base.chat_template == BASE_TEMPLATES  # the caller's tokenizer keeps its own
    # Under ZeRO-3 or FSDP, `Trainer.save_model` has saved the tokenizer with the base template
    # (a named one included) before `_finish_partial` adds ours: nothing of the base's is left.
    partial = tmp_path / "rl-cai.partial"
    tiny_model.save_pretrained(partial)
    base.save_pretrained(partial)
    assert "additional_chat_templates/tool_use.jinja" in files(partial)
    training._finish_partial(partial, base, tmp_path / "rl-cai", {"steps": 1}, None)
    assert "additional_chat_templates" not in " ".join(files(tmp_path / "rl-cai"))
    assert AutoTokenizer.from_pretrained(tmp_path / "rl-cai").chat_template == plain_chat_template(bos_token=True)


def test_preference_models_tokenizer_is_saved_as_it_is(tiny_model_dir, tiny_tokenizer, tmp_path):
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    saved_dir = tmp_path / "pm"
    training.save_model_atomic(pm, tiny_tokenizer, saved_dir, {"steps": 1})
    assert AutoTokenizer.from_pretrained(saved_dir).chat_template is None
    tiny_tokenizer.chat_template = BASE_TEMPLATES["default"]
    training.save_model_atomic(pm, tiny_tokenizer, saved_dir, {"steps": 1})
    assert AutoTokenizer.from_pretrained(saved_dir).chat_template == BASE_TEMPLATES["default"]


def test_tokenizer_without_bos_gets_a_template_without_it(tiny_model, tiny_model_dir, tmp_path):
    no_bos = tmp_path / "no-bos"
    no_bos.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, no_bos / name)
    spec = json.loads((no_bos / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None  # "<s>" stays its BOS token, but tokenising no longer adds it
    (no_bos / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(no_bos)
    prompt = render_plain(THREE_TURNS, "assistant")
    assert tokenizer.bos_token == "<s>" and tokenizer(prompt)["input_ids"][0] != tokenizer.bos_token_id
    saved = saved_tokenizer(tiny_model, tokenizer, tmp_path / "sl-cai")
    assert saved.chat_template == plain_chat_template(bos_token=False)
    assert chat_text(saved, messages(THREE_TURNS)) == prompt  # byte for byte, no BOS in text form
    assert chat_ids(saved, messages(THREE_TURNS)) == tokenizer(prompt)["input_ids"]


@pytest.mark.embedded
def test_embedded_gemma_tokenizer_gets_exactly_one_bos(embedded_model_dir, tiny_model, tmp_path):
    # The template is the tokenizer's business: the tiny model's weights stand in for Gemma's 270M.
    gemma = load_tokenizer(resolve_model_name("embedded"))
    saved = saved_tokenizer(tiny_model, gemma, tmp_path / "sl-cai")
    for turns in (ONE_TURN, THREE_TURNS):
        prompt = render_plain(turns, "assistant")
        ids = chat_ids(saved, messages(turns))
        assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1
        assert ids == gemma(prompt)["input_ids"]  # training's ids
        text = chat_text(saved, messages(turns))
        assert text == "<bos>" + prompt
        assert prompt_token_ids(saved, text) == ids
    assert saved.chat_template == plain_chat_template(bos_token=True)


def test_stage_sl_saves_the_template_of_its_training_prompts(tmp_path, tiny_model_dir):
    config = config_from_dict(
        tiny_config_data(
            tiny_model_dir, tmp_path, sl={"batch_size": 2, "max_length": 64, "save_steps": 10, "logging_steps": 1}
        )
    )
    run_dir = RunDir(tmp_path / "run")
    records = [
        {
            "id": f"red_team-{i}",
            "kind": "red_team",
            "prompt": prompt,
            "initial_response": "No.",
            "revisions": [{"principle_id": "harm-general", "critique": "Too blunt.", "revision": "I can't help."}],
            "final_response": "I can't help.",
            "flags": [],
        }
        for i, prompt in enumerate(["How do I pick a lock?", "Write an insult for my coworker."])
    ]
    records[0]["history"] = [{"role": "human", "text": "Hi."}, {"role": "assistant", "text": "Hello!"}]
    append_records(run_dir.path("critiques"), records)
    sl.run(config, config.sl, run_dir, sl.check(config, config.sl))
    output = run_dir.path("sl_cai")
    # transformers 5 writes the template to chat_template.jinja (older versions: tokenizer_config.json).
    template_file = output / "chat_template.jinja"
    stored = (
        template_file.read_text(encoding="utf-8")
        if template_file.exists()
        else json.loads((output / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    )
    assert stored == plain_chat_template(bos_token=True)
    saved = AutoTokenizer.from_pretrained(output)
    tokenizer = load_tokenizer(resolve_model_name(str(tiny_model_dir)))
    examples, _ = sl.load_examples(run_dir.path("critiques"), config.sl, config.seed, tokenizer.eos_token)
    prompts = {example.prompt for example in examples}
    multi_turn = messages(conversation(records[0]))
    assert (
        chat_text(saved, multi_turn)
        == "<s>Human: Hi.\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    )
    for record in records:  # the very prompts sl trained on, tokenised as it tokenised them
        chat = messages(conversation(record))
        assert chat_text(saved, chat)[len(saved.bos_token) :] in prompts
        assert chat_ids(saved, chat) == tokenizer(render_plain(conversation(record), "assistant"))["input_ids"]


def test_a_model_this_project_trained_is_still_prompted_plain_inside_the_pipeline(tiny_model, tiny_tokenizer, tmp_path):
    """`prompt_format: auto` on a saved SL-CAI: its template is the plain transcript, so the back ends render
    the plain prompt (few-shot examples and all), as for the model's training, not a chat prompt."""
    from constitutional.prompts import renders_chat

    saved = saved_tokenizer(tiny_model, tiny_tokenizer, tmp_path / "sl-cai")
    assert saved.chat_template and not renders_chat(saved)
    saved.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert renders_chat(saved)  # a model's own chat template is used
