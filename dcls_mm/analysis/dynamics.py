"""How fast the learned positions move during training (DCLS paper, Appendix 11).

Between two consecutive checkpoints ``a`` and ``b`` of one run, the average speed of
the positions of a group (a ConvNeXt stage, or a single layer) is

    v = (1 / N) * sum_n || P_b[:, n] - P_a[:, n] ||_2 / (t_b - t_a)

the mean Euclidean displacement of the group's ``N`` kernel elements (all blocks of the
stage; with shared positions every block holds the same values) divided by the
training time between the checkpoints, in epochs when both checkpoints are epoch
checkpoints of an epoch-based run, else in iterations. The learning rate is read from
the run's ``<timestamp>/vis_data/scalars.json`` (mmengine's LocalVisBackend; resumed
runs have several) and, when the run left no scalars, from the optimizer state saved
in each checkpoint.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .layers import group_name
from .plotting import pyplot, save_figure

_CKPT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def find_checkpoints(work_dir: str) -> List[str]:
    """The ``epoch_N.pth`` / ``iter_N.pth`` files of an mmengine work dir, in training order.

    Args:
        work_dir: the run's work dir.

    Raises:
        ValueError: the folder does not exist or holds fewer than two such checkpoints.
    """
    if not osp.isdir(work_dir):
        raise ValueError(f'work dir {work_dir!r} does not exist')
    found = []
    for name in os.listdir(work_dir):
        match = _CKPT_NAME.match(name)
        if match:
            found.append((match.group(1), int(match.group(2)), osp.join(work_dir, name)))
    kinds = {k for k, _, _ in found}
    if len(kinds) > 1:
        raise ValueError(f'{work_dir} mixes epoch_*.pth and iter_*.pth checkpoints: pass the '
                         'checkpoints in training order instead')
    if len(found) < 2:
        raise ValueError(f'{work_dir} holds {len(found)} epoch_*.pth / iter_*.pth checkpoint(s); '
                         'position speeds need at least two')
    return [path for _, _, path in sorted(found)]


def read_checkpoint_positions(path: str) -> Tuple[Dict[str, Tensor], dict]:
    """Position tensors (keys ending in ``.P``) and training progress of a checkpoint.

    Args:
        path: checkpoint file (mmengine training checkpoint, dcls-mm or published file).

    Returns:
        ``({key: P as float64}, {'epoch': int|None, 'iter': int|None, 'lr': float|None})``;
        epoch/iter from the checkpoint's ``meta`` (else from an ``epoch_N``/``iter_N`` file
        name), lr from its saved optimizer state.

    Raises:
        ValueError: the checkpoint holds no position tensor.
    """
    from dcls_mm.models import load_checkpoint_file
    from dcls_mm.utils.checkpoint_io import unwrap_checkpoint
    checkpoint = load_checkpoint_file(path)
    state_dict, meta = unwrap_checkpoint(checkpoint)
    positions = OrderedDict((k, v.double()) for k, v in state_dict.items()
                            if k.endswith('.P') or k == 'P')
    if not positions:
        raise ValueError(f'{path}: no DCLS position tensor (no key ending in ".P")')
    meta = meta or {}
    info = dict(epoch=meta.get('epoch'), iter=meta.get('iter'), lr=None)
    match = _CKPT_NAME.match(osp.basename(path))
    if match and info[match.group(1)] is None:
        info[match.group(1)] = int(match.group(2))
    optimizer = checkpoint.get('optimizer') if isinstance(checkpoint, dict) else None
    groups = optimizer.get('param_groups') if isinstance(optimizer, dict) else None
    if groups and 'lr' in groups[0]:
        info['lr'] = float(groups[0]['lr'])
    return positions, info


def _interval(a: dict, b: dict, path_a: str, path_b: str) -> Tuple[float, str]:
    """Training time between two checkpoints and its unit."""
    by_epoch = (_CKPT_NAME.match(osp.basename(path_b)) or [None, 'epoch'])[1] == 'epoch'
    for unit in (('epoch', 'iter') if by_epoch else ('iter', 'epoch')):
        if a[unit] is not None and b[unit] is not None and b[unit] != a[unit]:
            if b[unit] < a[unit]:
                raise ValueError(f'{path_b} ({unit} {b[unit]}) comes before {path_a} '
                                 f'({unit} {a[unit]}): pass checkpoints in training order')
            return float(b[unit] - a[unit]), unit
    raise ValueError(f'{path_a} and {path_b} record the same (or no) epoch and iteration: '
                     'cannot tell the training time between them')


def _interval_lr(lrs: Sequence[Tuple[int, float]], a: dict, b: dict) -> Optional[float]:
    """Mean logged lr of the iterations between checkpoints ``a`` and ``b`` (those that
    moved the positions), else the lr ``a`` saved for its next iteration."""
    if lrs and a['iter'] is not None and b['iter'] is not None:
        values = [lr for step, lr in lrs if a['iter'] < step <= b['iter']]
        if values:
            return sum(values) / len(values)
    return a['lr']


def position_speeds(checkpoints: Sequence[str],
                    lrs: Sequence[Tuple[int, float]] = ()) -> List[dict]:
    """Average position speed per group between consecutive checkpoints.

    Args:
        checkpoints: checkpoint files in training order (at least two).
        lrs: ``(step, lr)`` logged by the run (:func:`read_learning_rates`), if any.

    Returns:
        One row per (interval, group): ``from``, ``to`` (file names), ``epoch``/``iter``
        at ``to``, ``interval`` and ``unit`` (``'epoch'``/``'iter'``), ``group``,
        ``mean_displacement`` (cells), ``speed`` (cells per unit), ``lr``: the mean
        logged lr of the iterations in the interval, else the lr that ``from``'s saved
        optimizer state holds for the next iteration, else None.

    Raises:
        ValueError: fewer than two checkpoints, or position keys/shapes that differ
            between two checkpoints.
    """
    if len(checkpoints) < 2:
        raise ValueError(f'position speeds need at least two checkpoints, got {len(checkpoints)}')
    rows = []
    prev_path = checkpoints[0]
    prev, prev_info = read_checkpoint_positions(prev_path)
    for path in checkpoints[1:]:
        cur, info = read_checkpoint_positions(path)
        if list(cur) != list(prev) or any(cur[k].shape != prev[k].shape for k in cur):
            raise ValueError(f'{prev_path} and {path} hold different position tensors '
                             '(keys or shapes): not checkpoints of one run')
        dt, unit = _interval(prev_info, info, prev_path, path)
        sums: Dict[str, List[float]] = OrderedDict()
        for key, p in cur.items():
            # (D, ...) -> one displacement per element
            disp = torch.linalg.vector_norm(p - prev[key], dim=0).flatten()
            acc = sums.setdefault(group_name(key), [0.0, 0])
            acc[0] += float(disp.sum())
            acc[1] += disp.numel()
        for group, (total, count) in sums.items():
            mean = total / count
            rows.append({'from': osp.basename(prev_path), 'to': osp.basename(path),
                         'epoch': info['epoch'], 'iter': info['iter'], 'interval': dt,
                         'unit': unit, 'group': group, 'mean_displacement': mean,
                         'speed': mean / dt, 'lr': _interval_lr(lrs, prev_info, info)})
        prev, prev_info, prev_path = cur, info, path
    return rows


def read_learning_rates(work_dir: str) -> List[Tuple[int, float]]:
    """``(step, lr)`` logged by mmengine in ``work_dir/*/vis_data/scalars.json``.

    Runs resumed in the same work dir log into several timestamped folders; a step
    logged twice keeps its latest value.

    Args:
        work_dir: the run's work dir.

    Returns:
        Sorted by step; empty when the run logged no learning rate.
    """
    by_step: Dict[int, float] = {}
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed run
                if 'lr' in record and 'step' in record:
                    by_step[int(record['step'])] = float(record['lr'])
    return sorted(by_step.items())


def plot_dynamics(rows: Sequence[dict], lrs: Sequence[Tuple[int, float]], path: str,
                  title: str = '') -> str:
    """Speed per group (one line each) over training, learning rate on a second axis.

    The x axis is the iteration when every row knows it (the learning-rate log's axis),
    else the epoch.

    Args:
        rows: :func:`position_speeds` rows.
        lrs: ``(step, lr)`` pairs, may be empty (then the checkpoints' lr when saved).
        path: output PNG.
        title: figure title.
    """
    plt = pyplot()
    by_iter = all(r['iter'] is not None for r in rows)
    xkey = 'iter' if by_iter else 'epoch'
    unit = rows[0]['unit']
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    groups = list(OrderedDict.fromkeys(r['group'] for r in rows))
    for group in groups:
        pts = [(r[xkey], r['speed']) for r in rows if r['group'] == group]
        ax.plot(*zip(*pts), marker='o', ms=3, label=group)
    ax.set_xlabel('iteration' if by_iter else 'epoch')
    ax.set_ylabel(f'average position speed (cells / {unit})')
    ax.legend(fontsize=7, loc='upper left')
    lr_pts = list(lrs) if (lrs and by_iter) else [
        (r[xkey], r['lr']) for r in rows if r['group'] == groups[0] and r['lr'] is not None]
    if lr_pts:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr_pts), color='0.4', lw=1, ls='--')
        ax2.set_ylabel('learning rate (dashed)')
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run_position_dynamics(out_dir: str, work_dir: Optional[str] = None,
                          checkpoints: Optional[Sequence[str]] = None) -> dict:
    """Position speeds of a run: ``position_speeds.csv``, ``learning_rate.csv`` (when
    logged) and ``position_speeds.png`` in ``out_dir``.

    Args:
        out_dir: output folder.
        work_dir: an mmengine work dir (its checkpoints, its logged learning rate).
        checkpoints: checkpoint files in training order (instead of, or to choose among,
            ``work_dir``'s).

    Returns:
        ``{'rows': [...], 'learning_rates': [[step, lr], ...], 'files': [...]}``.
    """
    if checkpoints is None:
        if work_dir is None:
            raise ValueError('give a work dir or a list of checkpoints')
        checkpoints = find_checkpoints(work_dir)
    lrs = read_learning_rates(work_dir) if work_dir is not None else []
    rows = position_speeds(checkpoints, lrs)
    os.makedirs(out_dir, exist_ok=True)
    files = [osp.join(out_dir, 'position_speeds.csv')]
    with open(files[0], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if lrs:
        files.append(osp.join(out_dir, 'learning_rate.csv'))
        with open(files[-1], 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['step', 'lr'])
            writer.writerows(lrs)
    files.append(plot_dynamics(rows, lrs, osp.join(out_dir, 'position_speeds.png'),
                               title=work_dir or ''))
    return dict(rows=rows, learning_rates=[list(x) for x in lrs], files=files)
