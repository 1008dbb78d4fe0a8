"""Pre-generated corrupted copies of an image folder tree (ImageNet-C layout).

``make_corrupted(src, out, corruptions, severities)`` writes
``out/<corruption>/<severity>/<path of the image relative to src>`` for every image
under ``src``: an ImageNet ``val/`` folder (``val/<wnid>/*.JPEG``) becomes the
ImageNet-C layout ``out/<corruption>/<severity>/<wnid>/*.JPEG``; a COCO ``val2017/`` or
an ADE20K ``images/validation/`` folder becomes one flat folder per set. Annotations
are not touched: a dataset config whose image prefix points at
``out/<corruption>/<severity>/`` reads the corrupted images with its own annotation
files (``tools/robustness/test_downstream.py --corrupted-root out``).

File names are kept exactly (extension included), because annotations refer to them
(COCO ``file_name``, mmseg's ``img_suffix``, ImageNet class folders). In the default
``png`` format the files hold lossless PNG data under their original names: OpenCV
(MMCV's default decoder), Pillow and torchvision read images by their content, not by
their extension. A pre-generated PNG set therefore decodes to exactly the array that
``dcls_mm.Corrupt`` with the same seed produces on the fly (both decode the source
with OpenCV, as MMCV's ``LoadImageFromFile`` does, and derive each image's seed with
:func:`dcls_mm.datasets.corruptions.image_seed`). ``jpeg`` (quality 85 by default, the
quality of the released ImageNet-C files) is ~5x smaller but lossy, so its numbers
differ slightly from on-the-fly corruption.

Resumable: every file is written atomically (temporary file + rename), existing files
are skipped, and finished sets are recorded in ``out/records.jsonl`` with the run's
fingerprint (seed, format, quality, the list of source images): a rerun with other
settings into the same folder is refused instead of mixing two generations.
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from dcls_mm.datasets.corruptions import CORRUPTION_SUBSETS, corrupt_bgr, image_seed
from dcls_mm.utils.fileio import atomic_write

from .records import SetRecords

__all__ = ['make_corrupted', 'list_images', 'corrupt_file', 'IMAGE_EXTENSIONS', 'FORMATS',
           'IMAGENET_C_JPEG_QUALITY']

#: Extensions (lower case) of the files that are corrupted; other files are ignored.
IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp'})
#: Output encodings.
FORMATS = ('png', 'jpeg')
#: JPEG quality of the released ImageNet-C images (Hendrycks & Dietterich's generator).
IMAGENET_C_JPEG_QUALITY = 85


def list_images(src: str) -> List[str]:
    """Image files under ``src``, as sorted paths relative to it ('/'-separated).

    Hidden files and folders (names starting with '.') are skipped.

    Args:
        src: the image folder (e.g. ImageNet ``val/``, COCO ``val2017/``).

    Raises:
        ValueError: ``src`` is not a folder or holds no image.
    """
    if not osp.isdir(src):
        raise ValueError(f'{src} is not a folder (give the image folder, e.g. val2017/ or '
                         'images/validation/)')
    found = []
    for folder, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        rel = osp.relpath(folder, src)
        for name in files:
            if not name.startswith('.') and osp.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/'))
    if not found:
        raise ValueError(f'{src} holds no image files ({", ".join(sorted(IMAGE_EXTENSIONS))})')
    return sorted(found)


def corrupt_file(src_path: str, dst_path: str, corruption: str, severity: int, seed: int,
                 fmt: str = 'png', quality: int = IMAGENET_C_JPEG_QUALITY) -> None:
    """Corrupt one image file into ``dst_path`` (atomically).

    The source is decoded as MMCV's ``LoadImageFromFile`` does by default (OpenCV,
    colour, BGR) and corrupted with the per-image seed of ``dcls_mm.Corrupt``.

    Args:
        src_path: source image file.
        dst_path: output file (folders are created).
        corruption: corruption name.
        severity: 1..5.
        seed: run seed (see :func:`dcls_mm.datasets.corruptions.image_seed`).
        fmt: ``'png'`` (lossless) or ``'jpeg'``.
        quality: JPEG quality (``fmt='jpeg'`` only).

    Raises:
        ValueError: unreadable source image, or an image the corruption refuses.
    """
    img = cv2.imdecode(np.fromfile(src_path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f'{src_path} is not a readable image')
    try:
        out = corrupt_bgr(img, corruption, severity,
                          image_seed(seed, corruption, severity, src_path))
    except ValueError as exc:
        raise ValueError(f'{src_path}: {exc}') from None
    if fmt == 'png':
        ok, buf = cv2.imencode('.png', out)
    else:
        ok, buf = cv2.imencode('.jpg', out, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f'could not encode {dst_path} as {fmt}')
    atomic_write(dst_path, buf.tobytes())


def _corrupt_task(task: Tuple[str, str, str, int, int, str, int]) -> None:
    """Pool task: :func:`corrupt_file` with a tuple of its arguments."""
    corrupt_file(*task)


def _init_worker() -> None:
    # one OpenCV thread per worker process: the processes are the parallelism
    cv2.setNumThreads(1)


def _check_args(corruptions: Sequence[str], severities: Sequence[int], fmt: str,
                quality: int, seed: int) -> None:
    unknown = [c for c in corruptions if c not in CORRUPTION_SUBSETS['all']]
    if unknown:
        raise ValueError(f'unknown corruption {unknown[0]!r}; known: '
                         f'{", ".join(CORRUPTION_SUBSETS["all"])}')
    if not corruptions or not severities:
        raise ValueError('no corruption or no severity given')
    bad = [s for s in severities if isinstance(s, bool) or s not in (1, 2, 3, 4, 5)]
    if bad:
        raise ValueError(f'severity {bad[0]!r} is outside 1..5 (the clean set is the source '
                         'folder itself)')
    if fmt not in FORMATS:
        raise ValueError(f'format {fmt!r} is not one of {", ".join(FORMATS)}')
    if not 1 <= int(quality) <= 100:
        raise ValueError(f'JPEG quality {quality} is outside 1..100')
    if int(seed) < 0:
        raise ValueError(f'seed must be non-negative, got {seed}')


def make_corrupted(src: str, out: str, corruptions: Sequence[str],
                   severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0,
                   workers: int = 1, fmt: str = 'png',
                   quality: int = IMAGENET_C_JPEG_QUALITY,
                   progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Write corrupted copies of the images under ``src`` to
    ``out/<corruption>/<severity>/<same relative path>``.

    Args:
        src: the clean image folder.
        out: output root (created; must not be inside ``src``).
        corruptions: corruption names.
        severities: severities 1..5.
        seed: run seed; per-image seeds equal those of ``dcls_mm.Corrupt(seed=seed)``.
        workers: processes (1 = in this process).
        fmt: ``'png'`` (lossless, default) or ``'jpeg'``.
        quality: JPEG quality (``fmt='jpeg'``).
        progress: show a progress bar per set and an ETA line per finished set.

    Returns:
        ``{'<corruption>/<severity>': {'images', 'written', 'seconds'}}`` for the sets
        this call wrote files of (complete sets of an earlier run are skipped).

    Raises:
        ValueError: bad arguments, an empty or missing ``src``, ``out`` inside ``src``,
            or an unreadable image.
        dcls_mm.evaluation.records.FingerprintMismatch: ``out`` holds sets generated
            with other settings or other source images.
    """
    _check_args(corruptions, severities, fmt, quality, seed)
    src_abs, out_abs = osp.realpath(src), osp.realpath(out)
    if out_abs == src_abs or out_abs.startswith(src_abs + os.sep):
        raise ValueError(f'the output folder {out} must not be inside the source folder {src}')
    images = list_images(src)
    fingerprint = dict(
        tool='make_corrupted', definitions='imagecorruptions 1.1.2', seed=int(seed),
        format=fmt, quality=int(quality) if fmt == 'jpeg' else None, images=len(images),
        images_sha256=hashlib.sha256('\n'.join(images).encode()).hexdigest())
    records = SetRecords(osp.join(out, 'records.jsonl'), fingerprint)
    sets = [(c, int(s)) for c in corruptions for s in severities]

    from tqdm import tqdm
    finished: Dict[str, Dict[str, float]] = {}
    start, work_done = time.perf_counter(), 0
    # Workers come from a fresh fork server, not from this process: a fork of a process
    # whose OpenCV thread pool has run deadlocks in the child's first OpenCV call.
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload([__name__])
    # leaving the with-block terminates the workers (all results have been consumed)
    with context.Pool(workers, initializer=_init_worker) if workers > 1 \
            else contextlib.nullcontext() as pool:
        for index, (corruption, severity) in enumerate(sets, 1):
            key = f'{corruption}/{severity}'
            tasks = [(osp.join(src, rel), osp.join(out, corruption, str(severity), rel),
                      corruption, severity, int(seed), fmt, int(quality)) for rel in images]
            # files of a killed run are complete (atomic writes): only missing ones remain
            pending = [t for t in tasks if not osp.exists(t[1])]
            if not pending and key in records:
                continue
            t0 = time.perf_counter()
            results = (pool.imap_unordered(_corrupt_task, pending, chunksize=4) if pool
                       else map(_corrupt_task, pending))
            for _ in tqdm(results, total=len(pending), desc=key, unit='img',
                          disable=not progress, leave=False):
                pass
            seconds = time.perf_counter() - t0
            summary = dict(images=len(images), written=len(pending), seconds=round(seconds, 3))
            if key not in records:
                records.add(key, summary)
            finished[key] = summary
            work_done += len(pending)
            if progress:
                elapsed = time.perf_counter() - start
                left = (len(sets) - index) * len(images)
                remaining = elapsed / max(work_done, 1) * left
                tqdm.write(f'[make_corrupted] {key}: {len(pending)} written, '
                           f'{len(images) - len(pending)} already there | sets {index}/'
                           f'{len(sets)}, elapsed {elapsed:.0f} s, remaining ~{remaining:.0f} s',
                           file=sys.stderr)
    return finished
