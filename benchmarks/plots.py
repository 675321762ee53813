"""The benchmarks' plots: matplotlib from the ``bench`` extra (without it the table and JSON are still
written and a warning says why there is no plot), and one grouped bar chart as a PNG."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)


def pyplot() -> Optional[Any]:
    """``matplotlib.pyplot`` drawing to files, or None (with a warning) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[bench]'); no plot written")
        return None
    return plt


def bar_plot(path: str, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
             log: bool = False) -> None:
    """Bars of each ``series`` (name -> one value per group) side by side over ``groups``."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        ax.bar([g + index * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
