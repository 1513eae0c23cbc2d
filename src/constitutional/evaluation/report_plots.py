"""The report's pictures: PNG bytes from matplotlib, drawn off screen, embedded in the page by `report.py`."""

from __future__ import annotations

import io
from typing import Any


def elo_scatter(metrics: dict[str, Any]) -> bytes | None:
    """The paper's frontier picture: harmlessness Elo against helpfulness Elo, with intervals."""
    harmless, helpful = metrics["elo"].get("harmlessness", {}), metrics["elo"].get("helpfulness", {})
    models = [model for model in metrics["models"] if model in harmless and model in helpful]
    if not models:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    for model in models:
        x, y = helpful[model], harmless[model]
        axis.errorbar(
            x["elo"],
            y["elo"],
            xerr=[[x["elo"] - x["low"]], [x["high"] - x["elo"]]],
            yerr=[[y["elo"] - y["low"]], [y["high"] - y["elo"]]],
            fmt="o",
            capsize=3,
            label=model,
        )
        axis.annotate(model, (x["elo"], y["elo"]), textcoords="offset points", xytext=(6, 6))
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.axvline(0, color="grey", linewidth=0.5)
    axis.set_xlabel("helpfulness Elo")
    axis.set_ylabel("harmlessness Elo")
    axis.set_title("Harmlessness vs helpfulness (95% intervals)")
    figure.tight_layout()
    return png(figure)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg back end (no screen needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(figure: Any) -> bytes:
    """A figure as PNG bytes (to embed in the page), the figure closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    pyplot().close(figure)
    return buffer.getvalue()
