"""The shared training layer: the LM head on labelled positions only, checkpoints, the saved model, settings."""

import importlib.util
import json
import logging

import pytest
import torch
import trl.trainer.utils as trl_utils
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

from constitutional import devices, training
from constitutional.errors import UserError
from constitutional.lm_head import loss_positions_only
from constitutional.training import SUMMARY, TrainingSettings, trainer_arguments

# Prompts of different lengths, so the batch is padded; the prompt tokens carry no loss.
PROMPTS = [
    "Human: How do I bake bread?\n\nAssistant:",
    "Human: Explain photosynthesis briefly, please.\n\nAssistant:",
    "Human: Hi.\n\nAssistant:",
]
COMPLETIONS = [" Mix flour, water and salt, then bake.", " Plants make sugar from light.", " Hello!"]


# --- the LM head on labelled positions only ---------------------------------------------------


class HeadRows(TorchDispatchMode):
    """Records how many positions each matmul against the LM head's weight projects to the vocabulary.

    A forward hook on `get_output_embeddings()` would see nothing: TRL's fused LM head reads the
    head's weight directly, in vocabulary tiles (`torch.mm(hidden_rows, weight[start:end].t())`),
    in the forward and again in the backward. This sees those matmuls at the aten level, whatever
    code issues them, by the storage their right-hand operand (a view of the weight) lives in.
    """

    def __init__(self, head_weight):
        super().__init__()
        self.storage = head_weight.untyped_storage().data_ptr()
        self.rows = []  # per matmul: positions (rows of hidden states) projected

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.mm and args[1].untyped_storage().data_ptr() == self.storage:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def sft_trainer(model_dir, output_dir):
    """A real SFTTrainer on CPU: one step over the three examples in one padded batch, loss on the completions."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=len(PROMPTS),
        learning_rate=1e-3,
        completion_only_loss=True,
        packing=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **trainer_arguments(TrainingSettings(device="cpu", precision="fp32")),  # the weight itself in the matmul
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def positions(trainer):
    """(labelled, all) positions of the one training batch: next-token labels that are not -100, and B * (T - 1)."""
    rows = trainer.train_dataset
    labelled = sum(label != -100 for row in rows for label in row["labels"][1:])
    longest = max(len(row["input_ids"]) for row in rows)
    return labelled, len(rows) * (longest - 1)


def train_counting_head_rows(trainer):
    counter = HeadRows(trainer.model.get_output_embeddings().weight)
    with counter:
        trainer.train()
    assert counter.rows, "the LM head's weight was never used: the measurement is broken"
    return counter.rows


def test_lm_head_scores_only_labelled_positions_on_cpu(tiny_model_dir, tmp_path):
    trainer = sft_trainer(tiny_model_dir, tmp_path / "patched")
    labelled, everything = positions(trainer)
    assert 0 < labelled < everything
    with loss_positions_only() as active:
        assert active
        rows = train_counting_head_rows(trainer)
    assert set(rows) == {labelled}  # forward and backward: only the completion positions
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored on exit
    # Without it, TRL scores every position on CPU: the test notices an optimisation that does nothing.
    rows = train_counting_head_rows(sft_trainer(tiny_model_dir, tmp_path / "stock"))
    assert set(rows) == {everything}


def loss_and_grads(trainer, batch):
    """The training loss on `batch` and the gradients it gives, weights unchanged."""
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def assert_warned_off(caplog, why):
    warnings = [r for r in caplog.records if r.name == "constitutional.lm_head" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "is off" in warnings[0].getMessage() and why in warnings[0].getMessage()


def test_missing_trl_internal_turns_the_optimisation_off_with_a_warning(monkeypatch, caplog):
    monkeypatch.delattr(trl_utils, "_use_triton", raising=False)
    with caplog.at_level(logging.WARNING), loss_positions_only() as active:
        assert active is False
        assert not hasattr(trl_utils, "_use_triton")  # nothing patched in
    assert not hasattr(trl_utils, "_use_triton")
    assert_warned_off(caplog, "_use_triton is missing")


def test_unused_trl_internal_turns_it_off_and_training_stays_correct(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """TRL keeps `_use_triton` but its fused head no longer calls it: same loss and gradients, every position scored.

    (Deleting `_use_triton` cannot show training: the installed TRL's own forward calls it.)
    """
    trainer = sft_trainer(tiny_model_dir, tmp_path / "ckpt")
    batch = trainer.data_collator(list(trainer.train_dataset))
    with loss_positions_only() as active:
        assert active
        patched_loss, patched_grads = loss_and_grads(trainer, batch)

    def add_fused_lm_head_elsewhere(model, *args, **kwargs):
        """Stands for a TRL whose fused head decides differently (never called)."""

    monkeypatch.setattr(trl_utils, "add_fused_lm_head", add_fused_lm_head_elsewhere)
    with caplog.at_level(logging.WARNING), loss_positions_only() as active:
        assert active is False
        stock_loss, stock_grads = loss_and_grads(trainer, batch)
        rows = train_counting_head_rows(trainer)
    assert_warned_off(caplog, "no longer calls _use_triton")
    torch.testing.assert_close(stock_loss, patched_loss)
    for name, grad in patched_grads.items():
        torch.testing.assert_close(stock_grads[name], grad, msg=name)
    assert set(rows) == {positions(trainer)[1]}  # trained, the stock way
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


# --- checkpoints ------------------------------------------------------------------------------


def write_checkpoint(directory, step, state=True, weights="model.safetensors", tokens=0):
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": tokens}))
    if weights:
        (path / weights).write_bytes(b"weights")
    return path


def test_last_complete_checkpoint_picks_the_newest_whole_one_and_removes_broken_ones(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, 2)
    newest = write_checkpoint(checkpoints, 10, weights="adapter_model.safetensors", tokens=1234)  # 10 > 2: numeric
    no_weights = write_checkpoint(checkpoints, 12, weights=None)
    no_state = write_checkpoint(checkpoints, 15, state=False)  # killed before trainer_state.json
    garbled = write_checkpoint(checkpoints, 20)
    (garbled / "trainer_state.json").write_text('{"global_st')
    (checkpoints / "runs").mkdir()
    (checkpoints / "checkpoint-99").write_text("a file, not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="constitutional.training"):
        assert training.last_complete_checkpoint(checkpoints) == newest
    assert not no_weights.exists() and not no_state.exists() and not garbled.exists()
    assert sum("incomplete checkpoint" in r.getMessage() for r in caplog.records) == 3
    assert training.checkpoint_step(newest) == 10 and training.tokens_seen(newest) == 1234
    assert training.tokens_seen(None) == 0
    with pytest.raises(ValueError, match="checkpoint-N"):
        training.checkpoint_step(checkpoints / "runs")
    training.remove_checkpoints(checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-99", "runs"]
    assert training.last_complete_checkpoint(checkpoints) is None
    assert training.last_complete_checkpoint(tmp_path / "absent") is None
    training.remove_checkpoints(tmp_path / "absent")


def test_save_model_atomic_writes_a_whole_model_and_replaces_a_leftover(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    output = tmp_path / "models" / "sl-cai"
    output.mkdir(parents=True)
    (output / "model.safetensors").write_bytes(b"half")  # a leftover without a summary
    (output / "stray.txt").write_text("old")
    assert not training.is_complete_model(output)
    partial = output.with_name("sl-cai.partial")
    partial.mkdir()
    (partial / "stale.txt").write_text("from a crash")
    state = TrainerState(global_step=7)

    training.save_model_atomic(model, tokenizer, output, {"steps": 7, "train_loss": 1.5}, state)
    files = {p.name for p in output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", SUMMARY} <= files
    assert "stray.txt" not in files and "stale.txt" not in files and not partial.exists()
    assert json.loads((output / SUMMARY).read_text()) == {"steps": 7, "train_loss": 1.5}
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 7
    assert training.is_complete_model(output)
    saved = AutoModelForCausalLM.from_pretrained(output).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    # Without a trainer state, none is written.
    training.save_model_atomic(model, tokenizer, output, {"steps": 7})
    assert not (output / "trainer_state.json").exists() and training.is_complete_model(output)


def test_is_complete_model_needs_summary_and_weights(tmp_path):
    assert not training.is_complete_model(tmp_path / "absent")
    (tmp_path / SUMMARY).write_text("{}")
    assert not training.is_complete_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # sharded weights
    assert training.is_complete_model(tmp_path)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"device": "gpu"}, "training.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ({"device": "cuda:x"}, "training.device"),
        ({"device": "cuda:"}, "training.device"),
        ({"precision": "half"}, "training.precision: expected one of auto, bf16, fp16, fp32"),
        ({"report_to": "mlflow"}, "training.report_to: expected one of none, tensorboard, wandb, got 'mlflow'"),
        ({"trust_remote_code": "yes"}, "training.trust_remote_code"),
    ],
)
def test_validate_names_the_bad_key(settings, message):
    with pytest.raises(UserError, match=f"^{message}"):
        TrainingSettings(**settings).validate()


def test_report_to_needs_its_package(monkeypatch):
    installed = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name in installed else None)
    with pytest.raises(UserError, match=r"^training.report_to: 'tensorboard' needs the tensorboard package"):
        TrainingSettings(report_to="tensorboard").validate()
    with pytest.raises(UserError, match=r"^training.report_to: 'wandb' needs the wandb package"):
        TrainingSettings(report_to="wandb").validate()
    installed.add("tensorboardX")  # either writer will do
    TrainingSettings(report_to="tensorboard").validate()
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        TrainingSettings(device=device, report_to="none").validate()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # RewardConfig's own
def test_trainer_arguments_on_a_cpu_only_machine(monkeypatch, tmp_path):
    from trl import RewardConfig, SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # an AVX2 CPU
    expected = {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "dataloader_pin_memory": False,
        "dataloader_num_workers": 0,
        "report_to": [],
    }
    assert trainer_arguments(TrainingSettings()) == expected
    assert trainer_arguments(TrainingSettings(gradient_checkpointing=True))["activation_checkpointing"] is True
    assert trainer_arguments(TrainingSettings(device="cpu", precision="fp32")) == expected
    assert trainer_arguments(TrainingSettings(report_to="tensorboard"))["report_to"] == ["tensorboard"]
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=f"^training.device: '{device}' asked for, but CUDA is not available"):
            trainer_arguments(TrainingSettings(device=device))
    # Any TrainingArguments subclass takes them.
    for config_class in (SFTConfig, RewardConfig):
        args = config_class(output_dir=str(tmp_path), **expected)
        assert args.use_cpu and not args.bf16 and args.device.type == "cpu"


def test_importing_the_module_stays_cheap():
    import subprocess
    import sys

    code = "import sys, constitutional.training; print(sorted({'torch', 'transformers', 'trl'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_auto_precision_is_bf16_where_the_cpu_computes_in_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native = [True]
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native[0])
    assert trainer_arguments(TrainingSettings())["bf16"] is True  # AVX512-BF16 or AMX: autocast to bf16
    assert training.resolved_precision(TrainingSettings()) == "bf16"
    assert training.resolved_precision(TrainingSettings(precision="fp32")) == "fp32"
    training.check_precision(TrainingSettings(precision="bf16"))
    native[0] = False  # emulated bf16 is slower than fp32: auto stays fp32, and bf16 is refused up front
    assert trainer_arguments(TrainingSettings())["bf16"] is False
    assert training.resolved_precision(TrainingSettings()) == "fp32"
    message = r"^training.precision: bf16 asked for, but this CPU \(no AVX512-BF16 or AMX\) has no native bf16"
    with pytest.raises(UserError, match=message):
        training.check_precision(TrainingSettings(precision="bf16"))
    TrainingSettings(precision="bf16").validate()  # a config for bf16 hardware still loads here (cai report)
    with pytest.raises(UserError, match=message):
        trainer_arguments(TrainingSettings(device="cpu", precision="bf16"))


def test_bf16_without_native_bf16_is_refused_before_anything_runs(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from constitutional.cli import main

    from conftest import cai_error_line, tiny_config_data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(tiny_config_data(tiny_model_dir, tmp_path, training={"precision": "bf16"})))
    for command in ("plan", "run"):
        assert main([command, str(config), "--run-dir", str(tmp_path / "run")]) == 2
        assert cai_error_line(capsys.readouterr().err).startswith("cai: error: training.precision: bf16 asked for")
    assert not (tmp_path / "run").exists()
