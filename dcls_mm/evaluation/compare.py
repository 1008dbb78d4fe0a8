"""Side-by-side tables and severity curves of robustness ``results.json`` files.

Reads both results formats:

* classifier (``tools/robustness/evaluate.py``): top-level ``"benchmarks"``; the table is
  the DCLS paper's Table 5 layout: one row per model, columns clean top-1, ImageNet-C
  mCE (and relative mCE), C-bar mean error, A/R/Sketch top-1;
* downstream (``tools/robustness/test_downstream.py``): top-level ``"metrics"``
  (``{metric: {"P", "mPC", "rPC"}}``) and ``"per_set"``; one row per model, columns
  P / mPC / rPC of every metric.

With two or more files a ``delta`` row per further file gives its difference to the
first (same sign convention as the metric: for errors, negative is better).
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['load_results', 'results_kind', 'comparison_table', 'corruption_table',
           'format_table', 'severity_curves', 'compare_results']

#: (column title, benchmark, field) of the classifier table, in Table 5 order.
CLASSIFIER_COLUMNS = (
    ('clean top-1', 'imagenet', 'top1'),
    ('C mCE', 'imagenet-c', 'mCE'),
    ('C rel. mCE', 'imagenet-c', 'relative_mCE'),
    ('C-bar err', 'imagenet-c-bar', 'mean_error'),
    ('A top-1', 'imagenet-a', 'top1'),
    ('R top-1', 'imagenet-r', 'top1'),
    ('Sketch top-1', 'imagenet-sketch', 'top1'),
)


def load_results(path: str) -> dict:
    """Read a ``results.json`` of either robustness tool.

    Raises:
        ValueError: missing file, not JSON, or neither results format.
    """
    if not osp.isfile(path):
        raise ValueError(f'{path} does not exist')
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not JSON ({e.msg} at line {e.lineno})') from None
    results_kind(data, path)
    return data


def results_kind(data: Any, path: str = 'results') -> str:
    """``'classifier'`` (has ``benchmarks``) or ``'downstream'`` (has ``metrics`` and
    ``per_set``).

    Raises:
        ValueError: neither.
    """
    if isinstance(data, dict) and isinstance(data.get('benchmarks'), dict):
        return 'classifier'
    if isinstance(data, dict) and isinstance(data.get('metrics'), dict) and \
            isinstance(data.get('per_set'), dict):
        return 'downstream'
    raise ValueError(f'{path}: not a robustness results file (expected "benchmarks" from '
                     'tools/robustness/evaluate.py or "metrics" + "per_set" from '
                     'tools/robustness/test_downstream.py)')


def _labels(results: Sequence[dict], paths: Sequence[str]) -> List[str]:
    names = []
    for data, path in zip(results, paths):
        if results_kind(data, path) == 'classifier':
            kwargs = ''.join(f' {k}={v}' for k, v in (data.get('model_kwargs') or {}).items())
            names.append(str(data.get('model') or osp.basename(osp.dirname(path))) + kwargs)
        else:
            names.append(osp.splitext(osp.basename(str(data.get('config') or path)))[0])
    if len(set(names)) < len(names):  # same model twice: the output folders tell them apart
        names = [f'{n} [{osp.basename(osp.dirname(osp.abspath(p)))}]'
                 for n, p in zip(names, paths)]
    return names


def comparison_table(results: Sequence[dict], labels: Sequence[str]
                     ) -> Tuple[List[str], List[List[Optional[float]]]]:
    """Columns and rows (one per results file, then the deltas to the first).

    Args:
        results: loaded results, all of one kind.
        labels: row labels.

    Returns:
        ``(header, rows)``: ``header[0]`` is ``'model'``; each row starts with its label;
        ``None`` marks a value a file does not have.

    Raises:
        ValueError: the files mix the classifier and downstream formats.
    """
    kinds = {results_kind(r) for r in results}
    if len(kinds) > 1:
        raise ValueError('cannot compare a classifier results file (tools/robustness/'
                         'evaluate.py) with a downstream one (test_downstream.py)')
    kind = kinds.pop()
    if kind == 'classifier':
        columns = [c for c in CLASSIFIER_COLUMNS
                   if any(r['benchmarks'].get(c[1], {}).get(c[2]) is not None for r in results)]
        header = ['model'] + [c[0] for c in columns]
        values = [[r['benchmarks'].get(b, {}).get(f) for _, b, f in columns] for r in results]
    else:
        metrics = list(dict.fromkeys(m for r in results for m in r['metrics']))
        header = ['model'] + [f'{m} {k}' for m in metrics for k in ('P', 'mPC', 'rPC')]
        values = [[r['metrics'].get(m, {}).get(k) for m in metrics for k in ('P', 'mPC', 'rPC')]
                  for r in results]
    rows = [[label] + v for label, v in zip(labels, values)]
    for label, v in zip(labels[1:], values[1:]):
        rows.append([f'delta {label}'] + [None if a is None or b is None else b - a
                                          for a, b in zip(values[0], v)])
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table, numbers with two decimals, ``-`` for missing values."""
    cells = [list(header)] + [[row[0]] + ['-' if v is None else f'{v:+.2f}'
                                          if str(row[0]).startswith('delta') else f'{v:.2f}'
                                          for v in row[1:]] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    lines = ['  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def corruption_table(results: Sequence[dict], labels: Sequence[str]
                     ) -> Tuple[List[str], List[List[Optional[float]]]]:
    """ImageNet-C CE per corruption (rows) of each classifier results file (columns).

    Returns:
        ``(header, rows)``; no rows when no file has ImageNet-C CE values.
    """
    ces = [r.get('benchmarks', {}).get('imagenet-c', {}) for r in results]
    names = list(dict.fromkeys(c for ce in ces for part in ('CE', 'extra')
                               for c in (ce.get(part) or {})))
    rows = [[c] + [(ce.get('CE') or {}).get(c, (ce.get('extra') or {}).get(c)) for ce in ces]
            for c in names]
    return ['CE (%)'] + list(labels), rows


def severity_curves(results: Sequence[dict], labels: Sequence[str]
                    ) -> Dict[str, Tuple[Dict[str, Dict[str, Dict[int, float]]], str]]:
    """Curves for :func:`~dcls_mm.evaluation.plots.plot_severity_curves`, per figure.

    Returns:
        ``{figure name: (curves, ylabel)}``: classifier files give ``imagenet_c`` and
        ``imagenet_c_bar`` (top-1 error); downstream files one figure per metric (the
        clean score drawn at severity 0).
    """
    figures: Dict[str, Tuple[dict, str]] = {}
    for data, label in zip(results, labels):
        if results_kind(data) == 'classifier':
            for bench in ('imagenet-c', 'imagenet-c-bar'):
                errors = data['benchmarks'].get(bench, {}).get('errors')
                if errors:
                    curves, _ = figures.setdefault(bench.replace('-', '_'),
                                                   ({}, 'top-1 error (%)'))
                    curves[label] = {c: {int(s): v for s, v in sev.items()}
                                     for c, sev in errors.items()}
        else:
            clean = data.get('clean') or {}
            for metric in data['metrics']:
                per_corr = {c: {**({0: clean[metric]} if metric in clean else {}),
                                **{int(s): m[metric] for s, m in sev.items() if metric in m}}
                            for c, sev in data['per_set'].items()}
                if any(per_corr.values()):
                    curves, _ = figures.setdefault(metric, ({}, metric))
                    curves[label] = per_corr
    return figures


def compare_results(paths: Sequence[str], out_dir: Optional[str] = None) -> Dict[str, Any]:
    """Load ``paths``, build the table, and draw the curves into ``out_dir``.

    Args:
        paths: ``results.json`` files of one kind.
        out_dir: folder for ``compare.csv`` and the PNG figures; ``None``: no files.

    Returns:
        ``{"table": text, "header", "rows", "files": written paths}``.
    """
    import re

    from .plots import plot_severity_curves
    from .records import write_csv_atomic
    results = [load_results(p) for p in paths]
    labels = _labels(results, paths)
    header, rows = comparison_table(results, labels)
    files = []
    if out_dir:
        path = osp.join(out_dir, 'compare.csv')
        write_csv_atomic(path, [dict(zip(header, r)) for r in rows], header)
        files.append(path)
        for name, (curves, ylabel) in severity_curves(results, labels).items():
            path = osp.join(out_dir, re.sub(r'[^A-Za-z0-9_.-]+', '_', name) + '.png')
            plot_severity_curves(curves, path, ylabel, title=f'{name}: ' + ' vs '.join(labels))
            files.append(path)
    text = format_table(header, rows)
    if results_kind(results[0]) == 'classifier':
        ce_header, ce_rows = corruption_table(results, labels)
        if ce_rows:
            text += '\n\nImageNet-C corruption errors (extra corruptions last)\n'
            text += format_table(ce_header, ce_rows)
    return {'table': text, 'header': header, 'rows': rows, 'files': files}
