"""vLLM over every GPU of one machine: one engine per group of GPUs, each in a process of its own.

`vllm.data_parallel_size: N` (with `vllm.tensor_parallel_size: T`) starts N worker processes,
worker i seeing GPUs i*T .. i*T+T-1 of this process's (`CUDA_VISIBLE_DEVICES` set before vLLM is
imported there), each holding one `VLLMBackend`. Every batch is cut into N contiguous slices, one
per worker, answered side by side and put back in order. Every request carries its own seed
(`VLLMBackend.generate`), so an answer does not depend on which engine or batch it went to: the
records equal those of one engine. This is vLLM's offline data parallelism done the way its own
example does it (a process per engine), without a launcher for the user to run.

Workers are spawned (never forked: CUDA and vLLM's threads do not survive a fork) and talk through
pipes; a worker that fails to start, raises, or dies is a `ServiceError` naming its GPUs, and
`close()` stops every worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from constitutional.backends.base import Backend, SamplingParams
from constitutional.backends.settings import VLLMSettings
from constitutional.errors import ServiceError, UserError

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 60.0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (else 0..count-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_groups(settings: VLLMSettings) -> list[list[str]]:
    """The GPUs of each engine: `data_parallel_size` groups of `tensor_parallel_size`.

    Raises:
        UserError: fewer GPUs visible than the engines need, naming both keys.
    """
    gpus, width = visible_gpus(), settings.tensor_parallel_size
    needed = settings.data_parallel_size * width
    if needed > len(gpus):
        raise UserError(
            f"vllm.data_parallel_size: {settings.data_parallel_size} engines x vllm.tensor_parallel_size {width} "
            f"need {needed} GPUs; this process sees {len(gpus)}"
        )
    return [gpus[index * width : (index + 1) * width] for index in range(settings.data_parallel_size)]


class DataParallelVLLM(Backend):
    """`data_parallel_size` vLLM engines in worker processes, used as one back end."""

    scoring_method = "prompt logprobs"

    def __init__(self, load_engine: str, model_name: str, settings: VLLMSettings, base_dir: str, seed: int) -> None:
        """Start the engines: each worker calls `load_engine(model_name, settings, base_dir, seed)` on its GPUs.

        `load_engine` names a function, "module:function", imported in the worker once its GPUs are set.
        """
        context = multiprocessing.get_context("spawn")
        self.workers: list[tuple[Any, Any, list[str]]] = []
        try:
            for gpus in gpu_groups(settings):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=serve, args=(theirs, gpus, load_engine, (model_name, settings, base_dir, seed)), daemon=True
                )
                with _visible(gpus):  # the worker starts with only its GPUs in its environment
                    process.start()
                theirs.close()
                self.workers.append((process, ours, gpus))
            # Every engine loads at once; the model id is theirs (they all load the same weights).
            self.model_id = [self._receive(index) for index in range(len(self.workers))][0]
        except BaseException:
            self.close()
            raise
        log.info("vllm: %d engines on GPUs %s", len(self.workers), [gpus for _, _, gpus in self.workers])

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        slices = self._slices(len(prompts))
        return self._each("generate", [(list(prompts[s]), params, seeds[s]) for s in slices])

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        return self._each("score_options", [(list(prompts[s]), list(options)) for s in self._slices(len(prompts))])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        self._send(0, "apply_chat_template", (messages,))
        return self._receive(0)

    def close(self) -> None:
        """Stop every worker (each shuts its engine down); a second call does nothing."""
        workers, self.workers = self.workers, []
        for _, connection, _ in workers:
            with contextlib.suppress(OSError, ValueError):  # a worker already gone
                connection.send(("close", ()))
        for process, connection, gpus in workers:
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning("vllm: the engine on GPUs %s did not stop in %.0f s; terminating it", gpus, _STOP_TIMEOUT_S)
                process.terminate()
                process.join()
            connection.close()

    def _slices(self, count: int) -> list[slice]:
        """Contiguous, near-equal slices of `count` items, one per worker (some empty when count is small)."""
        workers = len(self.workers)
        bounds = [count * index // workers for index in range(workers + 1)]
        return [slice(bounds[index], bounds[index + 1]) for index in range(workers)]

    def _each(self, method: str, arguments: list[tuple[Any, ...]]) -> list[Any]:
        """Send each worker its slice, then gather the answers in order (empty slices are not sent)."""
        asked = [index for index, args in enumerate(arguments) if args[0]]
        for index in asked:
            self._send(index, method, arguments[index])
        return [item for index in asked for item in self._receive(index)]

    def _send(self, index: int, method: str, arguments: tuple[Any, ...]) -> None:
        try:
            self.workers[index][1].send((method, arguments))
        except (OSError, ValueError):
            raise ServiceError(f"vllm: the engine on GPUs {self.workers[index][2]} has stopped") from None

    def _receive(self, index: int) -> Any:
        process, connection, gpus = self.workers[index]
        try:
            status, value = connection.recv()
        except (EOFError, OSError):
            process.join(1)
            raise ServiceError(
                f"vllm: the engine process on GPUs {gpus} exited (code {process.exitcode}); see its log above"
            ) from None
        if status == "error":
            raise ServiceError(f"vllm: the engine on GPUs {gpus} failed: {value}")
        if status == "user_error":
            raise UserError(value)
        return value


@contextlib.contextmanager
def _visible(gpus: list[str]) -> Iterator[None]:
    """`CUDA_VISIBLE_DEVICES` set to `gpus` in this process's environment for a while (a spawn copies it)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def serve(connection: Any, gpus: list[str], load_engine: str, arguments: tuple[Any, ...]) -> None:
    """A worker: load one engine on `gpus`, then answer (method, arguments) requests until "close"."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # as the parent set it: before vLLM is imported
    module, function = load_engine.split(":")
    try:
        backend = getattr(importlib.import_module(module), function)(*arguments)
    except UserError as error:
        connection.send(("user_error", str(error)))
        return
    except Exception as error:  # the parent turns it into one line naming these GPUs
        connection.send(("error", _describe(error)))
        return
    connection.send(("ok", backend.model_id))
    try:
        while True:
            method, call_arguments = connection.recv()
            if method == "close":
                break
            try:
                connection.send(("ok", getattr(backend, method)(*call_arguments)))
            except Exception as error:
                connection.send(("error", _describe(error)))
    except (EOFError, KeyboardInterrupt):
        pass  # the parent has gone: stop the engine all the same
    finally:
        backend.close()


def _describe(error: Exception) -> str:
    """The error on one line, with where it was raised (the worker's traceback is not the parent's)."""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {error}{place}"
