"""Benchmark: the critique stage as a whole process vs LangChain's `ConstitutionalChain` as a whole process.

Both sides answer, critique and revise the first `--prompts` built-in red-team prompts (1 round,
one principle per prompt: the one the stage samples for it from the default constitution), with
`--max-new-tokens` new tokens per generation, greedy, with the same converted embedded model
(Gemma 3 270M) through `transformers` on CPU, in the same dtype. Each side is timed from outside
as a fresh process: Python start-up, imports and model load included.

- ours: `cai run <config> --run-dir <tmp> --stages critique`, the config made from
  configs/quickstart.yaml (rounds 1, greedy, no generation cache). The stage cannot take zero
  helpfulness prompts (`data.max_helpful` and `critique.helpful_samples` must be positive), so ours
  also answers 1 helpfulness prompt once: one more generation than LangChain's side does. The
  stage's own seconds come from the run's manifest.json (1 s resolution; they include its model load).
- LangChain: a script (LANGCHAIN_SCRIPT below) under `--langchain-python`: `HuggingFacePipeline`
  over a transformers text-generation pipeline, and per prompt `ConstitutionalChain.from_llm`
  with an `LLMChain` answering it (LangChain's documented `Q: ... A:` template), its own few-shot
  critique and revision prompts, and one `ConstitutionalPrinciple`. It times its chain calls alone.
  Note: ConstitutionalChain skips the revision when the critique says "no critique needed".

LangChain is never a dependency of the project: it lives in its own virtualenv, e.g.

    python3.11 -m venv /work/lcvenv
    /work/lcvenv/bin/pip install torch==2.13.0 transformers==<ours> langchain-classic langchain-huggingface

    python bench/langchain_critique.py [--prompts 8] [--max-new-tokens 48] [--repeats 1]
        [--langchain-python /work/lcvenv/bin/python]

Without that Python, or where it cannot import ConstitutionalChain, it says so in one line and exits 0.

Target (issue 20): our process is >= 8x faster than LangChain's process on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from constitutional.config import load_config
from constitutional.constitution import sample_principles
from constitutional.models import EMBEDDED, choose_dtype, local_weights_dir, resolve_model_name
from constitutional.stages.critique import check

REPO = Path(__file__).resolve().parents[1]
CAI = Path(sys.executable).with_name("cai")
IMPORT_CHECK = "from langchain_classic.chains.constitutional_ai.base import ConstitutionalChain"
RESULT_PREFIX = "LANGCHAIN_RESULT "

LANGCHAIN_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")  # LLMChain and ConstitutionalChain are deprecated: one warning each
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from langchain_core.prompts import PromptTemplate
from langchain_huggingface import HuggingFacePipeline
from langchain_classic.chains import LLMChain
from langchain_classic.chains.constitutional_ai.base import ConstitutionalChain
from langchain_classic.chains.constitutional_ai.models import ConstitutionalPrinciple

job = json.load(open(sys.argv[1], encoding="utf-8"))
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(job["model"])
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"])).eval()
generator = pipeline(
    "text-generation", model=model, tokenizer=tokenizer, max_new_tokens=job["max_new_tokens"],
    return_full_text=False, do_sample=False,
)
llm = HuggingFacePipeline(pipeline=generator)
load_seconds = time.perf_counter() - started
answer = LLMChain(llm=llm, prompt=PromptTemplate.from_template("Q: {question} A:"))
generations = 0
started = time.perf_counter()
for item in job["prompts"]:
    principle = ConstitutionalPrinciple(
        name=item["name"], critique_request=item["critique_request"], revision_request=item["revision_request"]
    )
    chain = ConstitutionalChain.from_llm(
        llm=llm, chain=answer, constitutional_principles=[principle], return_intermediate_steps=True
    )
    result = chain.invoke({"question": item["prompt"]})
    generations += 1 + sum(1 + bool(revision) for _, revision in result["critiques_and_revisions"])
chain_seconds = time.perf_counter() - started
report = {"chain_seconds": chain_seconds, "load_seconds": load_seconds, "generations": generations}
print("LANGCHAIN_RESULT " + json.dumps(report), flush=True)
"""


def langchain_missing(python: str) -> str | None:
    """Why the LangChain side cannot run (a sentence), or None when it can."""
    if not Path(python).exists():
        return f"LangChain benchmark skipped: {python} does not exist (see the docstring to set it up)"
    probe = subprocess.run([python, "-c", IMPORT_CHECK], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
        return f"LangChain benchmark skipped: {python} cannot import ConstitutionalChain ({last})"
    return None


def our_config(prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """The quickstart's config, sized for this comparison: one greedy round, no generation cache."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    config["data"].update(max_red_team=prompts, max_helpful=1)  # 0 is refused: the smallest allowed
    config["critique"].update(
        rounds=1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        helpful_samples=1,
        helpful_temperature=0.0,
        chunk_size=prompts + 1,
    )
    config["cache"] = {"enabled": False}
    return config


def langchain_job(config_path: Path, prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """What the LangChain script runs: the same model and dtype, each prompt with the stage's principle."""
    config = load_config(config_path, [])
    inputs = check(config, config.critique)
    items = []
    for item in inputs.red_team[:prompts]:
        (principle,) = sample_principles(inputs.constitution.critique_principles, 1, config.seed, item.id)
        items.append(
            {
                "prompt": item.prompt,
                "name": principle.id,
                "critique_request": principle.critique_request,
                "revision_request": principle.revision_request,
            }
        )
    dtype = choose_dtype(config.transformers.dtype, "cpu")
    model = local_weights_dir(resolve_model_name(EMBEDDED))  # converted once, outside the timings
    dtype_name = str(dtype).removeprefix("torch.")
    return {"model": str(model), "dtype": dtype_name, "max_new_tokens": max_new_tokens, "prompts": items}


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run `command` to the end; its wall seconds and stdout. Exits with its output when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return seconds, done.stdout


def run_ours(config_path: Path, work: Path, env: dict[str, str]) -> tuple[float, float | None]:
    """One fresh `cai run --stages critique`: process seconds and the stage's seconds from its manifest."""
    run_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    command = [str(CAI), "run", str(config_path), "--run-dir", str(run_dir), "--stages", "critique"]
    seconds, _ = timed(command, env)
    manifest = run_dir / "manifest.json"
    stage = json.loads(manifest.read_text(encoding="utf-8"))["stages"].get("critique", {}) if manifest.exists() else {}
    return seconds, stage.get("seconds")


def run_langchain(python: str, script: Path, job: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """One fresh LangChain process: its seconds and what it reported about its chain calls."""
    seconds, stdout = timed([python, str(script), str(job)], env)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        sys.exit(f"the LangChain script printed no result line:\n{stdout[-2000:]}")
    return seconds, json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def ratio(slow: float | None, fast: float | None) -> str:
    return f"{slow / fast:.2f}x" if slow and fast else "n/a"


def report(ours: tuple[float, float | None], theirs: tuple[float, dict[str, Any]], args: argparse.Namespace) -> None:
    """The table: seconds of each side, whole process and own work, and the ratios."""
    (our_process, our_stage), (their_process, their_result) = ours, theirs
    their_chain = their_result["chain_seconds"]
    print(
        f"{args.prompts} red-team prompts, 1 round, {args.max_new_tokens} new tokens, greedy, embedded model on CPU "
        f"(best of {args.repeats})"
    )
    stage = f"{our_stage:.1f}" if our_stage is not None else "n/a"
    rows = [
        ("", "process s", "own s", "generations"),
        ("ours (cai run --stages critique)", f"{our_process:.1f}", stage, str(3 * args.prompts + 1)),
        (
            "LangChain ConstitutionalChain",
            f"{their_process:.1f}",
            f"{their_chain:.1f}",
            str(their_result["generations"]),
        ),
        ("ratio LangChain / ours", ratio(their_process, our_process), ratio(their_chain, our_stage), ""),
    ]
    for row in rows:
        print(f"{row[0]:<34}{row[1]:>11}{row[2]:>9}{row[3]:>13}")
    print(
        f"own s: ours = the stage in the manifest (model load included), LangChain = its chain calls "
        f"(its model load: {their_result['load_seconds']:.1f} s more)"
    )
    print(f"process ratio: {ratio(their_process, our_process)} (target >= 8x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; the fastest counts")
    parser.add_argument("--langchain-python", default="/work/lcvenv/bin/python")
    args = parser.parse_args()
    missing = langchain_missing(args.langchain_python)
    if missing:
        print(missing)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="langchain-critique-") as tmp:
        work = Path(tmp)
        config_path = work / "critique.yaml"
        config_path.write_text(yaml.safe_dump(our_config(args.prompts, args.max_new_tokens)), encoding="utf-8")
        job_path, script_path = work / "job.json", work / "langchain_critique_chain.py"
        job_path.write_text(json.dumps(langchain_job(config_path, args.prompts, args.max_new_tokens)), "utf-8")
        script_path.write_text(LANGCHAIN_SCRIPT, encoding="utf-8")
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so that load on a shared machine hits both alike
            ours.append(run_ours(config_path, work, env))
            theirs.append(run_langchain(args.langchain_python, script_path, job_path, env))
    report(min(ours, key=lambda run: run[0]), min(theirs, key=lambda run: run[0]), args)


if __name__ == "__main__":
    main()
