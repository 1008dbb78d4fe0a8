"""Tiny demo data sets in the REAL on-disk formats of COCO and ADE20K.

The demo configs (``configs/demo/``), ``tools/demo.py`` and the integration tests train
and evaluate on these files with the unmodified mmdet ``CocoDataset`` / ``CocoMetric``
(pycocotools) and mmseg ``ADE20KDataset`` / ``IoUMetric``. Nothing is downloaded.

Every image shows a few filled shapes (square, disc, triangle) on a noisy background.
Each shape is drawn from ONE polygon, which is also written as the instance's COCO
``segmentation``; ``bbox`` is the polygon's bounding box and ``area`` its pixel count, so
boxes, masks and pixels agree. Shapes are placed in disjoint grid cells (no occlusion).

Layouts written::

    make_coco_demo(root)                       make_ade20k_demo(root)
    root/annotations/instances_train2017.json  root/images/training/ADE_train_00000000.jpg
    root/annotations/instances_val2017.json    root/images/validation/ADE_val_00000000.jpg
    root/train2017/000000000000.jpg            root/annotations/training/ADE_train_00000000.png
    root/val2017/000000000000.jpg              root/annotations/validation/ADE_val_00000000.png

ADE20K annotation PNGs are single-channel ``uint8`` with 0 = "other" (ignored: mmseg's
``ADE20KDataset`` uses ``reduce_zero_label=True``) and ``c + 1`` for the ADE20K class with
0-based index ``c``. The shapes use ADE20K classes 0..3 (wall, building, sky, floor); the
demo UperNet config selects these four classes through ``metainfo``, which makes mmseg
map the other 146 to 255 (ignored).

Both functions are deterministic for a given ``seed`` and idempotent: an existing,
complete data set with the same parameters (recorded in ``root/dcls_mm_demo.json``) is
reused; anything else under ``root`` written by an earlier call is replaced.
:func:`coco_demo_cfg_options` / :func:`ade20k_demo_cfg_options` turn what they return
into the config overrides that point the demo configs (or any mmdet COCO / mmseg ADE20K
config) at the data.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
import shutil
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: COCO categories of the demo (COCO-style, 1-based ids).
COCO_DEMO_CATEGORIES = (
    dict(id=1, name='square', supercategory='shape'),
    dict(id=2, name='disc', supercategory='shape'),
    dict(id=3, name='triangle', supercategory='shape'),
)
COCO_DEMO_CLASSES = tuple(c['name'] for c in COCO_DEMO_CATEGORIES)
#: The ADE20K classes (0-based index into mmseg's 150 classes) used by the shapes.
ADE20K_DEMO_CLASS_IDS = (0, 1, 2, 3)
ADE20K_DEMO_CLASSES = ('wall', 'building', 'sky', 'floor')
ADE20K_DEMO_PALETTE = ((120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50))

#: the dataloaders whose dataset the overrides point at the demo data.
_SPLITS = ('train', 'val', 'test')
_MARKER = 'dcls_mm_demo.json'
#: colour of each shape kind (RGB), slightly jittered per instance.
_COLOURS = ((220, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40))


def _polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of shape ``kind`` (0 square, 1 disc, 2 triangle, 3 hexagon)."""
    n = {0: 4, 1: 24, 2: 3, 3: 6}[kind]
    start = angle + (math.pi / 4 if kind == 0 else 0.)
    return [(cx + r * math.cos(start + 2 * math.pi * i / n),
             cy + r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _draw_image(rng: np.random.Generator, width: int, height: int, kinds: Sequence[int],
                max_objects: int):
    """One image: background noise and up to ``max_objects`` shapes in disjoint cells.

    Returns ``(rgb uint8 array, [(kind, polygon, binary mask)])``.
    """
    base = rng.integers(90, 170, size=3)
    img = np.clip(base[None, None] + rng.normal(0, 12, size=(height, width, 3)), 0, 255)
    canvas = Image.fromarray(img.astype(np.uint8), 'RGB')
    draw = ImageDraw.Draw(canvas)
    grid = 2 if max_objects <= 4 else 3
    cw, ch = width / grid, height / grid
    cells = rng.permutation(grid * grid)[:int(rng.integers(1, max_objects + 1))]
    shapes = []
    for cell in cells:
        gx, gy = cell % grid, cell // grid
        r = float(rng.uniform(0.28, 0.45)) * min(cw, ch)
        cx = gx * cw + cw / 2 + float(rng.uniform(-0.05, 0.05)) * cw
        cy = gy * ch + ch / 2 + float(rng.uniform(-0.05, 0.05)) * ch
        kind = int(rng.choice(kinds))
        poly = _polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in _COLOURS[kind])
        draw.polygon(poly, fill=colour)
        mask_img = Image.new('L', (width, height), 0)
        ImageDraw.Draw(mask_img).polygon(poly, fill=1)
        shapes.append((kind, poly, np.asarray(mask_img, dtype=np.uint8)))
    return np.asarray(canvas), shapes


def _reuse_or_reset(root: str, params: dict, expected: Sequence[str]) -> bool:
    """True if ``root`` holds a complete data set made with ``params``; otherwise clear
    what an earlier call wrote there and return False."""
    marker = osp.join(root, _MARKER)
    if osp.isfile(marker):
        try:
            with open(marker) as f:
                same = json.load(f) == params
        except (OSError, ValueError):
            same = False
        if same and all(osp.exists(osp.join(root, p)) for p in expected):
            return True
        for p in expected:  # only our own layout, never the whole root
            path = osp.join(root, p.split('/')[0])
            if osp.isdir(path):
                shutil.rmtree(path)
            elif osp.isfile(path):
                os.remove(path)
        os.remove(marker)
    return False


def _write_marker(root: str, params: dict) -> None:
    with open(osp.join(root, _MARKER), 'w') as f:
        json.dump(params, f, indent=1)


def make_coco_demo(root: str, num_images: int = 8, num_val_images: int = 4,
                   image_size: Tuple[int, int] = (128, 96), max_objects: int = 3,
                   seed: int = 0) -> Dict[str, str]:
    """Write a tiny COCO instance-segmentation data set under ``root``.

    Args:
        root: output folder (created).
        num_images: training images (``train2017``).
        num_val_images: validation images (``val2017``).
        image_size: ``(width, height)`` of every image.
        max_objects: at most this many shapes per image (at least one).
        seed: RNG seed (the data are deterministic).

    Returns:
        dict with ``data_root``, ``train_ann``/``val_ann`` (relative to ``data_root``,
        as in mmdet configs), ``train_img``/``val_img`` prefixes and ``classes``.
    """
    params = dict(kind='coco', num_images=num_images, num_val_images=num_val_images,
                  image_size=list(image_size), max_objects=max_objects, seed=seed, version=1)
    out = dict(data_root=root, train_ann='annotations/instances_train2017.json',
               val_ann='annotations/instances_val2017.json', train_img='train2017/',
               val_img='val2017/', classes=COCO_DEMO_CLASSES)
    if _reuse_or_reset(root, params, [out['train_ann'], out['val_ann'], 'train2017', 'val2017']):
        return out
    from pycocotools import mask as mask_utils  # area of the rasterised polygon

    rng = np.random.default_rng(seed)
    width, height = image_size
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    ann_id = 1
    for split, count, img_dir, ann_file in (('train', num_images, 'train2017', out['train_ann']),
                                            ('val', num_val_images, 'val2017', out['val_ann'])):
        os.makedirs(osp.join(root, img_dir), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, shapes = _draw_image(rng, width, height, kinds=(0, 1, 2),
                                      max_objects=max_objects)
            file_name = f'{i:012d}.jpg'
            Image.fromarray(img).save(osp.join(root, img_dir, file_name), quality=95)
            images.append(dict(id=i, file_name=file_name, width=width, height=height))
            for kind, poly, _ in shapes:
                flat = [round(v, 2) for xy in poly for v in xy]
                rle = mask_utils.frPyObjects([flat], height, width)
                area = float(mask_utils.area(mask_utils.merge(rle)))
                xs, ys = flat[0::2], flat[1::2]
                x0, y0 = max(min(xs), 0.), max(min(ys), 0.)
                x1, y1 = min(max(xs), width), min(max(ys), height)
                annotations.append(dict(
                    id=ann_id, image_id=i, category_id=COCO_DEMO_CATEGORIES[kind]['id'],
                    segmentation=[flat], area=area,
                    bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    iscrowd=0))
                ann_id += 1
        coco = dict(info=dict(description=f'dcls-mm COCO-format demo ({split})', version='1'),
                    licenses=[], images=images, annotations=annotations,
                    categories=[dict(c) for c in COCO_DEMO_CATEGORIES])
        with open(osp.join(root, ann_file), 'w') as f:
            json.dump(coco, f)
    _write_marker(root, params)
    return out


def make_ade20k_demo(root: str, num_images: int = 8, num_val_images: int = 4,
                     image_size: Tuple[int, int] = (128, 128), max_objects: int = 4,
                     seed: int = 0) -> Dict[str, str]:
    """Write a tiny ADE20K-format semantic-segmentation data set under ``root``.

    Same arguments as :func:`make_coco_demo`. Pixel labels: 0 (other, ignored by
    ``reduce_zero_label``) for the background, ``c + 1`` for a shape of ADE20K class ``c``
    in :data:`ADE20K_DEMO_CLASS_IDS`.

    Returns:
        dict with ``data_root``, ``train_img``/``train_seg``/``val_img``/``val_seg``
        prefixes (as in mmseg configs) and ``classes``.
    """
    params = dict(kind='ade20k', num_images=num_images, num_val_images=num_val_images,
                  image_size=list(image_size), max_objects=max_objects, seed=seed, version=1)
    out = dict(data_root=root, train_img='images/training', train_seg='annotations/training',
               val_img='images/validation', val_seg='annotations/validation',
               classes=ADE20K_DEMO_CLASSES)
    if _reuse_or_reset(root, params, ['images', 'annotations']):
        return out
    rng = np.random.default_rng(seed)
    width, height = image_size
    for split, count, prefix in (('training', num_images, 'ADE_train'),
                                 ('validation', num_val_images, 'ADE_val')):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(count):
            img, shapes = _draw_image(rng, width, height, kinds=(0, 1, 2, 3),
                                      max_objects=max_objects)
            label = np.zeros((height, width), dtype=np.uint8)
            for kind, _, mask in shapes:
                label[mask > 0] = ADE20K_DEMO_CLASS_IDS[kind] + 1
            name = f'{prefix}_{i:08d}'
            Image.fromarray(img).save(osp.join(root, 'images', split, name + '.jpg'), quality=95)
            Image.fromarray(label, 'L').save(osp.join(root, 'annotations', split, name + '.png'))
    _write_marker(root, params)
    return out


def coco_demo_cfg_options(data: Mapping[str, str]) -> Dict[str, str]:
    """Config overrides (``Config.merge_from_dict`` / ``--cfg-options`` keys) that point
    an mmdet COCO config at a data set of :func:`make_coco_demo`.

    Args:
        data: what :func:`make_coco_demo` returned.

    Returns:
        The train/val/test dataset ``data_root`` and the val/test ``CocoMetric``
        ``ann_file`` (the metric reads the annotations itself).
    """
    root = data['data_root'].rstrip('/') + '/'
    options = {f'{split}_dataloader.dataset.data_root': root for split in _SPLITS}
    options.update({f'{split}_evaluator.ann_file': root + data['val_ann']
                    for split in _SPLITS[1:]})
    return options


def ade20k_demo_cfg_options(data: Mapping[str, str]) -> Dict[str, str]:
    """Config overrides that point an mmseg ADE20K config at a data set of
    :func:`make_ade20k_demo` (the train/val/test dataset ``data_root``).

    Args:
        data: what :func:`make_ade20k_demo` returned.
    """
    return {f'{split}_dataloader.dataset.data_root': data['data_root'] for split in _SPLITS}
