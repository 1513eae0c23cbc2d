"""constitutional: Constitutional AI (Bai et al. 2022) end to end.

Importing the package is cheap: heavy libraries (torch, transformers, httpx, vllm)
are imported by the modules that need them, when they are needed.
"""

__version__ = "0.1.0"
