"""Benchmark for a lent GPU (H100/H200): generation, training and one PPO step at two model shapes.

On randomly initialised bf16 models of the embedded model's shape (Gemma 3 270M) and of a 1.5B
shape (Qwen2 1.5B), with a word-level tokenizer over the whole vocabulary (no downloads; the
weights are random, so only speed is measured), it prints:

- generation, 128 new tokens: raw batched `model.generate` at batch 1, 32 and 256; the
  `transformers` back end at batch 256; the critique stage (answer, critique, revision of 256
  prompts) through that back end; the `vllm` back end at batch 256 when vLLM is installed.
  Ratios against raw `generate` at batch 256 (target with vLLM: >= 5x);
- training: tokens/s of the `sl` stage's trainer (TRL's SFTTrainer as the stage builds it) and of
  a bare PyTorch loop on the same batches (target: the stage >= 90% of the bare loop), of the `pm`
  stage's soft-label reward trainer, each with model-FLOPs utilisation (6 x parameters x tokens/s
  against the card's dense bf16 peak);
- the time of one PPO step of the `rl` stage (rollout, scoring, optimisation), after one warm-up step.

The reference figures (issue 10, plain transformers on an H200): 270M shape 14 / 527 / 4,202 tok/s
at batch 1 / 32 / 256 and 68.6k training tokens/s; 1.5B shape 16 / 538 / 3,994 tok/s and 38.1k
training tokens/s (36% MFU).

On the lent machine (python3 there has torch, transformers, accelerate, peft; carry trl and
datasets as wheels, see the device tool's README):

    PYTHONPATH=src python3 bench/gpu.py            # both shapes, about 6 minutes on an H200
    .venv/bin/python bench/gpu.py --smoke          # a tiny shape on CPU: checks the script, measures nothing useful

Each section prints its figures as it finishes and a failing section is reported and skipped, so
one problem does not cost the others' figures. The last line is all figures as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 128
PROMPT_TOKENS = 64

# (model type, config) of each shape; random weights.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "270m": (
        "gemma3_text",
        {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
         "sliding_window": 512, "tie_word_embeddings": True},
    ),
    "1.5b": (
        "qwen2",
        {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
         "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
         "tie_word_embeddings": True},
    ),
    "smoke": (
        "llama",
        {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
    ),
}  # fmt: skip
# Dense bf16 peak of the card, from the vendor's data sheet (no sparsity), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="270m,1.5b")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, small batches: check the script on CPU")
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args()
    quiet_libraries()
    shapes = ["smoke"] if args.smoke else args.shapes.split(",")
    batches = [1, 4, 8] if args.smoke else [1, 32, 256]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((value for name, value in PEAK_TFLOPS.items() if name in card), None)
    print(f"device: {card}; torch {torch.__version__}; dense bf16 peak used for MFU: {peak} TFLOP/s", flush=True)
    figures: dict[str, Any] = {"card": card}
    with tempfile.TemporaryDirectory() as scratch:
        for shape in shapes:
            work = Path(scratch) / shape
            model_dir = make_model(shape, work / "model")
            params = sum(p.numel() for p in load_model(model_dir, device).parameters())
            print(f"\n== shape {shape}: {params / 1e6:.0f}M parameters", flush=True)
            results = figures[shape] = {"parameters": params}
            section(results, "generation", generation, model_dir, device, batches)
            section(results, "training", training, model_dir, work, params, peak, args.train_steps, args.smoke)
            section(results, "ppo", ppo_step, model_dir, work, args.smoke)
    print(json.dumps(figures))


def quiet_libraries() -> None:
    """Only the figures and real problems on the screen (load reports and dataset bars say nothing here)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def section(results: dict[str, Any], name: str, function: Any, *args: Any) -> None:
    """Run one part of the benchmark; report a failure and carry on."""
    started = time.perf_counter()
    try:
        results[name] = function(*args)
    except Exception as error:  # a benchmark section: report it, keep the other figures
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    print(f"   ({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- models


def make_model(shape: str, directory: Path) -> Path:
    """A randomly initialised bf16 model of `shape` with a word-level tokenizer covering its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    model_type, values = SHAPES[shape]
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(special)}
    vocab.update({f"w{index}": index for index in range(len(special), values["vocab_size"])})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    config = AutoConfig.for_model(model_type, **values, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def load_model(directory: Path, device: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)


def word_prompts(count: int, length: int, vocab_size: int) -> list[str]:
    """`count` prompts of `length` words, each word one token of the word-level tokenizer."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab_size, (count, length), generator=generator)
    return [" ".join(f"w{token}" for token in row.tolist()) for row in ids]


# ----------------------------------------------------------------------------- generation


def generation(model_dir: Path, device: str, batches: list[int]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from constitutional.backends import SamplingParams
    from constitutional.backends.settings import TransformersSettings
    from constitutional.backends.transformers import load as load_transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = load_model(model_dir, device).eval()
    largest = batches[-1]
    prompts = word_prompts(largest, PROMPT_TOKENS, model.config.vocab_size)
    results: dict[str, Any] = {}
    for batch in batches:
        rate = raw_generate_rate(model, tokenizer, prompts[:batch])
        results[f"raw_generate_batch_{batch}"] = round(rate, 1)
        print(f"raw generate, batch {batch}: {rate:,.1f} tok/s", flush=True)
    raw = results[f"raw_generate_batch_{largest}"]
    del model
    settings = TransformersSettings(dtype="bfloat16" if device == "cuda" else "float32", batch_size=largest)
    backend = load_transformers(str(model_dir), settings, str(REPO), 0)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0.7, top_p=0.95)
    backend.generate(prompts[:2], params, [0, 1])  # warm-up
    started = _synchronized_clock()
    backend.generate(prompts, params, list(range(largest)))
    seconds = _synchronized_clock() - started
    rate = sum(backend.last_token_counts) / seconds
    results[f"backend_batch_{largest}"] = round(rate, 1)
    print(f"transformers back end, batch {largest}: {rate:,.1f} tok/s = {rate / raw:.2f}x raw generate", flush=True)
    results["critique_stage"] = round(critique_stage_rate(backend, largest), 1)
    print(
        f"critique stage ({largest} prompts, 1 round) through it: {results['critique_stage']:,.1f} tok/s "
        f"= {results['critique_stage'] / raw:.2f}x raw generate at batch {largest}",
        flush=True,
    )
    del backend
    if importlib.util.find_spec("vllm") is None:
        print("vllm is not installed here: the >= 5x target of the vllm back end is not measured", flush=True)
        return results
    from constitutional.backends.settings import VLLMSettings
    from constitutional.backends.vllm import load as load_vllm

    engine = load_vllm(str(model_dir), VLLMSettings(), str(REPO), 0)
    engine.generate(prompts[:2], params, [0, 1])
    started = time.perf_counter()
    texts = engine.generate(prompts, params, list(range(largest)))
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(text)["input_ids"]) for text in texts)
    results[f"vllm_batch_{largest}"] = round(tokens / seconds, 1)
    print(f"vllm back end, batch {largest}: {tokens / seconds:,.1f} tok/s = {tokens / seconds / raw:.2f}x "
          "raw generate (target >= 5x)", flush=True)  # fmt: skip
    return results


def raw_generate_rate(model: Any, tokenizer: Any, prompts: list[str]) -> float:
    """New tokens/s of one batched `generate` call, forced to NEW_TOKENS tokens, after a warm-up."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 0.7,
               "top_p": 0.95, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    with torch.inference_mode():
        model.generate(**{k: v[:1] for k, v in encoded.items()}, **{**options, "max_new_tokens": 4,
                                                                     "min_new_tokens": 4})  # fmt: skip
        started = _synchronized_clock()
        output = model.generate(**encoded, **options)
        seconds = _synchronized_clock() - started
    return (output.shape[1] - encoded["input_ids"].shape[1]) * len(prompts) / seconds


def critique_stage_rate(backend: Any, prompts: int) -> float:
    """Generated tokens/s of the critique stage's work on `prompts` built-in red-team prompts, 1 round."""
    from constitutional.config import load_config
    from constitutional.stages.critique import CritiqueWriter, check

    config = load_config(
        REPO / "configs" / "quickstart.yaml",
        ["critique.rounds=1", f"critique.max_new_tokens={NEW_TOKENS}", "models.helpful.prompt_format=plain"],
    )
    inputs = check(config, config.critique)
    items = [inputs.red_team[index % len(inputs.red_team)] for index in range(prompts)]
    counted = CountingBackend(backend)
    writer = CritiqueWriter(config, config.critique, inputs, counted)
    writer.process([(item, "red_team") for item in items[:2]])  # warm-up
    counted.tokens = 0
    started = _synchronized_clock()
    writer.process([(item, "red_team") for item in items])
    return counted.tokens / (_synchronized_clock() - started)


class CountingBackend:
    """Passes calls to a TransformersBackend and counts the tokens it generates."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.model_id = inner.model_id
        self.tokens = 0

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return self.inner.apply_chat_template(messages)

    def generate(self, prompts: Any, params: Any, seeds: Any = None) -> list[str]:
        texts = self.inner.generate(prompts, params, seeds)
        self.tokens += sum(self.inner.last_token_counts)
        return texts


def _synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------- training


def training(
    model_dir: Path, work: Path, params: int, peak: float | None, steps: int, smoke: bool
) -> dict[str, Any]:  # fmt: skip
    from transformers import AutoTokenizer, TrainerCallback

    from constitutional.stages import pm, sl
    from constitutional.training import TrainingSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    training_settings = TrainingSettings(precision="auto")
    length = 128 if smoke else 512
    batch = 4 if smoke else 16
    words = word_prompts(batch * (steps + 2), length, tokenizer.vocab_size)

    class Timer(TrainerCallback):
        """Tokens/s over the steps after the first two (warm-up: allocation, kernels)."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append((_synchronized_clock(), state.num_input_tokens_seen))

        def rate(self) -> float:
            (start, tokens_start), (end, tokens_end) = self.marks[1], self.marks[-1]
            return (tokens_end - tokens_start) / (end - start)

    def mfu(rate: float) -> float | None:
        return round(6 * params * rate / (peak * 1e12), 4) if peak else None

    results: dict[str, Any] = {}
    # SFT: the stage's trainer; half prompt, half completion, every example max length.
    half = length // 2
    examples = [sl.Example(" ".join(text.split()[:half]), " " + " ".join(text.split()[half:]), "red_team")
                for text in words]  # fmt: skip
    settings = sl.Settings(batch_size=batch, max_length=length, save_steps=10_000, logging_steps=10_000)
    timer = Timer()
    model = load_model(model_dir, "cpu", torch.float32)
    trainer = sl.build_trainer(
        training_settings, settings, 0, model, tokenizer, sl.to_dataset(examples), work / "sft", [timer]
    )
    trainer.args.max_steps = steps
    trainer.train()
    sft_rate = timer.rate()
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + batch)])
               for start in range(0, batch * steps, batch)]  # fmt: skip
    del trainer, model
    bare_rate = bare_training_rate(model_dir, batches)
    results["sft_tokens_per_s"], results["sft_mfu"] = round(sft_rate, 1), mfu(sft_rate)
    results["bare_tokens_per_s"], results["bare_mfu"] = round(bare_rate, 1), mfu(bare_rate)
    print(f"sl stage trainer: {sft_rate:,.0f} tok/s (MFU {mfu(sft_rate)}); bare PyTorch loop: {bare_rate:,.0f} "
          f"tok/s (MFU {mfu(bare_rate)}); stage/bare = {sft_rate / bare_rate:.2f} (target >= 0.90)",
          flush=True)  # fmt: skip
    # PM: the stage's soft-label reward trainer on a sequence classifier of the same shape.
    from transformers import AutoModelForSequenceClassification

    rows = [{"prompt": text.split()[0], "response_a": " ".join(text.split()[1:half]),
             "response_b": " ".join(text.split()[half:]), "p_a": 0.7} for text in words]  # fmt: skip
    timer = Timer()
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    pm_settings = pm.Settings(batch_size=batch // 2, max_length=length, save_steps=10_000, logging_steps=10_000)
    trainer = pm.build_trainer(
        training_settings, pm_settings, 0, classifier, tokenizer, pm.to_dataset(rows), work / "pm", [timer]
    )
    trainer.args.max_steps = steps
    trainer.train()
    pm_rate = timer.rate()
    results["pm_tokens_per_s"], results["pm_mfu"] = round(pm_rate, 1), mfu(pm_rate)
    print(f"pm stage trainer (soft labels): {pm_rate:,.0f} tok/s (MFU {mfu(pm_rate)})", flush=True)
    return results


def bare_training_rate(model_dir: Path, batches: list[dict[str, Any]]) -> float:
    """Tokens/s of a plain loop on the same batches: forward, loss, backward, AdamW step, bf16 autocast on GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    marks = []
    for batch in batches:
        batch = {
            key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask", "labels")
        }
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((_synchronized_clock(), int(batch["attention_mask"].sum())))
    tokens = sum(count for _, count in marks[2:])
    return tokens / (marks[-1][0] - marks[1][0])


# ----------------------------------------------------------------------------- PPO


def ppo_step(model_dir: Path, work: Path, smoke: bool) -> dict[str, Any]:
    """One PPO step of the rl stage (after a warm-up step) on SL-CAI = the random model, PM = a head on it."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from constitutional.config import config_from_dict
    from constitutional.records import append_records, read_records
    from constitutional.rundir import RunDir
    from constitutional.stages import rl

    run = RunDir(work / "run")
    shutil.copytree(model_dir, run.path("sl_cai"))
    pm_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    pm_model.config.pad_token_id = 0
    pm_model.save_pretrained(run.path("pm"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(run.path("pm"))
    batch = 8 if smoke else 64
    prompts = word_prompts(batch * 2, PROMPT_TOKENS, AutoTokenizer.from_pretrained(model_dir).vocab_size)
    append_records(run.path("critiques"), [
        {"id": f"p{index}", "kind": "red_team", "prompt": text, "initial_response": "w5", "revisions": [],
         "final_response": "w5", "flags": []}
        for index, text in enumerate(prompts)
    ])  # fmt: skip
    config = config_from_dict({
        "seed": 0,
        "rl": {"steps": 2, "rollout_batch_size": batch, "minibatch_size": batch // 4, "max_new_tokens": NEW_TOKENS,
               "eval_fraction": 0.01, "max_eval_prompts": 1, "save_steps": 1000},
    }, base_dir=str(work))  # fmt: skip
    rl.run(config, config.rl, run, None)
    last = read_records(run.path("rl_metrics"))[-1]
    split = {key: round(last[key], 2) for key in ("rollout_s", "scoring_s", "optimisation_s")}
    total = sum(split.values())
    print(f"ppo step ({batch} prompts, <= {NEW_TOKENS} new tokens, LoRA): {total:.1f} s = rollout "
          f"{split['rollout_s']} s + scoring {split['scoring_s']} s + optimisation {split['optimisation_s']} s",
          flush=True)  # fmt: skip
    return {"step_s": round(total, 2), **split, "rollout_batch_size": batch}


if __name__ == "__main__":
    main()
