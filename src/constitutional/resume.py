"""Resuming from a checkpoint that cannot be loaded safely: one line that says what to do.

Checkpoints are read back with `weights_only=True` (torch) and safetensors, so a file replaced by
a pickle that runs code is never run. Loading it still fails, with torch's long traceback that
ends by suggesting `weights_only=False`, the one thing not to do with a file from elsewhere. A
truncated or corrupt file fails in other ways. `refuse_unsafe_checkpoint` turns each of these into
one UserError line (exit 2) naming the checkpoint and how to start the stage again without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from constitutional.errors import UserError

# What torch and safetensors raise for a checkpoint file that is not what it should be.
LOAD_FAILURES = (
    "Weights only load failed",
    "PytorchStreamReader",
    "central directory",
    "deserializ",  # safetensors' SafetensorError on a file it cannot read (writing says "serializ")
    "invalid load key",
)


@contextmanager
def refuse_unsafe_checkpoint(stage: str, checkpoint: Path | None) -> Iterator[None]:
    """Run a resume from `checkpoint` (None: a fresh start, nothing to refuse); a bad file is one line.

    Raises:
        UserError: the checkpoint could not be loaded safely (corrupt, truncated or altered).
    """
    try:
        yield
    except Exception as error:
        # Only a read that failed: a full disk while saving a later checkpoint is not a bad checkpoint.
        # By name: this module never imports pickle (tests/test_security.py checks the whole package).
        failed_read = type(error).__name__ in ("UnpicklingError", "EOFError") or any(
            text in str(error) for text in LOAD_FAILURES
        )
        if checkpoint is None or not failed_read:
            raise
        raise _refusal(stage, checkpoint, error) from None


def _refusal(stage: str, checkpoint: Path | None, error: BaseException) -> UserError:
    where = checkpoint.parent if checkpoint is not None else "its checkpoints"
    return UserError(
        f"{stage}: the checkpoint {checkpoint} cannot be loaded safely ({type(error).__name__}): a file in it is "
        f"corrupt, truncated or not the one this run wrote, and it was not run; remove {where} to train {stage} "
        f"from the start (`rm -r {where}`), then run the same command again"
    )
