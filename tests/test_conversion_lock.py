"""A GGUF is converted once even when several processes of a launch (or two runs) ask for it at once.

The real conversion (`models.dequantise`: transformers reading the GGUF) is replaced by a slow
stand-in that counts its calls, so that the askers overlap; they are threads, each opening the lock file itself, which
`flock` treats like separate processes.
"""

from __future__ import annotations

import threading
import time

from constitutional import models

calls: list[int] = []


def slow_dequantise(gguf, folder):
    calls.append(1)
    time.sleep(0.5)  # long enough for every other asker to arrive meanwhile
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


def test_concurrent_askers_convert_once_and_all_get_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "dequantise", slow_dequantise)
    gguf, target = tmp_path / "model.gguf", tmp_path / "cache" / "model"
    gguf.write_bytes(b"GGUF")
    results, errors = [], []

    def ask():
        try:
            results.append(models.convert_gguf(gguf, target))
        except Exception as error:  # collected: a thread's exception would not fail the test
            errors.append(error)

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert not errors and results == [target] * 4
    assert len(calls) == 1  # a single conversion
    assert (target / "config.json").exists() and not target.with_name("model.partial").exists()
