"""The pipeline's stages, one module each, in the paper's order.

Each stage module has `NAME`, `check(config) -> inputs` (loads and validates what the stage reads;
writes nothing), `input_hashes(inputs) -> dict` and `run(config, run_dir, inputs) -> counts`.
"""

# The paper's order. A stage listed here but not yet built is refused with a clear message.
ORDER = ("critique", "sl", "pairs", "feedback", "pm", "rl", "eval")
BUILT = ("critique", "sl", "pairs", "feedback")
