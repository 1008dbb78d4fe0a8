"""Plots a person looks at after a robustness run: metric vs severity per corruption.

Both robustness tools (classifiers: ``tools/robustness/evaluate.py``; detectors and
segmentors: ``tools/robustness/test_downstream.py``) and ``tools/robustness/compare.py``
draw through :func:`plot_severity_curves`, so every figure has the same layout: one
small panel per corruption, severity on the x axis, one line per model.
"""
from __future__ import annotations

import math
import os
import os.path as osp
from typing import Dict, Mapping

__all__ = ['plot_severity_curves']

Curves = Mapping[str, Mapping[str, Mapping[int, float]]]


def plot_severity_curves(curves: Curves, path: str, ylabel: str, title: str = '',
                         note: str = '') -> None:
    """Draw one subplot per corruption (x = severity, one line per label) to a PNG.

    Args:
        curves: ``{label: {corruption: {severity: value}}}``; ``label`` names a model
            (it becomes the legend entry), severities are ints (``"3"`` strings from a
            JSON file are accepted too; 0 may stand for the clean set). Corruptions appear in first-seen order;
            a label lacking a corruption (or some severities) is drawn with what it has.
        path: output PNG file; its folder is created when missing.
        ylabel: y axis label of every panel (e.g. ``'top-1 error (%)'``).
        title: figure title (suptitle); empty for none.
        note: small text under the panels (e.g. the preprocessing used); empty for none.

    Raises:
        ValueError: ``curves`` holds no point at all (nothing to draw).
    """
    import matplotlib
    matplotlib.use('Agg')  # headless: never needs a display, also under torchrun
    import matplotlib.pyplot as plt

    corruptions: Dict[str, None] = {}
    for per_corr in curves.values():
        for corr, points in per_corr.items():
            if points:
                corruptions.setdefault(corr, None)
    if not corruptions:
        raise ValueError('plot_severity_curves: no (corruption, severity) point to draw')

    names = list(corruptions)
    ncols = min(5, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows + 0.6),
                             squeeze=False, sharey=True)
    for ax, corr in zip(axes.flat, names):
        ticks = set()
        for label, per_corr in curves.items():
            points = per_corr.get(corr) or {}
            if not points:
                continue
            by_int = {int(s): float(v) for s, v in points.items()}
            xs = sorted(by_int)
            ticks.update(xs)
            ax.plot(xs, [by_int[x] for x in xs], marker='o', markersize=3, label=label)
        ax.set_title(corr, fontsize=8)
        ax.set_xticks(sorted(ticks))  # 1..5, or 0..5 where severity 0 is the clean set
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel('severity', fontsize=8)
    legend: Dict[str, object] = {}  # a label may be missing from the first panel
    for ax in axes.flat[:len(names)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc='upper right', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha='left', va='bottom')
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 0.95 if title else 1))
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
