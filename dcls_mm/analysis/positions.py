"""Learned positions and kernels of DCLS layers, per stage (DCLS paper, Appendix 10).

For every group of DCLS layers (a ConvNeXt stage, or a single layer elsewhere) the
distinct position tensors (shared positions once) are gathered and described:

- a histogram of the positions over the integer cells of the dilated kernel (each
  element counted in the cell nearest to its position, i.e. ``floor(g + 0.5)`` of its
  grid coordinate ``g = P + L // 2``);
- the distribution of the Euclidean distances to the kernel centre (in cells);
- how many elements sit at the clamp limit ``|P_d| = L_d // 2`` along some dim: the
  paper's "agglutination" at the border, a sign that the dilated kernel is too small;
- how many elements overlap: share their nearest cell with another element of the same
  kernel (same output/input channel pair);
- for gaussian/triangle layers, the learned widths ``|SIG| + offset`` per dim.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dcls_mm.ops import layer_interpolation
from dcls_mm.ops.kernel import SIGMA_OFFSET

from .layers import group_name, named_dcls_layers
from .plotting import pyplot, save_figure

#: tolerance of "at the clamp limit" (positions are clamped exactly to the limit).
LIMIT_EPS = 1e-4


@dataclass
class GroupPositions:
    """The distinct learned positions of one group of DCLS layers.

    Attributes:
        name: group name (``'stage{i}'`` or a layer name).
        layers: names of the layers in the group.
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``.
        interpolation: the layers' interpolation name.
        positions: ``(D, M, K)`` centred positions: ``M`` kernels of ``K`` elements.
        widths: ``(D, M, K)`` profile widths ``|SIG| + offset``, or ``None``.
    """
    name: str
    layers: List[str]
    dilated_kernel_size: Tuple[int, ...]
    interpolation: str
    positions: np.ndarray
    widths: Optional[np.ndarray] = None


def collect_positions(model: nn.Module) -> Dict[str, GroupPositions]:
    """Gather the positions of ``model``'s DCLS layers by group (:func:`group_name`).

    A position parameter shared by several layers (ConvNeXt-dcls ``share_positions``)
    is taken once.

    Args:
        model: any model with DCLS layers.

    Raises:
        ValueError: no DCLS layer, or one group mixing kernel sizes / interpolations.
    """
    groups: Dict[str, GroupPositions] = {}
    owner: Dict[int, str] = {}  # id of a position tensor -> the group that holds it
    for name, layer in named_dcls_layers(model):
        # a layer whose positions another layer shares joins that layer's group (shared
        # sets can span names that group_name keeps apart, e.g. resnet50_dcls' layer1.*)
        key = owner.get(id(layer.P), group_name(name))
        dks = tuple(layer.dilated_kernel_size)
        version = layer_interpolation(layer)
        group = groups.setdefault(key, GroupPositions(key, [], dks, version,
                                                      np.zeros((len(dks), 0, 1))))
        if (group.dilated_kernel_size, group.interpolation) != (dks, version):
            raise ValueError(f'group {key} mixes layers of dilated kernel size / '
                             f'interpolation {group.dilated_kernel_size}/{group.interpolation} '
                             f'and {dks}/{version} ({name})')
        group.layers.append(name)
        if id(layer.P) in owner:
            continue
        owner[id(layer.P)] = key
        P = layer.P.detach().float().cpu()
        D, K = P.shape[0], P.shape[-1]
        pos = P.reshape(D, -1, K).numpy()
        group.positions = pos if group.positions.shape[1] == 0 else np.concatenate(
            [group.positions, pos], 1)
        if getattr(layer, 'SIG', None) is not None:
            offset = SIGMA_OFFSET.get(version, 0.)
            wid = (layer.SIG.detach().float().cpu().abs() + offset).reshape(D, -1, K).numpy()
            group.widths = wid if group.widths is None else np.concatenate([group.widths, wid], 1)
    if not groups:
        raise ValueError(f'{type(model).__name__} has no DCLS layer')
    return groups


def nearest_cells(positions: np.ndarray, dilated_kernel_size: Sequence[int]) -> np.ndarray:
    """Integer cell (grid index ``0 .. L_d - 1``) nearest to each position.

    Args:
        positions: ``(D, ...)`` centred positions.
        dilated_kernel_size: ``(L_0, ..., L_{D-1})``.
    """
    half = np.array([L // 2 for L in dilated_kernel_size]).reshape(-1, *[1] * (positions.ndim - 1))
    upper = np.array(dilated_kernel_size).reshape(half.shape) - 1
    return np.clip(np.floor(positions + half + 0.5), 0, upper).astype(np.int64)


def position_stats(group: GroupPositions, distance_bin: float = 0.5) -> dict:
    """Numbers describing one group's positions (see the module docstring).

    Args:
        group: from :func:`collect_positions`.
        distance_bin: width of the distance histogram's bins (cells).

    Returns:
        JSON-ready dict: ``num_elements``, ``cell_counts`` (nested lists, shape
        ``dilated_kernel_size``), ``distance`` (mean, median, max, histogram edges and
        counts), ``at_limit`` / ``at_limit_fraction``, ``overlapping`` /
        ``overlapping_fraction``, and ``width`` (per-dim mean and histogram) when the
        layers learn ``SIG``.
    """
    pos, dks = group.positions, group.dilated_kernel_size
    D, M, K = pos.shape
    n = M * K
    cells = nearest_cells(pos, dks)  # (D, M, K)
    flat = np.ravel_multi_index(tuple(cells.reshape(D, -1)), dks)
    cell_counts = np.bincount(flat, minlength=int(np.prod(dks))).reshape(dks)
    distance = np.sqrt((pos ** 2).sum(0)).ravel()
    top = max(distance_bin, float(np.ceil(distance.max() / distance_bin) * distance_bin))
    edges = np.arange(0, top + distance_bin / 2, distance_bin)
    counts, edges = np.histogram(distance, bins=edges)
    limits = np.array([L // 2 for L in dks], dtype=np.float64).reshape(D, 1, 1)
    at_limit = int((np.abs(pos) >= limits - LIMIT_EPS).any(0).sum())
    # one key per (kernel, cell): elements whose key appears twice or more overlap
    keys = np.arange(M).repeat(K) * int(np.prod(dks)) + flat
    _, inverse, key_counts = np.unique(keys, return_inverse=True, return_counts=True)
    overlapping = int((key_counts[inverse] > 1).sum())
    stats = dict(
        layers=group.layers, dilated_kernel_size=list(dks), interpolation=group.interpolation,
        num_kernels=M, kernel_count=K, num_elements=n, cell_counts=cell_counts.tolist(),
        distance=dict(mean=float(distance.mean()), median=float(np.median(distance)),
                      max=float(distance.max()), bin_edges=edges.tolist(),
                      counts=counts.tolist()),
        at_limit=at_limit, at_limit_fraction=at_limit / n,
        overlapping=overlapping, overlapping_fraction=overlapping / n)
    if group.widths is not None:
        w = group.widths.reshape(D, -1)
        w_counts, w_edges = np.histogram(w.ravel(), bins=20)
        stats['width'] = dict(mean=w.mean(1).tolist(), min=float(w.min()), max=float(w.max()),
                              bin_edges=w_edges.tolist(), counts=w_counts.tolist())
    return stats


def plot_positions(groups: Mapping[str, GroupPositions], stats: Mapping[str, dict],
                   path: str, title: str = '') -> str:
    """One row per group: cell histogram (2-D learned dims) or bar chart (1-D), distance
    distribution, and the widths' distribution when ``SIG`` is learned.

    Args:
        groups: from :func:`collect_positions`.
        stats: :func:`position_stats` per group.
        path: output PNG.
        title: figure title.
    """
    plt = pyplot()
    cols = 3 if any(g.widths is not None for g in groups.values()) else 2
    fig, axes = plt.subplots(len(groups), cols, figsize=(3.3 * cols, 2.8 * len(groups)),
                             squeeze=False)
    for row, (name, group) in zip(axes, groups.items()):
        s = stats[name]
        counts = np.array(s['cell_counts'])
        if counts.ndim > 2:  # 3-D kernels: the (height, width) projection
            counts = counts.reshape(-1, *counts.shape[-2:]).sum(0)
        if counts.ndim == 2:
            im = row[0].imshow(counts, cmap='viridis', origin='upper')
            fig.colorbar(im, ax=row[0], shrink=0.8)
            row[0].set_xlabel('x (P[1] + L//2)', fontsize=7)
            row[0].set_ylabel('y (P[0] + L//2)', fontsize=7)
        else:
            row[0].bar(np.arange(counts.size), counts.ravel())
            row[0].set_xlabel('cell', fontsize=7)
        row[0].set_title(f'{name}: {s["num_elements"]} el., {s["at_limit"]} at limit, '
                         f'{s["overlapping"]} overlap', fontsize=7)
        d = s['distance']
        row[1].stairs(d['counts'], d['bin_edges'], fill=True)
        row[1].axvline(d['mean'], color='k', lw=0.8, ls='--')
        row[1].set_title(f'distance to centre (mean {d["mean"]:.2f})', fontsize=7)
        if cols == 3:
            if group.widths is not None:
                row[2].stairs(s['width']['counts'], s['width']['bin_edges'], fill=True)
                row[2].set_title('learned widths |SIG| + offset', fontsize=7)
            else:
                row[2].axis('off')
        for ax in row:
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_kernels(model: nn.Module, channels: Sequence[int], path: str,
                 title: str = '') -> Optional[str]:
    """Grid of constructed 2-D kernels: one row per group (its first layer), one column
    per channel (output channel ``c``, first input channel of its group). Returns
    ``path``, or ``None`` (nothing written) when the model has no 2-D DCLS kernel.

    Args:
        model: the model.
        channels: output channels to show (out-of-range ones are skipped for narrow layers).
        path: output PNG.
        title: figure title.
    """
    plt = pyplot()
    firsts: Dict[str, Tuple[str, nn.Module]] = {}
    for name, layer in named_dcls_layers(model):
        firsts.setdefault(group_name(name), (name, layer))
    rows = [(g, n, m) for g, (n, m) in firsts.items() if len(m.kernel_size) == 2]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(channels),
                             figsize=(1.8 * len(channels), 1.9 * len(rows)), squeeze=False)
    for ax_row, (group, name, layer) in zip(axes, rows):
        with torch.no_grad():
            kernel = layer.construct_kernel().float().cpu()
        for ax, c in zip(ax_row, channels):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= kernel.shape[0]:
                ax.axis('off')
                continue
            k = kernel[c, 0].numpy()
            lim = float(np.abs(k).max()) or 1.0
            ax.imshow(k, cmap='RdBu_r', vmin=-lim, vmax=lim)
            ax.set_title(f'{group} c{c}', fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def run_positions(model: nn.Module, out_dir: str, channels: Sequence[int] = (0, 1, 2, 3),
                  label: str = 'model') -> dict:
    """Positions and kernels of one model: ``positions.json``, ``positions.png``,
    ``kernels.png`` (models with 2-D kernels) in ``out_dir``.

    Args:
        model: the model (e.g. from :func:`dcls_mm.analysis.build_analysis_model`).
        out_dir: output folder.
        channels: output channels whose kernels are drawn.
        label: model name in titles and in the JSON.

    Returns:
        The content of ``positions.json``: ``{'model': label, 'groups': {name: stats},
        'kernels_png': whether kernels.png was drawn}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    groups = collect_positions(model)
    stats = {name: position_stats(g) for name, g in groups.items()}
    plot_positions(groups, stats, osp.join(out_dir, 'positions.png'), title=label)
    kernels = plot_kernels(model, channels, osp.join(out_dir, 'kernels.png'), title=label)
    result = dict(model=label, groups=stats, kernels_png=kernels is not None)
    with open(osp.join(out_dir, 'positions.json'), 'w') as f:
        json.dump(result, f, indent=1)
    return result
