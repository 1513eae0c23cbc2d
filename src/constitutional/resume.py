"""Resuming from a checkpoint that cannot be loaded safely: one line that says what to do.

Checkpoints are read back with `weights_only=True` (torch) and safetensors, so a file replaced by
a pickle that runs code is never run. Loading it still fails, with torch's long traceback that
ends by suggesting `weights_only=False`, the one thing not to do with a file from elsewhere. A
truncated or corrupt file fails in other ways. `refuse_unsafe_checkpoint` turns each of these into
one UserError line (exit 2) naming the checkpoint and how to start the stage again without it.

accelerate's `load_state` is the one reader that swallows a failure: random states it cannot load
are only logged ("Could not load random states", at INFO) and the run goes on with other random
numbers than the interrupted run's. `refuse_unloaded_random_states` listens for that line.
"""

from __future__ import annotations

import logging
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
    reason = str(error) if isinstance(error, RuntimeError) and str(error).startswith("its ") else type(error).__name__
    return UserError(
        f"{stage}: the checkpoint {checkpoint} cannot be loaded safely ({reason}): a file in it is "
        f"corrupt, truncated or not the one this run wrote, and it was not run; remove {where} to train {stage} "
        f"from the start (`rm -r {where}`), then run the same command again"
    )


@contextmanager
def refuse_unloaded_random_states(stage: str, checkpoint: Path) -> Iterator[None]:
    """Run accelerate's `load_state(checkpoint)`; random states it could not load are a refusal, not a note.

    Raises:
        UserError: accelerate logged that it could not load the checkpoint's random states.
    """

    class Listener(logging.Handler):
        failed = False

        def emit(self, record: logging.LogRecord) -> None:
            if "Could not load random states" in record.getMessage():  # after accelerate's "[RANK n] "
                Listener.failed = True

    logger, listener = logging.getLogger("accelerate.checkpointing"), Listener()
    level = logger.level
    logger.setLevel(logging.INFO)  # the line is logged at INFO: heard whatever the root logger's level
    logger.addHandler(listener)
    try:
        yield
    finally:
        logger.removeHandler(listener)
        logger.setLevel(level)
    if Listener.failed:
        raise _refusal(stage, checkpoint, RuntimeError("its random_states_*.pkl could not be read"))
