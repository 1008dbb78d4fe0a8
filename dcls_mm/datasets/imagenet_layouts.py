"""Tiny ImageNet-style benchmark folders in the real on-disk layouts (demo, tests, speed).

* :func:`write_class_folder` -- ``ROOT/<wnid>/<name>.JPEG`` (ImageNet val as ImageFolder,
  ImageNet-A/R/Sketch);
* :func:`write_corruption_folders` -- ``ROOT/<corruption>/<severity>/<wnid>/<name>.JPEG``
  (ImageNet-C; optionally with the category folders above the corruption folders, and
  with ImageNet-C-bar's parameter-named severity folders).

Pure numpy/PIL. The corruption is a callable argument; :func:`default_corruption`
returns ``dcls_mm.datasets.corruptions.corrupt`` when that module is available, else
additive Gaussian noise whose strength grows with the severity (a stand-in that keeps
the layout and the severity trend, not ImageNet-C's definitions).
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ['synthetic_images', 'write_class_folder', 'write_corruption_folders',
           'default_corruption']

#: ``(wnid, file stem, HxWx3 uint8 image)``
Sample = Tuple[str, str, np.ndarray]
Corruption = Callable[[np.ndarray, str, int, int], np.ndarray]


def synthetic_images(wnids: Sequence[str], per_class: int, size: int = 64,
                     seed: int = 0) -> List[Sample]:
    """Smooth random colour fields with a class-dependent tint, ``per_class`` per wnid.

    Args:
        wnids: class folders to fill.
        per_class: images per class.
        size: height and width in pixels.
        seed: NumPy seed (same arguments, same images).

    Returns:
        ``(wnid, stem, image)`` samples, stems ``ILSVRC2012_val_<8 digits>`` as in
        ImageNet val.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for c, wnid in enumerate(wnids):
        tint = rng.uniform(40, 215, size=3)
        for i in range(per_class):
            coarse = rng.normal(0, 45, size=(size // 8 + 1, size // 8 + 1, 3))
            field = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
            image = np.clip(tint + field + rng.normal(0, 8, (size, size, 3)), 0, 255)
            samples.append((wnid, f'ILSVRC2012_val_{c * per_class + i + 1:08d}',
                            image.astype(np.uint8)))
    return samples


def write_class_folder(root: str, samples: Sequence[Sample], ext: str = '.JPEG',
                       quality: int = 90) -> List[str]:
    """Write ``samples`` as ``root/<wnid>/<stem><ext>`` (JPEG at ``quality``, else PNG).

    Returns:
        The written paths.
    """
    paths = []
    for wnid, stem, image in samples:
        folder = osp.join(root, wnid)
        os.makedirs(folder, exist_ok=True)
        path = osp.join(folder, stem + ext)
        if ext.lower() in ('.jpeg', '.jpg'):
            Image.fromarray(image).save(path, format='JPEG', quality=quality)
        else:
            Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def default_corruption() -> Tuple[Corruption, str]:
    """``(corrupt(image, corruption, severity, seed), description)``.

    ``dcls_mm.datasets.corruptions.corrupt`` when it exists (the ImageNet-C
    definitions), else a Gaussian-noise stand-in with sigma ``0.04 * severity`` (x255).
    """
    try:
        from dcls_mm.datasets.corruptions import corrupt  # noqa: F401
    except ImportError:
        def noise(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
            rng = np.random.default_rng(seed)
            out = image / 255.0 + rng.normal(0, 0.04 * severity, image.shape)
            return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        return noise, 'Gaussian-noise stand-in (sigma 0.04 x severity) for every corruption'

    def real(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
        return np.asarray(corrupt(image, corruption, severity, seed=seed), dtype=np.uint8)
    return real, 'dcls_mm.datasets.corruptions.corrupt (ImageNet-C definitions)'


def write_corruption_folders(root: str, samples: Sequence[Sample],
                             corruptions: Sequence[str], severities: Sequence[int] = (1, 2, 3, 4, 5),
                             corrupt: Optional[Corruption] = None,
                             categories: Optional[Mapping[str, str]] = None,
                             severity_names: Optional[Mapping[str, Sequence[str]]] = None,
                             quality: int = 85, seed: int = 0) -> Dict[str, Dict[int, str]]:
    """Write an ImageNet-C-layout copy of ``samples``.

    Args:
        root: benchmark folder (``ROOT/<corruption>/<severity>/<wnid>/<stem>.JPEG``).
        samples: the clean images.
        corruptions: corruption folder names.
        severities: severities to write (1..5).
        corrupt: ``corrupt(image, corruption, severity, seed) -> image``; ``None``:
            :func:`default_corruption`.
        categories: ``{corruption: category}`` to nest corruption folders under
            category folders (``noise/gaussian_noise/...``), as some ImageNet-C copies do.
        severity_names: ``{corruption: 5 folder names}`` instead of ``1..5`` (ImageNet-C-bar
            generated copies name them by the parameter, e.g. ``'2.35'``).
        quality: JPEG quality (ImageNet-C-bar's generator uses 85).
        seed: base seed; each image gets its own (``seed``, set, image index).

    Returns:
        ``{corruption: {severity: folder}}``.
    """
    if corrupt is None:
        corrupt = default_corruption()[0]
    out: Dict[str, Dict[int, str]] = {}
    for ci, corruption in enumerate(corruptions):
        base = osp.join(root, categories[corruption], corruption) if categories else \
            osp.join(root, corruption)
        for severity in severities:
            name = severity_names[corruption][severity - 1] if severity_names else str(severity)
            folder = osp.join(base, name)
            corrupted = [(w, s, corrupt(img, corruption, severity,
                                        seed * 1_000_003 + ci * 10_007 + severity * 101 + i))
                         for i, (w, s, img) in enumerate(samples)]
            write_class_folder(folder, corrupted, quality=quality)
            out.setdefault(corruption, {})[severity] = folder
    return out
