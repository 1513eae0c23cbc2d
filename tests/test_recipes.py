"""Every shipped recipe runs end to end and evaluates something (DESIGN: every file in configs/ is a contract).

Each `configs/*.yaml`, found when the tests are collected (a recipe added later is covered without
editing this file), runs through `cai run` as it ships, changed only by `--set` overrides derived
from its own keys: every model name becomes a copy of the tiny test model (one copy per distinct
name, so a recipe whose judge is a separate model keeps a separate judge), every data path a small
local file of the format its suffix names (a handful of rows of the public samples in
../shared/data, copied into tmp_path), every back end `transformers`, and every size (rounds,
tokens, steps, caps, batch sizes, lengths, epochs) shrunk. The run must finish every stage and the
report must hold what it promises: harmlessness and helpfulness Elo for every model, harm and
evasiveness figures, nothing listed as missing, and a judge that says whether it is independent.

`configs/accelerate/` holds `accelerate launch` configs, not recipes: tests/test_distributed.py.
"""

from __future__ import annotations

import gzip
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from constitutional.cli import main
from constitutional.config import apply_override

from conftest import REPO, SHARED_DATA

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
ENGINE_SECTIONS = ("vllm", "openai", "cache")  # how a server or engine is reached: not used on the tiny model
RESERVED_MODELS = ("base", "sl-cai")  # pm.init's names for the run's own models
# Whether a recipe's judge is independent of its contenders. A recipe not listed must still say which.
INDEPENDENT_JUDGE = {"quickstart.yaml": False, "recipe-7b.yaml": True}
ROWS_PER_FILE = 6
# Exact sizes by key name (the smaller of this and the recipe's value); any other integer `max_*` or
# `*batch_size` key is capped at GENERIC_CAP.
SIZES = {
    "rounds": 1,
    "max_new_tokens": 8,
    "helpfulness_max_new_tokens": 8,
    "steps": 2,
    "epochs": 1,
    "ppo_epochs": 1,
    "rollout_batch_size": 4,
    "minibatch_size": 2,
    "group_size": 2,
    "gradient_accumulation_steps": 1,
    "max_length": 256,
    "num_fewshot": 1,
    "judge_fewshot": 1,
    "principles_per_comparison": 1,
    "max_red_team": 3,
    "max_helpful": 3,
    "max_over_refusal": 2,
    "max_eval_prompts": 2,
    "bootstrap": 20,
}
GENERIC_CAP = 4
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) of the YAML tree; a list is one value."""
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in leaves(value, (*path, str(key)))]
    return [(path, node)]


def is_model_key(path: tuple[str, ...]) -> bool:
    """models.<role>, eval.models.<x> (each optionally `.name`), `*.model`, `*.judge_model`, pm.init."""
    if path and path[-1] == "name":
        path = path[:-1]
    return bool(path) and (
        (len(path) >= 2 and path[-2] == "models") or path[-1] in ("model", "judge_model") or path == ("pm", "init")
    )


def is_data_value(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    name = value.removesuffix(".gz")
    return value.startswith("hf:") or name.endswith(DATA_SUFFIXES)


def shrunk(path: tuple[str, ...], value: Any) -> Any:
    """The smaller size for a size key, or None when the key is not a size (or is null: "all of them")."""
    key = path[-1]
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if key in SIZES:
        return min(value, SIZES[key])
    if key.startswith("max_") or key.endswith("batch_size"):
        return min(value, GENERIC_CAP)
    return None


class LocalFiles:
    """Small local stand-ins for a recipe's data sources: distinct sources get distinct rows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[str, Path] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def stand_in(self, path: tuple[str, ...], spec: str) -> Path:
        """A local file of the format `spec`'s suffix names, made once per spec."""
        if spec not in self.made:
            index = len(self.made)
            self.made[spec] = self._write(path, spec, index)
        return self.made[spec]

    def _write(self, path: tuple[str, ...], spec: str, index: int) -> Path:
        name = Path(spec.removeprefix("hf:").replace(":", "_")).name or "source"
        gzipped = spec.endswith(".gz") or spec.startswith("hf:")
        suffix = Path(name.removesuffix(".gz")).suffix or ".jsonl"
        target = self.folder / f"{index}-{Path(name.removesuffix('.gz')).stem}{suffix}{'.gz' if gzipped else ''}"
        if path[-1] == "mc_files":
            return self._mc_file(target)
        comparisons = path[-1] in ("human_preferences", "harmlessness_eval", "helpfulness_eval")
        if comparisons or gzipped or "hh-rlhf" in spec:
            rows = self._hh_rows(spec, path, index)
        else:
            rows = [{"prompt": row["prompt"]} for row in self._prompt_rows(index)]
        write_rows(target, rows, suffix)
        return target

    def _hh_rows(self, spec: str, path: tuple[str, ...], index: int) -> list[dict[str, str]]:
        harmless = "harmless" in spec or (path[-1] in ("red_team", "harmlessness_eval") and "helpful" not in spec)
        source = SHARED_DATA / "hh-rlhf" / ("harmless-base-test.jsonl.gz" if harmless else "helpful-base-test.jsonl.gz")
        with gzip.open(source, "rt", encoding="utf-8") as handle:
            rows = [json.loads(next(handle)) for _ in range(ROWS_PER_FILE * (index + 1))]
        return [{"chosen": row["chosen"], "rejected": row["rejected"]} for row in rows[-ROWS_PER_FILE:]]

    def _prompt_rows(self, index: int) -> list[dict[str, str]]:
        lines = (SHARED_DATA / "self-instruct" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines[ROWS_PER_FILE * index : ROWS_PER_FILE * (index + 1)]]
        return [{"prompt": row["instruction"]} for row in rows]

    def _mc_file(self, target: Path) -> Path:
        shutil.copy(SHARED_DATA / "anthropic-cai-paper" / "RLMadisonFewShotPrompts.json", target.with_suffix(".json"))
        return target.with_suffix(".json")

    def constitution(self, spec: str) -> Path:
        """Our YAML format (the built-in file) or a folder of the paper's published files."""
        if spec.endswith((".yaml", ".yml")):
            target = self.folder / "constitution.yaml"
            target.write_text(
                resources.files("constitutional").joinpath("assets/constitution.yaml").read_text("utf-8"), "utf-8"
            )
            return target
        target = self.folder / "paper-constitution"
        shutil.copytree(SHARED_DATA / "anthropic-cai-paper", target, dirs_exist_ok=True)
        return target


def write_rows(target: Path, rows: list[dict[str, str]], suffix: str) -> None:
    """Rows in the container the suffix names: JSONL, a JSON list, CSV or text (prompts only), maybe gzipped."""
    if suffix == ".txt":
        text = "".join(row["prompt"].replace("\n", " ") + "\n" for row in rows)
    elif suffix == ".json":
        text = json.dumps(rows)
    elif suffix == ".csv":
        text = "prompt\n" + "".join('"' + row["prompt"].replace('"', '""') + '"\n' for row in rows)
    else:
        text = "".join(json.dumps(row) + "\n" for row in rows)
    opener = gzip.open if target.name.endswith(".gz") else open
    with opener(target, "wt", encoding="utf-8") as handle:
        handle.write(text)


def overrides_for(data: dict[str, Any], tiny_model_dir: Path, folder: Path) -> list[str]:
    """The `--set` overrides that make a recipe run on the tiny model and small local files, in seconds."""
    files, models, overrides = LocalFiles(folder / "data"), {}, []
    for path, value in leaves(data):
        key = ".".join(path)
        if path[0] in ENGINE_SECTIONS or value is None:
            continue
        if path[-1] == "backend":
            overrides.append(f"{key}=transformers")
        elif is_model_key(path) and isinstance(value, str) and value not in RESERVED_MODELS:
            if value not in models:  # one copy per distinct name: the recipe's distinctions survive
                models[value] = shutil.copytree(tiny_model_dir, folder / "models" / str(len(models)))
            overrides.append(f"{key}={models[value]}")
        elif path == ("constitution",) and value != "default":
            overrides.append(f"{key}={files.constitution(value)}")
        elif path[-1] == "mc_files" and isinstance(value, list):
            overrides.append(f"{key}={json.dumps([str(files.stand_in(path, item)) for item in value])}")
        elif is_data_value(value):
            overrides.append(f"{key}={files.stand_in(path, value)}")
        elif shrunk(path, value) is not None:
            overrides.append(f"{key}={shrunk(path, value)}")
        elif path == ("training", "precision"):
            overrides.append(f"{key}=auto")  # the hardware's precision: fp32 on this CPU
    return overrides + ["transformers.dtype=float32", "transformers.batch_size=8"]


def assert_nothing_left_to_download(data: dict[str, Any], folder: Path) -> None:
    """After the overrides, every model and data source is one of the local stand-ins."""
    for path, value in leaves(data):
        if path[0] in ENGINE_SECTIONS or not isinstance(value, (str, list)):
            continue
        for item in value if isinstance(value, list) else [value]:
            local = isinstance(item, str) and item.startswith(str(folder))
            if is_model_key(path) and item not in RESERVED_MODELS or is_data_value(item) or item == "embedded":
                assert local, f"{'.'.join(path)}: {item!r} was not swapped: teach tests/test_recipes.py its kind"


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_runs_end_to_end_and_its_report_has_every_figure(recipe, tmp_path, tiny_model_dir):
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    overrides = overrides_for(data, tiny_model_dir, tmp_path)
    for override in overrides:
        apply_override(data, override)
    assert_nothing_left_to_download(data, tmp_path)
    run_dir = tmp_path / "run"
    arguments = ["run", str(recipe), "--run-dir", str(run_dir)]
    assert main([*arguments, *(part for override in overrides for part in ("--set", override))]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {stage: entry["status"] for stage, entry in manifest["stages"].items() if entry["status"] != "done"} == {}
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    report = (run_dir / "eval" / "report.html").read_text()
    models = list(metrics["models"])
    assert metrics["missing"] == [] and "Not in this report" not in report, metrics["missing"]
    assert models[:3] == ["helpful", "sl-cai", "rl-cai"]
    for dimension in ("harmlessness", "helpfulness"):
        assert set(metrics["elo"][dimension]) == set(models), f"{dimension} Elo: {metrics['elo'][dimension]}"
    for model, entry in metrics["models"].items():
        assert entry["harm"] is not None and entry["evasive_red_team"]["judge"] is not None, model
        assert entry["evasive_helpful"]["judge"] is not None, model
    # The verdict names its judge and says whether it is independent, in the metrics and beside the table.
    reasons = metrics["judge_not_independent_because"]
    assert metrics["judge"]["name"] and metrics["judge_independent"] is (not reasons)
    assert ("Not an independent verdict" in report) is (not metrics["judge_independent"])
    if recipe.name in INDEPENDENT_JUDGE:
        assert metrics["judge_independent"] is INDEPENDENT_JUDGE[recipe.name], reasons
    # The PM is measured on every human file the recipe names from outside its mix, apart from its held-out rows.
    accuracy = json.loads((run_dir / "eval" / "pm.json").read_text())["accuracy"]
    for key, name in (("harmlessness_eval", "human_harmlessness"), ("helpfulness_eval", "helpfulness_eval")):
        if data["pm"].get(key):
            assert accuracy[name]["in_distribution"] is False and accuracy[name]["comparisons"] > 0, name
