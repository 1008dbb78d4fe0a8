"""Pre-flight checks of the files a Runner config names: datasets and checkpoints.

A missing data folder surfaces in mmdet/mmseg as a ``FileNotFoundError`` once the model
is built and the log has filled the screen, and a missing pretrained checkpoint only after
that is fixed; :func:`check_inputs` lists every missing data root, annotation file, image
folder and checkpoint at once, before anything is built.

mmdet/mmseg report an empty dataset as ``need at least one array to concatenate`` and
train on segmentation labels whose size differs from their image until validation
fails with an ``IndexError`` that names no file. :func:`check_datasets` reads only
annotation files, folder listings and image headers (no pixels), before any model is
built, and raises one line naming the file or folder.

Both raise :class:`InputCheckError`, which the tools print without a traceback (exit
code 2). Pure Python + PIL: no mmdet/mmseg import.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Dict, Iterator, List, Mapping, Optional

from PIL import Image

#: mmseg's ADE20KDataset defaults.
SEG_IMG_SUFFIX, SEG_MAP_SUFFIX = '.jpg', '.png'
#: where the README describes the expected data and checkpoint layout.
LAYOUT_HELP = 'layout: README.md, "Training and testing" > "Data and checkpoints"'


class InputCheckError(ValueError):
    """A file or folder a config names is missing or unusable; one line per problem."""


def _is_local(path) -> bool:
    return isinstance(path, str) and bool(path) and '://' not in path


def _shown(path: str) -> str:
    """``path``, and where it points when it is relative (the tools run from anywhere)."""
    return path if osp.isabs(path) else f'{path} (= {osp.abspath(path)})'


def _join(root: Optional[str], path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _leaf_datasets(dataset_cfg: Mapping) -> Iterator[Mapping]:
    """Dataset configs inside wrappers (``RepeatDataset``, ``ConcatDataset``...)."""
    if 'datasets' in dataset_cfg:
        for sub in dataset_cfg['datasets']:
            yield from _leaf_datasets(sub)
    elif 'dataset' in dataset_cfg:
        yield from _leaf_datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def check_coco(ann_file: str, filter_empty_gt: bool = False) -> int:
    """Check a COCO annotation file has images (with annotations if they are required).

    Args:
        ann_file: path of the ``instances_*.json`` file.
        filter_empty_gt: the dataset drops images without annotations (mmdet's
            ``filter_cfg=dict(filter_empty_gt=True)``): at least one must have one.

    Returns:
        The number of images (0 when ``ann_file`` does not exist: mmdet says so itself).

    Raises:
        InputCheckError: one line naming ``ann_file`` and the problem.
    """
    if not osp.isfile(ann_file):
        return 0  # mmdet's own error names the missing file
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputCheckError(
            f'COCO annotation file {ann_file} is not valid JSON ({err})') from None
    if not isinstance(data, dict) or 'images' not in data:
        raise InputCheckError(f'COCO annotation file {ann_file} has no "images" list')
    images = data['images']
    if not images:
        raise InputCheckError(f'empty COCO dataset: {ann_file} lists no images')
    if filter_empty_gt and not data.get('annotations'):
        raise InputCheckError(f'empty COCO dataset: {ann_file} has no annotations, and '
                         'filter_empty_gt drops images without any')
    return len(images)


def check_segmentation_folders(img_dir: str, seg_dir: str, img_suffix: str = SEG_IMG_SUFFIX,
                               seg_map_suffix: str = SEG_MAP_SUFFIX) -> int:
    """Check an ADE20K-style pair of folders: images exist, each has a label map of the
    same size (image headers only are read).

    Args:
        img_dir: folder of the images (searched recursively, like mmseg).
        seg_dir: folder of the label maps, same relative paths.
        img_suffix: image file suffix.
        seg_map_suffix: label file suffix.

    Returns:
        The number of image/label pairs (0 when ``img_dir`` does not exist: mmseg says
        so itself).

    Raises:
        InputCheckError: one line naming the folder or the first bad file.
    """
    if not osp.isdir(img_dir):
        return 0  # mmseg's own error names the missing folder
    count = 0
    for folder, _, files in sorted(os.walk(img_dir)):
        for name in sorted(files):
            if not name.endswith(img_suffix):
                continue
            img_path = osp.join(folder, name)
            rel = osp.relpath(img_path, img_dir)
            seg_path = osp.join(seg_dir, rel[:-len(img_suffix)] + seg_map_suffix)
            if not osp.isfile(seg_path):
                raise InputCheckError(f'segmentation label {seg_path} (for image {img_path}) '
                                 'does not exist')
            with Image.open(img_path) as img, Image.open(seg_path) as seg:
                img_size, seg_size = img.size, seg.size
            if img_size != seg_size:
                raise InputCheckError(
                    f'segmentation label {seg_path} is {seg_size[0]}x{seg_size[1]} (WxH) '
                    f'but its image {img_path} is {img_size[0]}x{img_size[1]}')
            count += 1
    if count == 0:
        raise InputCheckError(f'empty segmentation dataset: no *{img_suffix} images in {img_dir}')
    return count


def check_dataset(dataset_cfg: Mapping) -> None:
    """Check one dataset config (wrappers are opened): a ``*CocoDataset`` with a ``.json``
    ``ann_file``; an ``*ADE20KDataset`` (or any dataset config naming its
    ``img_suffix``) reading folders (``data_prefix`` with ``seg_map_path``, no
    ``ann_file``). Other datasets are left to their own loaders.

    Args:
        dataset_cfg: a dataset config dict (``data_root``, ``ann_file``,
            ``data_prefix``, ``filter_cfg``, suffixes).

    Raises:
        InputCheckError: from :func:`check_coco` / :func:`check_segmentation_folders`.
    """
    for cfg in _leaf_datasets(dataset_cfg):
        kind = str(getattr(cfg.get('type'), '__name__', cfg.get('type'))).split('.')[-1]
        root = cfg.get('data_root')
        ann_file = cfg.get('ann_file') or ''
        prefix = cfg.get('data_prefix') or {}
        # only the layouts whose defaults we know (another class may use other suffixes
        # or another JSON schema)
        if kind.endswith('CocoDataset') and str(ann_file).endswith('.json'):
            filter_cfg = cfg.get('filter_cfg') or {}
            check_coco(_join(root, ann_file), bool(filter_cfg.get('filter_empty_gt', False)))
        elif (kind.endswith('ADE20KDataset') or 'img_suffix' in cfg) and \
                'seg_map_path' in prefix and not ann_file:
            check_segmentation_folders(_join(root, prefix.get('img_path', '')),
                                       _join(root, prefix['seg_map_path']),
                                       cfg.get('img_suffix', SEG_IMG_SUFFIX),
                                       cfg.get('seg_map_suffix', SEG_MAP_SUFFIX))


def missing_data(cfg: Mapping, splits=('train', 'val', 'test')) -> List[str]:
    """The data roots, annotation files and ``data_prefix`` folders of ``cfg``'s
    ``<split>_dataloader`` datasets that do not exist (local paths only).

    A missing data root hides everything under it, so only the root is reported then.

    Args:
        cfg: a Runner config (``mmengine.config.Config`` or dict).
        splits: which dataloaders to check.

    Returns:
        One line per missing path, naming the dataloaders that use it.
    """
    missing: Dict[str, List[str]] = {}
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not loader.get('dataset'):
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            if (dataset.get('backend_args') or {}).get('backend', 'local') != 'local':
                continue
            root = dataset.get('data_root')
            if _is_local(root) and not osp.isdir(root):
                missing.setdefault(f'data root {_shown(root)}', []).append(split)
                continue
            paths = [('annotation file', dataset.get('ann_file'), osp.isfile)] + [
                ('folder', prefix, osp.isdir)
                for prefix in (dataset.get('data_prefix') or {}).values()]
            for what, path, exists in paths:
                if _is_local(path) and not exists(_join(root, path)):
                    missing.setdefault(f'{what} {_shown(_join(root, path))}', []).append(split)
    return [f'{what} does not exist ({", ".join(f"{s}_dataloader" for s in used)})'
            for what, used in missing.items()]


def _pretrained_checkpoints(node, key: str) -> Iterator[tuple]:
    """``(config key, checkpoint)`` of every ``init_cfg=dict(type='Pretrained')`` below
    ``node``."""
    if isinstance(node, Mapping):
        if node.get('type') == 'Pretrained' and 'checkpoint' in node:
            yield f'{key}.checkpoint', node['checkpoint']
        for name, value in node.items():
            yield from _pretrained_checkpoints(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _pretrained_checkpoints(value, f'{key}[{i}]')


def missing_checkpoints(cfg: Mapping, pretrained: bool = True) -> List[str]:
    """The local checkpoint files ``cfg`` loads that do not exist: ``load_from`` and,
    with ``pretrained``, every ``init_cfg=dict(type='Pretrained', checkpoint=...)`` of
    the model (URLs and ``scheme://`` names are left to their loaders).

    Args:
        cfg: a Runner config.
        pretrained: also check the model's ``Pretrained`` initialisation (training
            uses it; testing loads ``load_from`` over it and never reads it).

    Returns:
        One line per missing file, naming the config key.
    """
    found = [('load_from', cfg.get('load_from'))]
    if pretrained:
        found += list(_pretrained_checkpoints(cfg.get('model') or {}, 'model'))
    return [f'checkpoint {_shown(path)} does not exist ({key})'
            # mmengine's local loader expands '~' (its data loaders do not)
            for key, path in found if _is_local(path) and not osp.isfile(osp.expanduser(path))]


def check_inputs(cfg: Mapping, splits=('train', 'val', 'test'), pretrained: bool = True) -> None:
    """Check that the data (:func:`missing_data`) and checkpoints
    (:func:`missing_checkpoints`) ``cfg`` names exist, all of them at once.

    Args:
        cfg: a Runner config.
        splits: which dataloaders to check.
        pretrained: see :func:`missing_checkpoints`.

    Raises:
        InputCheckError: one line per missing path, each saying where the README
            describes the layout.
    """
    problems = missing_data(cfg, splits) + missing_checkpoints(cfg, pretrained)
    if problems:
        raise InputCheckError('\n'.join(f'{p}; {LAYOUT_HELP}' for p in problems))


def check_datasets(cfg: Mapping, splits=('train', 'val', 'test')) -> None:
    """Check the datasets of ``cfg``'s ``<split>_dataloader`` entries that are set.

    Args:
        cfg: a Runner config (``mmengine.config.Config`` or dict).
        splits: which dataloaders to check.

    Raises:
        InputCheckError: one line naming the split, then the file/folder and the
            problem.
    """
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not loader.get('dataset'):
            continue
        try:
            check_dataset(loader['dataset'])
        except ValueError as err:
            raise InputCheckError(f'{split}_dataloader: {err}') from None
