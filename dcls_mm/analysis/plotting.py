"""matplotlib for the analysis tools: always the Agg backend (files, never a display)."""
from __future__ import annotations

import os
import os.path as osp


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (headless, also under torchrun)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` (folders created), close it and return ``path``.

    Args:
        fig: a matplotlib figure.
        path: output file (PNG).
        dpi: resolution.
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    pyplot().close(fig)
    return path
