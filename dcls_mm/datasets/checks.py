"""Pre-flight checks of COCO and ADE20K-style datasets named in a Runner config.

mmdet/mmseg report an empty dataset as ``need at least one array to concatenate`` and
train on segmentation labels whose size differs from their image until validation
fails with an ``IndexError`` that names no file. :func:`check_datasets` reads only
annotation files, folder listings and image headers (no pixels), before any model is
built, and raises one ``ValueError`` line naming the file or folder. Missing files and
folders are left to mmdet/mmseg, whose errors name them. Pure Python + PIL: no
mmdet/mmseg import.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Iterator, Mapping, Optional

from PIL import Image

#: mmseg's ADE20KDataset defaults.
SEG_IMG_SUFFIX, SEG_MAP_SUFFIX = '.jpg', '.png'


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
        ValueError: one line naming ``ann_file`` and the problem.
    """
    if not osp.isfile(ann_file):
        return 0  # mmdet's own error names the missing file
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'COCO annotation file {ann_file} is not valid JSON ({err})') from None
    if not isinstance(data, dict) or 'images' not in data:
        raise ValueError(f'COCO annotation file {ann_file} has no "images" list')
    images = data['images']
    if not images:
        raise ValueError(f'empty COCO dataset: {ann_file} lists no images')
    if filter_empty_gt and not data.get('annotations'):
        raise ValueError(f'empty COCO dataset: {ann_file} has no annotations, and '
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
        ValueError: one line naming the folder or the first bad file.
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
                raise ValueError(f'segmentation label {seg_path} (for image {img_path}) '
                                 'does not exist')
            with Image.open(img_path) as img, Image.open(seg_path) as seg:
                img_size, seg_size = img.size, seg.size
            if img_size != seg_size:
                raise ValueError(f'segmentation label {seg_path} is {seg_size[0]}x{seg_size[1]} '
                                 f'(WxH) but its image {img_path} is {img_size[0]}x{img_size[1]}')
            count += 1
    if count == 0:
        raise ValueError(f'empty segmentation dataset: no *{img_suffix} images in {img_dir}')
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
        ValueError: from :func:`check_coco` / :func:`check_segmentation_folders`.
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


def check_datasets(cfg: Mapping, splits=('train', 'val', 'test')) -> None:
    """Check the datasets of ``cfg``'s ``<split>_dataloader`` entries that are set.

    Args:
        cfg: a Runner config (``mmengine.config.Config`` or dict).
        splits: which dataloaders to check.

    Raises:
        ValueError: one line naming the split, then the file/folder and the problem.
    """
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not loader.get('dataset'):
            continue
        try:
            check_dataset(loader['dataset'])
        except ValueError as err:
            raise ValueError(f'{split}_dataloader: {err}') from None
