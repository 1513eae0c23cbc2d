"""Run `cai` and SIGKILL it at a planned moment: the kill campaign's process (tests/test_kill_campaign.py).

    python tests/kill_driver.py run CONFIG --run-dir DIR --stages S      (the arguments of `cai`)

with, for a planned kill, one of
- `CAI_KILL_AT=<module>.<attribute>@<n>`: SIGKILL on entering the n-th call of that function
  (looked up where callers find it: a module attribute or a class method), e.g.
  `torch.save@1` (the first checkpoint's optimizer state, its weights already written),
  `constitutional.training._finish_partial@1` (the model written to `.partial`, not yet renamed),
  `os.replace@2` (`--rerun` moving old outputs, half done);
- `CAI_KILL_AT=...@<n>:torn`: the same, after appending half a JSON line (`TORN_LINE`) to the
  call's first argument (a record file): a write cut short.

Without `CAI_KILL_AT` it is plain `cai`: a kill at a random moment is sent by the campaign itself
(SIGKILL from the parent, once the manifest says the stage is running), so that it is known to
land inside the stage, not in Python's or torch's start-up.

SIGKILL gives the process no chance to clean up, exactly like the OOM killer or a lost machine.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

# What a `:torn` kill leaves at the end of a record file: the start of a record, no newline.
TORN_LINE = '{"id": "torn-by-the-kill", "prom'


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def resolve(target: str) -> tuple[Any, str]:
    """(owner, attribute name) of "package.module.attr" or "package.module.Class.method"."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ValueError(f"cannot import {target}")


def plant(spec: str) -> None:
    """Replace the target with a wrapper that kills the process on its n-th call."""
    target, _, rest = spec.partition("@")
    count, _, mode = rest.partition(":")
    owner, name = resolve(target)
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == int(count):
            if mode == "torn":  # half a record, as a write cut short by the kill
                with Path(args[0]).open("a", encoding="utf-8") as handle:
                    handle.write(TORN_LINE)
                    handle.flush()
                    os.fsync(handle.fileno())
            die()
        return original(*args, **kwargs)

    setattr(owner, name, staticmethod(wrapper) if isinstance(owner, type) and _is_static(owner, name) else wrapper)


def _is_static(owner: type, name: str) -> bool:
    return isinstance(owner.__dict__.get(name), staticmethod)


def main() -> None:
    if os.environ.get("CAI_KILL_AT"):
        plant(os.environ["CAI_KILL_AT"])
    from constitutional.cli import main as cai

    sys.exit(cai(sys.argv[1:]))


if __name__ == "__main__":
    main()
