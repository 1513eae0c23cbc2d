"""Every `cai` command the README and docs/ show runs as written.

A command is any line of a fenced ```bash block (continuation lines joined) that calls `cai` or
`python -m constitutional.cli` (also behind `accelerate launch` or `torchrun`), and any inline
`cai run|plan CONFIG.yaml ...` span; inline spans without a config are prose placeholders
(`cai run --stages <stage>`). A command added to the docs is covered without editing this test.

Each command must parse with the real argument parser; a `run`/`plan` must load its config with
its `--set` overrides (so every key exists and every value validates) and name known stages; and
each doc's commands, in order, must form a sequence that `cai run` accepts: a stage reads only
what an earlier command (or an earlier stage of the same one) made in the same run directory, or
what `cai merge` gathered there (the check `cai plan` and `cai run` make with `check_upstream`).
The commands do not run here: the recipe's models and data are GPU-sized downloads.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from constitutional.cli import build_parser
from constitutional.config import load_config
from constitutional.pipeline import parse_stages
from constitutional.registry import ARTEFACTS
from constitutional.stages import stage_modules

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
INLINE = re.compile(r"`(cai (?:run|plan) [^`]*\.yaml[^`]*)`")


def doc_commands(path: Path) -> list[list[str]]:
    """The argv (after `cai`) of every command in a doc, in order."""
    text = path.read_text(encoding="utf-8")
    found: list[tuple[int, list[str]]] = []
    for block in FENCED.finditer(text):
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in joined.splitlines():
            argv = cai_argv(shlex.split(line, comments=True))
            if argv is not None:
                found.append((block.start(), argv))
    for span in INLINE.finditer(text):
        found.append((span.start(), shlex.split(span.group(1))[1:]))
    return [argv for _, argv in sorted(found, key=lambda item: item[0])]


def cai_argv(words: list[str]) -> list[str] | None:
    """The arguments after `cai` or `-m constitutional.cli`, or None for a line that calls neither."""
    for index, word in enumerate(words):
        if word == "cai":
            return words[index + 1 :]
        if word == "-m" and index + 1 < len(words) and words[index + 1] == "constitutional.cli":
            return words[index + 2 :]
    return None


COMMANDS = [(path, argv) for path in DOCS for argv in doc_commands(path)]


def test_the_docs_show_commands_to_check():
    assert len(COMMANDS) >= 10 and any(argv[0] == "merge" for _, argv in COMMANDS)


@pytest.mark.parametrize("path, argv", COMMANDS, ids=[f"{path.name}:{' '.join(argv)[:60]}" for path, argv in COMMANDS])
def test_each_command_parses_and_its_config_and_settings_exist(path, argv, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' commands run from the repository root
    args = build_parser().parse_args(argv)
    if args.command in ("run", "plan"):
        load_config(args.config, args.overrides)  # unknown keys and bad values raise UserError
        parse_stages(args.stages)


@pytest.mark.parametrize("path", [path for path in DOCS if any(p == path for p, _ in COMMANDS)], ids=lambda p: p.name)
def test_each_docs_commands_form_a_sequence_cai_run_accepts(path, monkeypatch):
    monkeypatch.chdir(REPO)
    modules = stage_modules()
    made: dict[str, set[str]] = {}  # run directory -> stages finished there by earlier commands
    for argv in doc_commands(path):
        args = build_parser().parse_args(argv)
        if args.command == "merge":
            made.setdefault(str(Path(args.run_dir)), set()).add(args.stage)
            continue
        if args.command not in ("run", "plan"):
            continue
        config = load_config(args.config, args.overrides)
        run_dir = str(Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem)
        done = made.setdefault(run_dir, set())
        asked = parse_stages(args.stages)
        for name in asked:
            for artefact in modules[name].reads(config, getattr(config, name)):
                maker = ARTEFACTS[artefact].made_by
                before = maker in done or (maker in asked and asked.index(maker) < asked.index(name))
                assert before, (
                    f"{path.name}: `cai {' '.join(argv)}`: stage {name} reads {ARTEFACTS[artefact].path}, which "
                    f"stage {maker} makes, and no earlier command made it in {run_dir}"
                )
        if args.command == "run" and not args.shard:
            done.update(asked)
