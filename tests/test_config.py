from pathlib import Path

import pytest

from constitutional.config import Config, apply_override, config_from_dict, load_config
from constitutional.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_loads_and_names_every_key():
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert config.models.helpful.name == "embedded"
    assert config.critique.rounds >= 1
    assert config.base_dir == str((REPO / "configs").resolve())


def test_7b_recipe_loads_with_the_papers_proportions():
    config = load_config(REPO / "configs" / "recipe-7b.yaml")
    assert config.critique.rounds == 4  # the paper's revisions per prompt
    # SL (section 3.1): 182,831 red-team prompts x 4 revisions beside 135,296 helpfulness prompts x 2
    # samples; the PM mix: 135,296 human helpfulness beside 182,831 AI harmlessness comparisons.
    sl_share = 135_296 * 2 / (135_296 * 2 + 182_831 * 4)
    pm_share = 135_296 / (135_296 + 182_831)
    assert config.sl.targets == "all_revisions"
    assert config.sl.helpful_fraction == pytest.approx(sl_share, abs=1e-3)
    assert config.pm.helpful_fraction == pytest.approx(pm_share, abs=1e-3)
    assert config.pm.init == "base" and config.sl.epochs == 1 and config.pairs.temperature == 1.0
    assert config.backend == "vllm" and config.vllm.enable_prefix_caching
    assert config.training.gradient_checkpointing and config.training.precision == "bf16"


def test_overrides_parse_yaml_values_and_promote_model_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  helpful: embedded\n")
    config = load_config(
        path,
        ["critique.rounds=3", "critique.temperature=0.5", "models.helpful.backend=openai", "data.max_red_team=null"],
    )
    assert config.critique.rounds == 3
    assert config.critique.temperature == 0.5
    assert config.models.helpful.name == "embedded"
    assert config.models.helpful.backend == "openai"
    assert config.backend_for(config.models.helpful) == "openai"
    assert config.data.max_red_team is None


def test_int_is_accepted_where_a_float_is_expected():
    assert config_from_dict({"critique": {"temperature": 1}}).critique.temperature == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"critique": {"roundz": 2}}, "unknown config key 'critique.roundz'"),
        ({"nonsense": 1}, "unknown config key 'nonsense'"),
        ({"critique": {"rounds": "four"}}, "critique.rounds: expected an integer, got 'four'"),
        ({"critique": {"rounds": True}}, "critique.rounds: expected an integer"),
        ({"backend": "tensorrt"}, "backend: unknown back end 'tensorrt'"),
        ({"models": {"helpful": {"backend": "x"}}}, "models.helpful.backend: unknown back end 'x'"),
        ({"models": {"helpful": {"prompt_format": "fancy"}}}, "models.helpful.prompt_format: expected one of"),
        ({"critique": {"top_p": 0}}, "critique.top_p"),
        ({"cache": {"enabled": "yes"}}, "cache.enabled: expected true or false"),
        ({"critique": 3}, "critique: expected a mapping"),
        # Back-end settings are checked with the config, before anything is written, not at use.
        ({"openai": {"max_retries": -1}}, "openai.max_retries: expected 0 or more"),
        ({"openai": {"backoff_initial_s": -0.5}}, "openai.backoff_initial_s: expected 0 or more"),
        ({"openai": {"base_url": "localhost:8000"}}, "openai.base_url: expected an http(s) URL"),
        ({"vllm": {"tensor_parallel_size": 0}}, "vllm.tensor_parallel_size: expected a positive number"),
        ({"vllm": {"gpu_memory_utilization": 1.5}}, "vllm.gpu_memory_utilization: expected a number in (0, 1]"),
        ({"vllm": {"dtype": "fp8"}}, "vllm.dtype: expected one of auto"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("critique:\n  rounds: [1,\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(UserError, match="binary.yaml: not valid UTF-8"):
        load_config(binary)


def test_override_without_equals_is_refused():
    with pytest.raises(UserError, match="expected key.path=value"):
        apply_override({}, "critique.rounds")


def test_resolved_config_round_trips():
    config = config_from_dict({"critique": {"rounds": 1}, "models": {"helpful": "x/y"}})
    again = config_from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert isinstance(again, Config)


def test_a_nested_section_given_in_part_keeps_its_stage_defaults():
    """rl.lora is on by default: setting its rank alone must not switch it off."""
    assert config_from_dict({"rl": {"lora": {"r": 4}}}).rl.lora.enabled
    assert config_from_dict({"rl": {"lora": {"r": 4}}}).rl.lora.r == 4
    assert not config_from_dict({"rl": {"lora": {"enabled": False}}}).rl.lora.enabled
    assert not config_from_dict({"sl": {"lora": {"r": 4}}}).sl.lora.enabled  # sl's default is off
