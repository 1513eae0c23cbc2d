"""The `cai` command line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from constitutional import __version__
from constitutional.errors import ServiceError, UserError
from constitutional.registry import STAGES

# Errors of the storage, not of the input or the code: a full disk or quota, a file-size limit
# (`ulimit -f`, a file system's largest file), a read-only or forbidden run directory. Reported in
# one line; everything written before stays whole.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)

DESCRIPTION = """\
Constitutional AI (Bai et al. 2022) end to end: a written constitution instead of human
harmlessness labels.

Stages, in order: critique (answer red-team prompts, critique and revise them against
sampled principles), sl (fine-tune the pretrained model on the revisions), pairs (sample two
answers per prompt), feedback (AI preference labels), pm (preference model), rl (PPO against the
PM), eval (Elo, harm, evasiveness and the HTML report). Stages: {built}.
"""

EPILOG = """\
examples:
  cai run configs/quickstart.yaml
  cai run configs/quickstart.yaml --run-dir runs/try2 --set critique.rounds=2 --set data.max_red_team=8
  cai run my.yaml --stages critique --set models.helpful=./my-model --set models.helpful.backend=openai
  cai run configs/quickstart.yaml --set feedback.cot=true --rerun     (an ablation on the same run)
  cai report runs/quickstart                                           (rebuild runs/quickstart/eval/report.html)
  cai run big.yaml --stages critique --shard 3/8 --run-dir runs/big-3    (one machine's share)
  cai merge runs/big runs/big-0 ... runs/big-7 --stage critique        (then run the next stages on runs/big)

Interrupt a run at any point and run the same command again: finished work is kept and the run
continues where it stopped. Changing a setting of a stage that already ran is refused (exit 2,
naming the keys and the stages that would run again) unless --rerun is given: then those stages
run again, earlier outputs are reused, and the replaced outputs move under RUN_DIR/previous/.
Bad input exits with code 2 and a one-line message.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai",
        description=DESCRIPTION.format(built=", ".join(STAGES)),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"constitutional {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(commands)
    _add_tools(commands)
    return parser


def _add_run(commands: Any) -> None:
    """`cai run` and `cai plan`, which take the same arguments."""
    run = commands.add_parser(
        "run",
        help="run the pipeline's stages for a config",
        description=(
            "Run the stages of CONFIG in order, skipping those already done and resuming one that was interrupted."
        ),
    )
    _run_arguments(run)
    plan = commands.add_parser(
        "plan",
        help="say what `cai run` would do, without loading a model or writing anything",
        description=(
            "Check CONFIG as `cai run` would (exit 2 on what it would refuse) and print, per stage, whether it is "
            "done, would run, would resume or is stale and why, its models and back ends, and every input's path."
        ),
    )
    _run_arguments(plan)


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("config", metavar="CONFIG", help="a YAML config, e.g. configs/quickstart.yaml")
    run.add_argument("--run-dir", metavar="DIR", help="where outputs go (default: runs/<config name>)")
    run.add_argument("--stages", metavar="LIST", help=f"comma-separated subset of: {', '.join(STAGES)} (default: all)")
    run.add_argument(
        "--rerun",
        action="store_true",
        help="run stages whose settings or inputs changed again (their old outputs move to RUN_DIR/previous/)",
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="make only shard I of N of a generating stage (critique, pairs, feedback, eval), in this run directory; "
        "gather the shards with `cai merge`",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set critique.rounds=2 (repeatable)",
    )


def _add_tools(commands: Any) -> None:
    """`cai score`, `cai merge`, `cai report`, `cai prepare-model`."""
    score = commands.add_parser(
        "score",
        help="score (prompt, response) pairs with a run's preference model",
        description=(
            "Score each (prompt, response) pair with RUN_DIR/models/pm and print one JSON line per pair "
            '({"prompt", "response", "score"}); higher is better. FILEs are .txt (one per line) or .jsonl '
            '(field "prompt", optional "history", / field "response"), the same number of rows each.'
        ),
    )
    score.add_argument("run_dir", metavar="RUN_DIR", help="a run directory where stage pm has finished")
    score.add_argument("--prompts", required=True, metavar="FILE")
    score.add_argument("--responses", required=True, metavar="FILE")
    score.add_argument("--batch-size", type=int, default=8, metavar="N")

    merge = commands.add_parser(
        "merge",
        help="gather the shards of a stage (cai run --shard i/n) into one run directory",
        description=(
            "Merge STAGE's records from every SHARD_DIR into RUN_DIR (the run the shards were copied from), after "
            "checking that every shard 0..n-1 is there once, finished, with the same settings and inputs, and that "
            "no record is lost or doubled. Otherwise nothing is merged and the culprit is named. Stage eval then "
            "finishes on the merged records with `cai run CONFIG --stages eval --run-dir RUN_DIR` (it generates "
            "nothing again: it scores and writes the report)."
        ),
    )
    merge.add_argument("run_dir", metavar="RUN_DIR", help="the run directory that receives the merged records")
    merge.add_argument("shard_dirs", metavar="SHARD_DIR", nargs="+", help="the shards' run directories")
    merge.add_argument("--stage", required=True, help="critique, pairs, feedback or eval")

    report = commands.add_parser(
        "report",
        help="rebuild RUN_DIR/eval/report.html from the run directory",
        description=(
            "Rebuild the run's self-contained HTML report from RUN_DIR alone (no model is loaded) and print the "
            "headline table. Parts of the run that are missing are listed in the report and on stderr."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")

    prepare = commands.add_parser(
        "prepare-model",
        help="convert a model (default: the embedded one) into the local cache ahead of a run",
    )
    prepare.add_argument("model", nargs="?", default="embedded", help="embedded, a .gguf file, a directory or a hub id")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run, map bad input to exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "plan":
            return command_plan(args)
        if args.command == "score":
            return command_score(args)
        if args.command == "report":
            return command_report(args)
        if args.command == "merge":
            return command_merge(args)
        return command_prepare_model(args)
    except UserError as error:
        print(f"cai: error: {error}", file=sys.stderr)
        return 2
    except ServiceError as error:
        print(f"cai: error: {error}; finished work is kept: run the same command again to continue", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise  # anything else is a bug, with its traceback
        where = f"{error.filename}: " if error.filename else ""
        print(
            f"cai: error: cannot write: {where}{error.strerror}; what was written before is intact: "
            "make room (or make the run directory writable) and run the same command again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("cai: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def command_run(args: argparse.Namespace) -> int:
    from constitutional import distributed
    from constitutional.config import load_config
    from constitutional.pipeline import parse_stages, run_pipeline
    from constitutional.sharding import parse_shard

    config = load_config(args.config, args.overrides)
    stages = parse_stages(args.stages)
    shard = parse_shard(args.shard) if args.shard else None
    run = run_pipeline(config, default_run_dir(args), stages, rerun=args.rerun, shard=shard)
    distributed.shutdown()
    print(f"done: {run.root} ({', '.join(stages)}{f', shard {shard}' if shard else ''})")
    if "eval" in stages:
        print_headline(run.root)
    return 0


def command_plan(args: argparse.Namespace) -> int:
    from constitutional.config import load_config
    from constitutional.pipeline import parse_stages, plan_pipeline
    from constitutional.plan import describe_plan
    from constitutional.sharding import parse_shard

    config = load_config(args.config, args.overrides)
    stages = parse_stages(args.stages)
    shard = parse_shard(args.shard) if args.shard else None
    plan = plan_pipeline(config, default_run_dir(args), stages, rerun=args.rerun, shard=shard)
    print(describe_plan(config, plan))
    return 0


def default_run_dir(args: argparse.Namespace) -> Path:
    """`--run-dir`, else runs/<config file's name without .yaml>."""
    return Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem


def command_merge(args: argparse.Namespace) -> int:
    from constitutional.registry import FINISHED_AFTER_MERGE
    from constitutional.rundir import RunDir
    from constitutional.sharding import merge_shards

    counts = merge_shards(RunDir(Path(args.run_dir)), [RunDir(Path(path)) for path in args.shard_dirs], args.stage)
    merged = ", ".join(f"{count} {name}" for name, count in counts["records"].items())
    print(f"merged {len(args.shard_dirs)} shards of {args.stage} into {args.run_dir}: {merged}")
    if args.stage in FINISHED_AFTER_MERGE:
        print(f"now finish it there: cai run CONFIG --stages {args.stage} --run-dir {args.run_dir}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from constitutional.evaluation.report import missing_parts, write_report
    from constitutional.rundir import RunDir

    run = RunDir(Path(args.run_dir))
    write_report(run)
    metrics = json.loads(run.path("eval_metrics").read_text()) if run.path("eval_metrics").exists() else None
    for item in missing_parts(run, run.read_manifest(), metrics):
        print(f"missing: {item}", file=sys.stderr)
    print_headline(run.root)
    return 0


def print_headline(root: Path) -> None:
    """The report's path and the headline table (the end of `make demo`)."""
    from constitutional.evaluation.independence import judge_description
    from constitutional.evaluation.metrics import headline_rows, text_table
    from constitutional.rundir import RunDir

    run = RunDir(root)
    if run.path("eval_metrics").exists():
        metrics = json.loads(run.path("eval_metrics").read_text(encoding="utf-8"))
        print(
            f"\nHeadline figures, judged by {judge_description(metrics)}.\n(Elo relative to the helpful model, 95% "
            "interval; harm 0-4, chance 2.0; evasive and over-refusal: pattern share (judge share)):"
        )
        print(text_table(headline_rows(metrics)))
    if run.path("eval_report").exists():
        print(f"\nreport: {run.path('eval_report').resolve()}")


def command_score(args: argparse.Namespace) -> int:
    from constitutional.preference import PreferenceModel
    from constitutional.records import conversation
    from constitutional.rundir import RunDir
    from constitutional.training import is_complete_model

    path = RunDir(Path(args.run_dir)).path("pm")
    if not is_complete_model(path):
        raise UserError(f"{path}: no preference model here; make one with `cai run CONFIG --stages pm`")
    prompts = read_rows(Path(args.prompts), "prompt")
    responses = [row["response"] for row in read_rows(Path(args.responses), "response")]
    if len(prompts) != len(responses):
        raise UserError(
            f"{args.prompts} has {len(prompts)} prompts but {args.responses} has {len(responses)} responses"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive number, got {args.batch_size}")
    model = PreferenceModel.load(path, batch_size=args.batch_size)
    scores = model.score([conversation(row) for row in prompts], responses)
    for row, response, value in zip(prompts, responses, scores):
        print(json.dumps({"prompt": row["prompt"], "response": response, "score": round(value, 6)}, ensure_ascii=False))
    return 0


def read_rows(path: Path, field: str) -> list[dict]:
    """Rows of a .txt file (one `field` per line) or a .jsonl file (objects with `field`), for `cai score`."""
    from constitutional.records import numbered_records

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        rows = []
        for number, record in numbered_records(path):
            if not isinstance(record.get(field), str):
                raise UserError(f"{path}:{number}: missing field {field!r}")
            rows.append(record)
        return rows
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    return [{field: line} for line in lines if line.strip()]


def command_prepare_model(args: argparse.Namespace) -> int:
    from constitutional.models import local_weights_dir, resolve_model_name

    path = local_weights_dir(resolve_model_name(args.model, os.getcwd()))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
