"""Benchmark folder layouts: discovery, canonical labels, and one-line layout errors.

Layouts (``ROOT`` is the benchmark's folder):

* ``imagenet`` (clean val), ``imagenet-a``, ``imagenet-r``, ``imagenet-sketch``:
  ``ROOT/<wnid>/*.JPEG`` (ImageFolder: one folder per WordNet id);
* ``imagenet-c``: ``ROOT/<corruption>/<severity 1..5>/<wnid>/*.JPEG``, optionally with the
  category folders ``noise/blur/weather/digital/extra`` above the corruption folders;
* ``imagenet-c-bar``: the same, severity folders ``1..5`` or named by the corruption
  parameter (``2.35``, as the authors' generator writes them).

Labels always come from the canonical ImageNet-1k order (timm's
``imagenet_synsets.txt``, the sorted 1000 wnids): a folder holding only some classes
still maps each wnid to its ImageNet-1k index. ImageNet-A/R hold 200 classes each; their
lists ship with timm too (``imagenet_{a,r}_{synsets,indices}.txt``).
"""
from __future__ import annotations

import functools
import os
import os.path as osp
import pkgutil
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .imagenet_c import (BENCHMARK_CORRUPTIONS, C_BAR_SEVERITY_PARAMS, CORRUPTION_CATEGORIES,
                         EXTRA_CORRUPTIONS, SEVERITIES)

__all__ = [
    'DataLayoutError', 'BENCHMARKS', 'DEFAULT_DIRS', 'IMAGE_EXTENSIONS', 'imagenet_wnids',
    'class_subset', 'scan_class_folders', 'scan_corruption_root', 'resolve_benchmark_root',
    'limit_items'
]

#: Every benchmark the classifier tool knows, in the order ``all`` runs them.
BENCHMARKS = ('imagenet', 'imagenet-c', 'imagenet-c-bar', 'imagenet-a', 'imagenet-r',
              'imagenet-sketch')
#: Folder names tried under ``--data-root``, first existing wins.
DEFAULT_DIRS: Dict[str, Tuple[str, ...]] = {
    'imagenet': ('imagenet/val',),
    'imagenet-c': ('imagenet-c',),
    'imagenet-c-bar': ('imagenet-c-bar',),
    'imagenet-a': ('imagenet-a',),
    'imagenet-r': ('imagenet-r',),
    'imagenet-sketch': ('imagenet-sketch', 'sketch'),
}
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.webp')
_WNID = re.compile(r'n\d{8}')

Item = Tuple[str, int]


class DataLayoutError(ValueError):
    """A benchmark folder is missing or not in the expected layout (one-line message)."""


def _read_info(name: str) -> List[str]:
    data = pkgutil.get_data('timm.data', f'_info/{name}')
    if data is None:  # pragma: no cover - a broken timm install
        raise RuntimeError(f'timm ships no _info/{name}; reinstall timm')
    return data.decode().split()


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (timm's ``imagenet_synsets.txt``)."""
    return tuple(_read_info('imagenet_synsets.txt'))


@functools.lru_cache(maxsize=None)
def _wnid_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@functools.lru_cache(maxsize=None)
def class_subset(benchmark: str) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """The 200-class subset of ``imagenet-a`` or ``imagenet-r``.

    Args:
        benchmark: ``'imagenet-a'`` or ``'imagenet-r'``.

    Returns:
        ``(wnids, indices)``: the subset's wnids in label order (sorted) and their
        ImageNet-1k class indices, as shipped in timm's ``_info`` folder.
    """
    letter = {'imagenet-a': 'a', 'imagenet-r': 'r'}[benchmark]
    wnids = tuple(_read_info(f'imagenet_{letter}_synsets.txt'))
    indices = tuple(int(i) for i in _read_info(f'imagenet_{letter}_indices.txt'))
    return wnids, indices


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _listdir(root: str) -> Tuple[List[str], List[str]]:
    """``(sub-folders, image files)`` of ``root``, sorted, hidden entries skipped."""
    dirs, images = [], []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith('.'):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif _is_image(entry.name):
                images.append(entry.name)
    return sorted(dirs), sorted(images)


def _require_dir(root: str, what: str) -> None:
    if not osp.isdir(root):
        raise DataLayoutError(f'{what}: folder {root} does not exist')


def scan_class_folders(root: str, what: str,
                       allowed: Optional[Sequence[str]] = None) -> List[Item]:
    """List ``(image path, ImageNet-1k index)`` of an ImageFolder ``root/<wnid>/*``.

    Args:
        root: the folder holding one sub-folder per class.
        what: the set's name used in error messages (e.g. ``'imagenet-c/fog/3'``).
        allowed: wnids the benchmark may contain (ImageNet-A/R: their 200); ``None``:
            any ImageNet-1k class.

    Returns:
        Items sorted by (wnid, file name).

    Raises:
        DataLayoutError: missing folder, images directly in ``root``, a folder that is
            not a wnid, a wnid outside ImageNet-1k (or outside ``allowed``), no images.
    """
    _require_dir(root, what)
    dirs, flat = _listdir(root)
    if flat and not dirs:
        raise DataLayoutError(
            f'{what}: {root} holds images directly ({flat[0]}, ...); expected one folder per '
            f'class named by its WordNet id ({osp.join(root, "n01440764", "*.JPEG")})')
    index = _wnid_index()
    allowed_set = set(allowed) if allowed is not None else None
    items: List[Item] = []
    for name in dirs:
        if not _WNID.fullmatch(name):
            raise DataLayoutError(
                f'{what}: unexpected folder {osp.join(root, name)}; expected class folders '
                'named by WordNet id (n01440764, ...)')
        if name not in index:
            raise DataLayoutError(f'{what}: {osp.join(root, name)}: {name} is not an '
                                  'ImageNet-1k class (wnid)')
        if allowed_set is not None and name not in allowed_set:
            raise DataLayoutError(f'{what}: {osp.join(root, name)}: {name} is not one of the '
                                  f'{len(allowed_set)} classes of {what.split("/")[0]}')
        folder = osp.join(root, name)
        _, files = _listdir(folder)
        items.extend((osp.join(folder, f), index[name]) for f in files)
    if not items:
        raise DataLayoutError(f'{what}: no images found under {root}/<wnid>/ '
                              f'(extensions {", ".join(IMAGE_EXTENSIONS)})')
    return items


def _severity_folders(folder: str, corruption: str, benchmark: str) -> Dict[int, str]:
    dirs, flat = _listdir(folder)
    what = f'{benchmark}/{corruption}'
    if not dirs:
        raise DataLayoutError(
            f'{what}: severity folders missing in {folder} (expected {folder}/<1..5>/<wnid>/'
            f'{"*" if not flat else f"; found images such as {flat[0]}"})')
    if any(_WNID.fullmatch(d) for d in dirs):
        raise DataLayoutError(f'{what}: severity folders missing in {folder}: found class '
                              f'folders ({dirs[0]}) where severities 1..5 were expected')
    params = C_BAR_SEVERITY_PARAMS.get(corruption) if benchmark == 'imagenet-c-bar' else None
    by_param = any('.' in d for d in dirs)
    out: Dict[int, str] = {}
    for name in dirs:
        severity = None
        if by_param and params is not None:
            try:
                value = float(name)
            except ValueError:
                value = None
            if value is not None:
                hits = [i for i, p in enumerate(params) if abs(p - value) < 1e-6]
                severity = hits[0] + 1 if hits else None
            if severity is None:
                raise DataLayoutError(
                    f'{what}: severity folder {osp.join(folder, name)} is not one of the '
                    f'parameter values {", ".join(f"{p:.2f}" for p in params)} (or 1..5 for '
                    'all severity folders)')
        elif name.isdigit() and int(name) in SEVERITIES:
            severity = int(name)
        else:
            extra = (f' or one of the parameter values '
                     f'{", ".join(f"{p:.2f}" for p in params)}' if params else '')
            raise DataLayoutError(f'{what}: unexpected severity folder '
                                  f'{osp.join(folder, name)} (expected 1..5{extra})')
        if severity in out:  # e.g. 1 and 1.00
            raise DataLayoutError(f'{what}: severity {severity} found twice: {out[severity]} '
                                  f'and {osp.join(folder, name)}')
        out[severity] = osp.join(folder, name)
    return dict(sorted(out.items()))


def scan_corruption_root(root: str, benchmark: str) -> Dict[str, Dict[int, str]]:
    """Find the corruption/severity folders of an ImageNet-C or ImageNet-C-bar copy.

    Args:
        root: the benchmark folder.
        benchmark: ``'imagenet-c'`` or ``'imagenet-c-bar'``.

    Returns:
        ``{corruption: {severity: folder}}`` in canonical corruption order (for
        ImageNet-C: the 15 benchmark ones, then the extra ones). Image lists are not
        read here (see :func:`scan_class_folders`).

    Raises:
        DataLayoutError: missing folder, images or class folders where corruption folders
            were expected, an unknown corruption folder, missing or unknown severity
            folders.
    """
    if benchmark == 'imagenet-c':
        known: Tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
        categories = CORRUPTION_CATEGORIES
    elif benchmark == 'imagenet-c-bar':
        known, categories = tuple(C_BAR_SEVERITY_PARAMS), {}
    else:
        raise ValueError(f'not a corruption benchmark: {benchmark!r}')
    _require_dir(root, benchmark)
    dirs, flat = _listdir(root)
    layout = f'{root}/<corruption>/<severity 1..5>/<wnid>/*.JPEG'
    if flat and not dirs:
        raise DataLayoutError(f'{benchmark}: {root} holds images directly ({flat[0]}, ...); '
                              f'expected {layout}')
    if any(_WNID.fullmatch(d) for d in dirs):
        raise DataLayoutError(f'{benchmark}: {root} holds class folders ({dirs[0]}); expected '
                              f'{layout}')
    found: Dict[str, str] = {}

    def add(corruption: str, folder: str) -> None:
        if corruption in found:  # one of them would be evaluated, unsaid which
            raise DataLayoutError(f'{benchmark}: corruption {corruption} found twice: '
                                  f'{found[corruption]} and {folder}')
        found[corruption] = folder

    for name in dirs:
        if name in categories:
            for sub in _listdir(osp.join(root, name))[0]:
                if sub not in categories[name]:
                    raise DataLayoutError(
                        f'{benchmark}: {osp.join(root, name, sub)} is not a corruption of the '
                        f'category {name} ({", ".join(categories[name])})')
                add(sub, osp.join(root, name, sub))
        elif name in known:
            add(name, osp.join(root, name))
        else:
            raise DataLayoutError(f'{benchmark}: unknown corruption folder {osp.join(root, name)} '
                                  f'(known: {", ".join(known)})')
    if not found:
        raise DataLayoutError(f'{benchmark}: no corruption folders in {root}; expected {layout}')
    return {c: _severity_folders(found[c], c, benchmark) for c in known if c in found}


def resolve_benchmark_root(benchmark: str, data_root: Optional[str],
                           overrides: Dict[str, str]) -> str:
    """The folder of ``benchmark``: ``overrides[benchmark]`` or the default name(s) under
    ``data_root`` (first one that exists).

    Raises:
        DataLayoutError: none of the candidate folders exists (all are named).
    """
    if benchmark in overrides:
        root = overrides[benchmark]
        _require_dir(root, benchmark)
        return root
    if data_root is None:
        raise DataLayoutError(f'{benchmark}: no folder given: pass --data-root ROOT (expects '
                              f'ROOT/{DEFAULT_DIRS[benchmark][0]}) or --data {benchmark}=PATH')
    candidates = [osp.join(data_root, d) for d in DEFAULT_DIRS[benchmark]]
    for path in candidates:
        if osp.isdir(path):
            return path
    raise DataLayoutError(f'{benchmark}: folder {" or ".join(candidates)} does not exist '
                          f'(pass --data {benchmark}=PATH to use another folder)')


def limit_items(items: List[Item], limit: Optional[int]) -> List[Item]:
    """At most ``limit`` items, evenly spaced over the sorted list so that every part of
    the class range is sampled (the first ``limit`` files would cover only a few
    classes).

    Raises:
        ValueError: ``limit`` < 1 (every set would be empty).
    """
    if limit is not None and limit < 1:
        raise ValueError(f'the limit of images per set must be >= 1, got {limit}')
    if not limit or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]
