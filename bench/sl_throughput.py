"""Benchmark: training tokens/s of the `sl` stage vs a bare TRL `SFTTrainer` on the same data and model.

Both trainers get the same examples (the stage's prompt/completion mix from a critiques.jsonl, or
`--records` synthesised ones: built-in red-team and helpfulness prompts with canned answers), the
same model (loaded fresh for each), batch size, max_length, number of steps, seed (hence the same
batches in the same order) and precision (fp32 on CPU). The stage's trainer is built by
`constitutional.stages.sl.build_trainer` from the config, exactly as the stage builds it (logging,
token counting, progress bar, LoRA); the bare one is `SFTTrainer(model, SFTConfig(...))` with only
what makes the runs comparable set: precision and activation checkpointing (TRL defaults to bf16
autocast and checkpointing; the stage trains fp32 on CPU without checkpointing). Checkpointing is
pushed past the last step in both, so the timing is of training alone.

Timed: steps 2..S of each run (the first step pays one-time warm-up costs), non-padding tokens.

    python bench/sl_throughput.py [--critiques PATH] [--model embedded] [--lora] [--steps 10]
                                  [--batch-size 4] [--max-length 256]

Target (issue): the stage's tokens/s within 10% of the bare SFTTrainer's (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from constitutional.config import config_from_dict
from constitutional.models import load_causal_lm, load_tokenizer, local_weights_dir
from constitutional.records import append_records
from constitutional.sources import load_prompts
from constitutional.stages import sl
from constitutional.training import trainer_arguments

REFUSALS = [
    "I can't help with that, because it could seriously hurt someone. If you are worried about {topic}, "
    "a safer first step is to talk to someone you trust or to a professional who deals with this every day.",
    "That would put other people at risk, so I won't give instructions for it. What I can do is explain "
    "the legal options people usually have in this situation, and where to find reliable advice about {topic}.",
    "I'd rather not help with this one. It sounds like something is bothering you about {topic}; if you tell "
    "me more about what is going on, I am happy to think through honest and safe ways to deal with it.",
]
ANSWERS = [
    "Sure. Start with the basics of {topic}: gather what you need, go one step at a time, and check the result "
    "before moving on. Most problems come from rushing the first step, so take your time there.",
    "Here is a short answer about {topic}. The key idea is to keep things simple, measure what matters, and adjust "
    "as you go. If you want, I can walk you through a concrete example next.",
]


class StepTimer(TrainerCallback):
    """Times steps `skip+1..last` and counts the non-padding tokens trained in them."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), state.num_input_tokens_seen)
        if state.global_step == self.skip:
            self.start = now
        elif state.global_step > self.skip:
            self.end, self.steps = now, state.global_step - self.skip

    def tokens_per_s(self) -> float:
        return (self.end[1] - self.start[1]) / (self.end[0] - self.start[0])

    def seconds(self) -> float:
        return self.end[0] - self.start[0]


def synthesise_critiques(path: Path, count: int) -> None:
    """`count` critique records: built-in red-team prompts with canned revisions and helpful ones answered."""
    red_team = load_prompts("builtin", prefix="rt", builtin="red_team_prompts.jsonl")
    helpful = load_prompts("builtin", prefix="hp", builtin="helpful_prompts.jsonl")
    records = []
    for index in range(count):
        kind, items, texts = ("red_team", red_team, REFUSALS) if index % 2 == 0 else ("helpful", helpful, ANSWERS)
        item = items[(index // 2) % len(items)]
        answer = texts[index % len(texts)].format(topic=item.prompt.rstrip("?.!").lower()[:60])
        records.append(
            {
                "id": f"{item.id}-{index}",
                "kind": kind,
                "prompt": item.prompt,
                "initial_response": answer,
                # One revision per red-team record: sl trains on every revision (sl.targets: all_revisions).
                "revisions": [{"principle_id": "synthetic", "critique": "", "revision": answer}]
                if kind == "red_team"
                else [],
                "final_response": answer,
                "flags": [],
            }
        )
    append_records(path, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--critiques", type=Path, help="a critiques.jsonl (default: synthesised records)")
    parser.add_argument("--records", type=int, default=64, help="records to synthesise without --critiques")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--lora", action="store_true", help="LoRA (r=16, all linear layers), not full fine-tuning")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the stage's trainer with TRL's LM head scoring every position",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = config_from_dict(
        {
            "seed": 0,
            "models": {"base": args.model},
            "sl": {
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "learning_rate": 1e-5,
                "save_steps": args.steps + 1,
                "logging_steps": args.steps,
                "lora": {"enabled": args.lora},
            },
        },
        base_dir=os.getcwd(),
    )
    base_model = sl.check(config, config.sl)
    model_dir = local_weights_dir(base_model)  # converts the embedded GGUF once, outside any timing
    tokenizer = load_tokenizer(base_model)
    device_args = trainer_arguments(config.training)
    use_cpu, bf16 = device_args["use_cpu"], device_args["bf16"]
    device = f"CPU fp32, {torch.get_num_threads()} threads" if use_cpu else f"CUDA {'bf16' if bf16 else 'fp32'}"
    work = Path(tempfile.mkdtemp(prefix="sl-bench-"))
    try:
        examples = prepare_examples(args, config, tokenizer, work)
        print(
            f"model {args.model} ({model_dir}), {'LoRA r=16 all-linear' if args.lora else 'full fine-tuning'}, "
            f"batch {args.batch_size}, max_length {args.max_length}, {args.steps} steps, {device}"
        )
        runs = ["bare SFTTrainer", "sl stage"] + (["sl stage, TRL's LM head"] if args.breakdown else [])
        speeds = {}
        for index, name in enumerate(runs):
            speeds[name] = time_run(name, config, base_model, tokenizer, examples, work / f"run{index}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = speeds["sl stage"] / speeds["bare SFTTrainer"]
    print(f"ratio sl stage / bare SFTTrainer: {ratio:.3f} (target >= 0.90)")
    print(json.dumps({**{name: round(speed, 2) for name, speed in speeds.items()}, "ratio": round(ratio, 3)}))


def prepare_examples(args: argparse.Namespace, config, tokenizer, work: Path) -> list[sl.Example]:
    """The stage's example mix, cycled to exactly `steps * batch_size` examples (one epoch of `steps` steps)."""
    critiques = args.critiques or work / "critiques.jsonl"
    if args.critiques is None:
        synthesise_critiques(critiques, args.records)
    examples, counts = sl.load_examples(critiques, config.sl, config.seed, tokenizer.eos_token)
    needed = args.steps * args.batch_size
    print(f"data: {args.critiques or f'{args.records} synthesised records'} -> {counts}; {needed} examples used")
    return [examples[i % len(examples)] for i in range(needed)]


def time_run(name: str, config, base_model, tokenizer, examples: list[sl.Example], output_dir: Path) -> float:
    """Train one epoch with the named trainer and return its tokens/s over steps 2..S."""
    timer = StepTimer()
    if name == "sl stage":
        trainer, _ = sl.train(
            config.training, config.sl, config.seed, base_model, tokenizer, examples, output_dir, [timer]
        )
    else:
        model = load_causal_lm(base_model, torch.float32, "cpu")
        dataset = sl.to_dataset(examples)
        if name == "bare SFTTrainer":
            trainer = bare_trainer(config, model, tokenizer, dataset, output_dir, timer)
        else:  # the stage's trainer without `loss_positions_only`: what that alone buys
            trainer = sl.build_trainer(
                config.training, config.sl, config.seed, model, tokenizer, dataset, output_dir, [timer]
            )
        trainer.train()
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    loss = next(entry["train_loss"] for entry in reversed(trainer.state.log_history) if "train_loss" in entry)
    print(
        f"{name}: {timer.tokens_per_s():.1f} tok/s ({timer.steps} timed steps in {timer.seconds():.1f} s; "
        f"epoch: {trainer.state.global_step} steps, {tokens} tokens, train_loss {loss:.4f})",
        flush=True,
    )
    speed = timer.tokens_per_s()
    del trainer
    gc.collect()
    return speed


def bare_trainer(config, model, tokenizer, dataset, output_dir: Path, timer: StepTimer) -> SFTTrainer:
    """SFTTrainer as a user would write it, made comparable: same batch, length, seed, precision."""
    device_args = trainer_arguments(config.training)
    use_cpu, bf16 = device_args["use_cpu"], device_args["bf16"]
    sft = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.sl.batch_size,
        max_length=config.sl.max_length,
        learning_rate=config.sl.learning_rate,
        lr_scheduler_type=config.sl.lr_scheduler,
        num_train_epochs=1,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen="non_padding",  # the timer's token count (a cheap counter)
    )
    return SFTTrainer(
        model=model,
        args=sft,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config.sl.lora.peft_config("CAUSAL_LM"),
        callbacks=[timer],
    )


if __name__ == "__main__":
    main()
