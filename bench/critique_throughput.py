"""Benchmark: generated tokens/s of the critique stage vs a sequential one-generate-per-prompt loop.

Runs the real critique stage (answer, critique, revision: `--rounds` rounds) on `--prompts`
built-in red-team prompts with the embedded model, recording every request it sends and how many
tokens each produced. Then it replays the same requests the way chain-style tools do it: one
`model.generate` call per prompt, forced to the same number of new tokens. Both run in this one
process on the same loaded model, so the ratio compares like with like.

    python bench/critique_throughput.py [--prompts 32] [--rounds 1] [--max-new-tokens 48]

Target (issue 2): the stage reaches >= 4x the sequential loop's tokens/s with 32 prompts on 2 CPU
cores. It also reports how long loading the embedded model takes once it has been converted
(target <= 10 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from constitutional.backends.transformers import load as load_transformers
from constitutional.config import load_config
from constitutional.models import EMBEDDED, local_weights_dir, resolve_model_name
from constitutional.stages.critique import CritiqueWriter, check

REPO = Path(__file__).resolve().parents[1]


class RecordingBackend:
    """Passes calls through to a TransformersBackend and keeps (prompt, seed, new tokens) of each."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id = inner.model_id
        self.requests: list[tuple[str, int]] = []

    def apply_chat_template(self, messages):
        return self.inner.apply_chat_template(messages)

    def generate(self, prompts, params, seeds=None):
        texts = self.inner.generate(prompts, params, seeds)
        self.requests += list(zip(prompts, self.inner.last_token_counts))
        return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--baseline-every",
        type=int,
        default=1,
        help="replay every k-th request in the sequential loop (k > 1 estimates its rate faster)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # The quickstart's settings (sampling, few-shot, dtype), sized by the arguments.
    config = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"data.max_red_team={args.prompts}",
            f"critique.rounds={args.rounds}",
            f"critique.max_new_tokens={args.max_new_tokens}",
            f"critique.chunk_size={args.prompts}",
            f"transformers.batch_size={args.batch_size}",
        ],
    )
    local_weights_dir(resolve_model_name(EMBEDDED))  # convert once, outside the timed load
    started = time.perf_counter()
    backend = load_transformers(EMBEDDED, config.transformers, config.base_dir, config.seed)
    load_seconds = time.perf_counter() - started
    print(f"load embedded model (converted copy): {load_seconds:.1f} s (target <= 10 s)")
    print(f"device {backend.device}, dtype {backend.model.dtype}, threads {torch.get_num_threads()}")

    inputs = check(config, config.critique)
    recording = RecordingBackend(backend)
    writer = CritiqueWriter(config, config.critique, inputs, recording)
    chunk = [(item, "red_team") for item in inputs.red_team[: args.prompts]]
    writer.process(chunk[:2])  # warm-up (allocator, kernels), not timed
    recording.requests.clear()
    started = time.perf_counter()
    writer.process(chunk)
    stage_seconds = time.perf_counter() - started
    stage_tokens = sum(count for _, count in recording.requests)
    stage_rate = stage_tokens / stage_seconds
    print(
        f"critique stage: {len(chunk)} prompts, {args.rounds} round(s), {len(recording.requests)} generations, "
        f"{stage_tokens} tokens in {stage_seconds:.1f} s = {stage_rate:.1f} tok/s"
    )

    model, tokenizer = backend.model, backend.tokenizer
    started = time.perf_counter()
    baseline_tokens = 0
    with torch.inference_mode():
        for prompt, count in recording.requests[:: args.baseline_every]:
            if count == 0:
                continue
            inputs_ids = tokenizer(prompt, return_tensors="pt").to(model.device)
            output = model.generate(
                **inputs_ids,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=True,
                temperature=config.critique.temperature,
                top_p=config.critique.top_p,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
            baseline_tokens += output.shape[1] - inputs_ids["input_ids"].shape[1]
    baseline_seconds = time.perf_counter() - started
    baseline_rate = baseline_tokens / baseline_seconds
    replayed = len(recording.requests[:: args.baseline_every])
    print(
        f"sequential loop (one generate per prompt, {replayed} of the {len(recording.requests)} requests): "
        f"{baseline_tokens} tokens in {baseline_seconds:.1f} s "
        f"= {baseline_rate:.1f} tok/s"
    )
    print(f"ratio: {stage_rate / baseline_rate:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
