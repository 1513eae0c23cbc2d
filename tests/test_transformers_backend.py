import functools

import pytest
import torch

from constitutional.backends import SamplingParams, load_backend
from constitutional.backends.cache import CachingBackend
from constitutional.backends.settings import TransformersSettings
from constitutional.backends.transformers import _length_sorted_batches

PROMPTS = [
    "Human: How do I bake bread?\n\nAssistant:",
    "Hi",
    "Note: the meeting is at 3:30pm, bring notes. Critique:",
    "Options: (A) first answer (B) second",
    "Human: x",
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(
        "transformers", str(tiny_model_dir), TransformersSettings(dtype="float32", batch_size=3), ".", 0
    )


def test_greedy_and_sampled_outputs_do_not_depend_on_batch_mates(backend):
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)):
        seeds = [11, 12, 13, 14, 15]
        batched = backend.generate(PROMPTS, params, seeds)
        alone = [backend.generate([prompt], params, [seed])[0] for prompt, seed in zip(PROMPTS, seeds)]
        assert batched == alone


def test_seeds_change_samples_and_repeat_exactly(backend):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    first = backend.generate(PROMPTS[:1] * 4, params, [1, 2, 3, 1])
    assert first[0] == first[3]
    assert len(set(first[:3])) > 1


def test_generation_stops_at_stop_strings_and_min_tokens_forces_length(backend):
    free = backend.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20))[0]
    assert len(free) > 2
    stop = free[1:3]  # a string the greedy output is known to contain
    cut = backend.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20, stop=(stop,)))[0]
    assert stop not in cut and free.startswith(cut)
    before = backend.generated_tokens
    backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, min_new_tokens=6, stop=(stop,)))
    assert backend.generated_tokens - before == 12


@pytest.mark.parametrize(
    "prompts, options",
    [
        (PROMPTS, [" (A)", " (B)", " maybe"]),  # options share " (" and a closing ")"
        (PROMPTS[:2], [" (A)", " (A) and more"]),  # one option is a prefix of the other
        # a long shared few-shot prefix, and a prompt repeated (the prefix then spans a whole prompt)
        ([PROMPTS[0] * 3 + " x", PROMPTS[0] * 3 + " y", PROMPTS[0] * 3 + " y"], [" (A)", " (B)"]),
    ],
)
def test_option_scores_match_a_reference_forward_pass(backend, prompts, options):
    scores = backend.score_options(prompts, options)
    tokenizer, model = backend.tokenizer, backend.model
    for prompt, row in zip(prompts, scores):
        for option, value in zip(options, row):
            ids = tokenizer(prompt + option, return_tensors="pt").input_ids
            start = len(tokenizer(prompt).input_ids)
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            expected = sum(float(log_probs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
            assert value == pytest.approx(expected, abs=1e-4)


def test_an_option_that_tokenises_to_nothing_is_refused(backend):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        backend.score_options(["Hi"], [""])


def test_length_sorted_batches_cover_every_index_once():
    batches = _length_sorted_batches([3, 9, 1, 7, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_cache_answers_repeats_without_the_model(backend, tmp_path):
    params = SamplingParams(max_new_tokens=5, temperature=0.7)
    cached = CachingBackend(backend, tmp_path / "cache.sqlite")
    first = cached.generate(PROMPTS, params, [1, 2, 3, 4, 5])
    assert (cached.hits, cached.misses) == (0, 5)
    before = backend.generated_tokens
    # A new wrapper on the same file: everything is on disk already.
    reopened = CachingBackend(backend, tmp_path / "cache.sqlite")
    assert reopened.generate(PROMPTS, params, [1, 2, 3, 4, 5]) == first
    assert backend.generated_tokens == before and reopened.hits == 5
    # A different seed or parameter is a different key.
    reopened.generate(PROMPTS[:1], params, [99])
    reopened.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, temperature=0.7), [1])
    assert reopened.misses == 2
    scores = reopened.score_options(PROMPTS[:2], [" (A)", " (B)"])
    assert reopened.score_options(PROMPTS[:2], [" (A)", " (B)"]) == scores and reopened.hits == 7


def test_shared_few_shot_prefix_is_computed_once_and_changes_nothing(backend):
    preamble = "Human: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, knead, let it rise.\n\n"
    prompts = [preamble + f"Human: question {i}{'?' * i}\n\nAssistant:" for i in range(4)]
    token_ids = [backend.tokenizer(prompt)["input_ids"] for prompt in prompts]
    assert backend._shareable_prefix_length(token_ids) >= 16
    for params in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.8)):
        batched = backend.generate(prompts, params, [5, 6, 7, 8])
        alone = [backend.generate([prompt], params, [seed])[0] for prompt, seed in zip(prompts, [5, 6, 7, 8])]
        assert batched == alone


def test_top_p_keeps_the_smallest_nucleus(monkeypatch):
    from constitutional.backends import transformers as backend_module

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]).log()
    for candidates in (4, 2):  # 2: the top candidates miss the nucleus in row 2, forcing the full sort
        monkeypatch.setattr(backend_module, "TOP_P_CANDIDATES", candidates)
        probabilities, token_ids = backend_module.nucleus(logits, 0.75)
        kept = [dict(zip(ids.tolist(), p.tolist())) for ids, p in zip(token_ids, probabilities)]
        assert {k: v for k, v in kept[0].items() if v > 0} == pytest.approx({0: 0.5, 1: 0.3})
        assert sum(v > 0 for v in kept[1].values()) == 3


def test_finished_rows_leave_the_batch(backend, monkeypatch):
    params = SamplingParams(max_new_tokens=8)
    free = backend.generate(PROMPTS[:3], params)
    stop = free[0][:2]  # the first row meets this stop string within its first tokens
    assert stop and all(stop not in text[:4] for text in free[1:])
    widths = []
    forward = backend.model.forward

    @functools.wraps(forward)  # keeps the signature the back end inspects
    def recording_forward(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", recording_forward)
    stopped = backend.generate(PROMPTS[:3], SamplingParams(max_new_tokens=8, stop=(stop,)))
    assert stopped[1:] == free[1:] and stop not in stopped[0]
    # One row stopped early: every later step runs on two rows, not three with padding.
    assert widths[0] == 3 and widths[-1] == 2 and sorted(widths, reverse=True) == widths
