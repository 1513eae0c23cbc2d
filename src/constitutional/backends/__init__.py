"""Back ends registered by name and imported lazily.

`import constitutional` needs neither vLLM nor an HTTP client: a back end's module is imported
only when a config selects it. Each module exposes `load(model_name, settings, base_dir, seed)
-> Backend`, where `settings` is its own config section (see `backends/settings.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

from constitutional.backends.base import Backend, SamplingParams, cut_at_stop
from constitutional.errors import UserError

__all__ = ["Backend", "SamplingParams", "cut_at_stop", "BACKENDS", "register_backend", "import_backend", "load_backend"]

# name -> "module:function"; the function takes (model_name, settings, base_dir, seed) and returns a Backend.
BACKENDS: dict[str, str] = {
    "transformers": "constitutional.backends.transformers:load",
    "openai": "constitutional.backends.openai:load",
    "vllm": "constitutional.backends.vllm:load",
}


def register_backend(name: str, target: str) -> None:
    """Register a back end under `name`; `target` is "package.module:function"."""
    BACKENDS[name] = target


def load_backend(backend_name: str, model_name: str, settings: Any, base_dir: str, seed: int) -> Backend:
    """Import the back end's module and load `model_name` with it.

    Args:
        backend_name: a registered name (`transformers`, `openai`, `vllm`, ...).
        model_name: the model as the back end knows it (path, hub id, server-side name).
        settings: the back end's own config section.
        base_dir: the config's folder (relative model paths resolve against it).
        seed: the run seed.

    Raises:
        UserError: unknown back end name, or its optional dependency is not installed.
    """
    return getattr(import_backend(backend_name), BACKENDS[backend_name].split(":")[1])(
        model_name, settings, base_dir, seed
    )


def import_backend(backend_name: str) -> Any:
    """Import a back end's module (stages call it while validating, before writing anything).

    Raises:
        UserError: unknown back end name, or its optional dependency is not installed.
    """
    if backend_name not in BACKENDS:
        raise UserError(f"unknown back end {backend_name!r}: expected one of {', '.join(sorted(BACKENDS))}")
    try:
        return importlib.import_module(BACKENDS[backend_name].split(":")[0])
    except ImportError as error:
        raise UserError(
            f"back end {backend_name!r} needs a package that is not installed ({error.name}); "
            f"install it from the checkout, e.g. `pip install -e '.[{backend_name}]'` (vLLM: in an environment "
            "with its own torch)"
        ) from error
