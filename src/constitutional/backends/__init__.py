"""Back ends registered by name and imported lazily.

`import constitutional` needs neither vLLM nor an HTTP client: a back end's module is imported
only when a config selects it. Each module exposes `load(model_name, config) -> Backend`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from constitutional.backends.base import Backend, SamplingParams, cut_at_stop
from constitutional.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from constitutional.config import Config, ModelSpec

__all__ = ["Backend", "SamplingParams", "cut_at_stop", "BACKENDS", "register_backend", "import_backend", "load_backend", "open_backend"]

# name -> "module:function"; the function takes (model_name, config) and returns a Backend.
BACKENDS: dict[str, str] = {
    "transformers": "constitutional.backends.transformers:load",
    "openai": "constitutional.backends.openai:load",
    "vllm": "constitutional.backends.vllm:load",
}


def register_backend(name: str, target: str) -> None:
    """Register a back end under `name`; `target` is "package.module:function"."""
    BACKENDS[name] = target


def load_backend(backend_name: str, model_name: str, config: "Config") -> Backend:
    """Import the back end's module and load `model_name` with it.

    Raises:
        UserError: unknown back end name, or its optional dependency is not installed.
    """
    return getattr(import_backend(backend_name), BACKENDS[backend_name].split(":")[1])(model_name, config)


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
            f"install it, e.g. `pip install 'constitutional[{backend_name}]'`"
        ) from error


def open_backend(spec: "ModelSpec", config: "Config", cache_path: "Path | None") -> Backend:
    """Load the model named by `spec` with its back end, behind the generation cache if enabled.

    Args:
        spec: the model (name, back end override).
        config: the run's config (back-end settings, cache settings).
        cache_path: where the cache lives unless `config.cache.path` says otherwise.
    """
    from constitutional.backends.cache import CachingBackend

    backend = load_backend(config.backend_for(spec), spec.name, config)
    if not config.cache.enabled:
        return backend
    path = config.resolve_path(config.cache.path) if config.cache.path else cache_path
    return CachingBackend(backend, path) if path is not None else backend
