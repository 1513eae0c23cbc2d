"""Benchmark: the one-time conversion of the embedded GGUF into a Hugging Face folder.

Converts the embedded model (Q4_K_M GGUF, dequantised to fp32 safetensors) into a scratch folder
twice, each in a fresh process so neither warms the other: as `cai` does it (`models.dequantise`,
which parses the GGUF once), and the way transformers does it alone (the tokenizer, the config and
the weights each parse the file anew). Prints each one's wall seconds and peak resident memory,
and checks that both wrote the same weights.

    python bench/conversion.py

Target (issue 20): cut the conversion's share of a fresh `make demo`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import contextlib, json, resource, sys, time
from pathlib import Path
from constitutional import models
gguf, folder, shared = models.embedded_gguf_path(), Path(sys.argv[1]), sys.argv[2] == "1"
if not shared:
    models.one_gguf_parse = contextlib.nullcontext  # transformers alone: one parse per reader
started = time.perf_counter()
models.dequantise(gguf, folder)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def convert(folder: Path, shared: bool) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), "1" if shared else "0"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="conversion-bench-"))
    try:
        results = {}
        for name, shared in (("cai (one parse)", True), ("transformers alone (three parses)", False)):
            results[name] = convert(scratch / name.split()[0], shared)
            print(f"{name:36s} {results[name]['seconds']:6.1f} s, peak RSS {results[name]['peak_rss_gb']:.2f} GB",
                  flush=True)  # fmt: skip
        same = weights_digest(scratch / "cai") == weights_digest(scratch / "transformers")
        ours, theirs = results["cai (one parse)"], results["transformers alone (three parses)"]
        print(f"speed-up {theirs['seconds'] / ours['seconds']:.2f}x; the same weights: {same}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
