"""ImageNet classifier robustness runner: clean val, ImageNet-C, C-bar, A, R, Sketch.

One run evaluates a timm classifier on *sets* (a whole small benchmark, or one
corruption x severity of ImageNet-C / C-bar). Each finished set is recorded in
``<out>/records.jsonl`` (:class:`~dcls_mm.evaluation.records.SetRecords`) the moment it
completes, so a killed run resumes at the next set; the run fingerprint (model,
checkpoint digest, preprocessing, limit per set, AMP) refuses to mix results of two
configurations. Results (``results.json``, ``results.csv``, severity plots) are always
rebuilt from the records.

Data: worker processes read and decode the images to uint8 tensors (JPEG through
``torchvision.io.decode_jpeg``, libjpeg-turbo; anything else through PIL); the main
process normalises whole batches. ImageNet-C/C-bar images are evaluated at their native
size (224x224; no resize, no crop), the other benchmarks through the benchmarks' eval
transform (bicubic resize to 256, centre crop 224) with the model's mean/std
(:func:`resolve_preprocessing`).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes the disjoint shard
``items[rank::world]`` of every set and the integer counts are summed with
``all_reduce``, so the numbers equal a single-process run exactly; rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import os.path as osp
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dcls_mm.utils.checkpoint_io import format_keys

from .folders import (BENCHMARKS, DataLayoutError, class_subset, limit_items,
                      resolve_benchmark_root, scan_class_folders, scan_corruption_root)
from .imagenet_c import summarize_imagenet_c, summarize_imagenet_c_bar
from .records import SetRecords, file_digest, write_csv_atomic, write_json_atomic

__all__ = [
    'EvalConfig', 'CheckpointError', 'BadImageError', 'EvalSet', 'build_classifier', 'read_image',
    'load_classifier_checkpoint', 'resolve_preprocessing', 'discover_sets', 'run_evaluation',
    'build_results', 'CSV_COLUMNS'
]

CORRUPTION_BENCHMARKS = ('imagenet-c', 'imagenet-c-bar')
CSV_COLUMNS = ('benchmark', 'corruption', 'severity', 'images', 'top1', 'error', 'unreadable')


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (one line naming the keys)."""


class BadImageError(ValueError):
    """An image could not be decoded and ``on_bad_image='fail'``."""


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and how (the CLI's arguments).

    Args:
        model: a timm model name (``convnext_dcls_tiny``, ``convnext_tiny``, ...).
        benchmarks: benchmark names (see :data:`~dcls_mm.evaluation.folders.BENCHMARKS`)
            or ``'all'`` (every benchmark whose folder exists).
        out_dir: records, results and plots go here.
        data_root: folder holding the default benchmark folders.
        data: per-benchmark folder overrides ``{benchmark: path}``.
        checkpoint: weights file; ``None`` keeps the random initialisation.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{'arch': 'atto'}``).
        batch_size: images per forward.
        workers: DataLoader worker processes (0: decode in the main process).
        device: ``'cpu'`` or ``'cuda'`` (``'cuda'`` uses ``cuda:LOCAL_RANK`` under torchrun).
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
        channels_last: run model and inputs in channels_last memory format.
        limit_per_set: evaluate at most this many images per set (evenly spaced over the
            sorted file list); ``None``: all.
        clean_top1: clean ImageNet top-1 (%) for the relative mCE when this run (and its
            records) have no ``imagenet`` result.
        on_bad_image: ``'skip'`` (warn, count in ``unreadable``) or ``'fail'``.
        progress: show tqdm bars and the run-level ETA lines (rank 0 only).
    """
    model: str
    benchmarks: Sequence[str]
    out_dir: str
    data_root: Optional[str] = None
    data: Dict[str, str] = dataclasses.field(default_factory=dict)
    checkpoint: Optional[str] = None
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 64
    workers: int = 2
    device: str = 'cpu'
    amp: bool = False
    channels_last: bool = True
    limit_per_set: Optional[int] = None
    clean_top1: Optional[float] = None
    on_bad_image: str = 'skip'
    progress: bool = True


@dataclasses.dataclass
class EvalSet:
    """One evaluated unit: a small benchmark, or a corruption at a severity.

    Args:
        key: records key (``'imagenet'``, ``'imagenet-c/fog/3'``, ...).
        benchmark: its benchmark.
        root: the folder holding its ``<wnid>/`` class folders.
        native: evaluate at native size (ImageNet-C/C-bar) instead of the eval transform.
        corruption: corruption name, or ``None``.
        severity: 1..5, or ``None``.
        items: ``(path, label)`` pairs; labels are ImageNet-1k indices, or positions in
            the 200-class list for ImageNet-A/R.
        class_indices: the ImageNet-1k logits compared (A/R: their 200), ``None``: all.
    """
    key: str
    benchmark: str
    root: str
    native: bool
    corruption: Optional[str] = None
    severity: Optional[int] = None
    items: List[Tuple[str, int]] = dataclasses.field(default_factory=list)
    class_indices: Optional[Tuple[int, ...]] = None


# --- model ----------------------------------------------------------------------------------
def _one_line(message: str) -> str:
    return '; '.join(line.strip() for line in str(message).splitlines() if line.strip())


def load_classifier_checkpoint(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load a weights file into a timm classifier, strictly.

    The file is read with :func:`dcls_mm.models.load_checkpoint_file` (no code
    execution). ConvNeXt-dcls classifiers go through
    :func:`dcls_mm.models.checkpoint_filter_fn` (published reference files, dcls-mm
    files); other models take the plain state dict, unwrapped as timm does (EMA weights
    ``state_dict_ema``/``model_ema`` when present, else ``state_dict``/``model``, else
    the flat dict; ``module.``/``_orig_mod.`` prefixes removed).

    Args:
        model: the classifier (its head must be in the file: nothing may stay random).
        path: the checkpoint file.

    Returns:
        ``{"file", "sha256", "entry"}`` (``entry``: the wrapper key the weights came from).

    Raises:
        CheckpointError: missing file, unreadable file, or keys/shapes that do not fit
            (missing, unexpected and mis-shaped keys are named).
    """
    from timm.models import clean_state_dict

    from dcls_mm.models import checkpoint_filter_fn, load_checkpoint_file
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        checkpoint = load_checkpoint_file(path, map_location='cpu')
    except Exception as e:  # noqa: BLE001 - any reader failure is one message
        raise CheckpointError(f'checkpoint {path} cannot be read: {_one_line(e)}') from None
    target = model.state_dict()
    entry = None
    if type(model).__name__ == 'ConvNeXtDCLSClassifier':
        try:
            state_dict = checkpoint_filter_fn(checkpoint, model)
        except ValueError as e:
            raise CheckpointError(f'checkpoint {path} does not fit {type(model).__name__}: '
                                  f'{_one_line(e)}') from None
        entry = next((k for k in ('state_dict', 'model') if isinstance(checkpoint, dict)
                      and isinstance(checkpoint.get(k), dict)), None)
    else:
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f'checkpoint {path} holds a {type(checkpoint).__name__}, '
                                  'not a state dict')
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                entry = key
                break
        state_dict = clean_state_dict(checkpoint[entry] if entry else checkpoint)
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [f'{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}'
                  for k, v in state_dict.items()
                  if k in target and hasattr(v, 'shape') and v.shape != target[k].shape]
    if missing or unexpected or mismatched:
        parts = [f'{name} ({len(keys)}): {format_keys(keys, 6)}' for name, keys in
                 (('missing keys', missing), ('unexpected keys', unexpected),
                  ('shape mismatches', mismatched)) if keys]
        raise CheckpointError(f'checkpoint {path} does not fit {type(model).__name__}: '
                              + '; '.join(parts))
    model.load_state_dict(state_dict, strict=True)
    return {'file': osp.abspath(path), 'sha256': file_digest(path), 'entry': entry}


def build_classifier(name: str, checkpoint: Optional[str] = None,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, dict]:
    """Create a timm classifier (ConvNeXt-dcls registered) and load its weights.

    Args:
        name: timm model name.
        checkpoint: weights file, or ``None`` for the random initialisation (drawn with
            torch seed 0, so that a resumed run continues with the same weights).
        model_kwargs: extra ``timm.create_model`` arguments.

    Returns:
        ``(model in eval mode, checkpoint info or {"file": None, "init": ...})``.

    Raises:
        CheckpointError: see :func:`load_classifier_checkpoint`.
        ValueError: unknown model name.
    """
    import timm

    import dcls_mm.models  # noqa: F401  (registers convnext_dcls_* in timm)
    if not timm.is_model(name):
        raise ValueError(f'unknown timm model {name!r} (see timm.list_models())')
    with torch.random.fork_rng():  # without a checkpoint: the same random weights every run
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    if model.num_classes != 1000:
        raise ValueError(f'{name} has {model.num_classes} classes; the ImageNet robustness '
                         'benchmarks need a 1000-class ImageNet-1k classifier')
    info = (load_classifier_checkpoint(model, checkpoint) if checkpoint else
            {'file': None, 'init': 'random (torch seed 0)'})
    return model.eval(), info


def resolve_preprocessing(model: nn.Module) -> Dict[str, Any]:
    """The benchmarks' eval transform with the model's mean/std, and the native one.

    The geometry is the benchmarks' protocol for every model: bicubic resize of the
    shorter side to 256 (crop_pct 0.875), centre crop 224. Not the model's timm config:
    a model built without weights gets that of its default pretrained tag, whatever
    checkpoint is loaded afterwards (``convnext_tiny``: ``in12k_ft_in1k``, crop_pct
    0.95, a resize to 235 for the official ImageNet-1k ConvNeXt-T weights).

    Returns:
        ``{"eval": {input_size, interpolation, mean, std, crop_pct, crop_mode},
        "native": {mean, std, resize: None, crop: None}}``: ``eval`` is used for
        ImageNet/A/R/Sketch, ``native`` (the model's mean/std, images as they are) for
        ImageNet-C/C-bar.
    """
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)  # the mean/std the weights expect
    cfg.update(input_size=(3, 224, 224), interpolation='bicubic', crop_pct=0.875,
               crop_mode='center')
    eval_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return {
        'eval': eval_cfg,
        'native': {'mean': list(cfg['mean']), 'std': list(cfg['std']), 'resize': None,
                   'crop': None},
    }


# --- data --------------------------------------------------------------------------------
def read_image(path: str, transform: Optional[Callable] = None) -> Tensor:
    """Read one image as a uint8 CHW RGB tensor.

    Args:
        path: image file.
        transform: PIL image -> uint8 tensor (the timm eval transform); ``None``: the
            image at its native size (JPEG decoded by libjpeg-turbo through torchvision,
            other formats and JPEGs it cannot read through PIL).
    """
    if transform is None and path.lower().endswith(('.jpeg', '.jpg')):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        try:
            return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # e.g. CMYK or a PNG named .JPEG (both exist in ImageNet): PIL below
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert('RGB')
        if transform is not None:
            return transform(img)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _ImageList(torch.utils.data.Dataset):
    """``(path, label, set index)`` items decoded to uint8 tensors in the workers."""

    def __init__(self, items: List[Tuple[str, int, int]], native: List[bool],
                 transform: Callable):
        self.items = items
        self.native = native
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label, set_idx = self.items[i]
        try:
            image = read_image(path, None if self.native[set_idx] else self.transform)
            return image, label, set_idx, path, None
        except Exception as e:  # noqa: BLE001 - reported per image by the main process
            return None, label, set_idx, path, f'{type(e).__name__}: {_one_line(e)}'


def _size_mismatch(odd: str, odd_shape, first: str, first_shape) -> str:
    """The error for two images of one set, (C, H, W) shapes, of different sizes."""
    # ImageNet-C/C-bar are evaluated as they are: one size per set (224x224)
    return (f'images of one set differ in size: {odd} is {odd_shape[2]}x{odd_shape[1]}, '
            f'{first} is {first_shape[2]}x{first_shape[1]} (ImageNet-C/C-bar images are '
            'evaluated at their native size, 224x224)')


def _collate(samples) -> Dict[str, Any]:
    good = [s for s in samples if s[0] is not None]
    bad = [(s[3], s[4]) for s in samples if s[0] is None]
    out = {'set_idx': samples[0][2], 'bad': bad, 'error': None, 'images': None,
           'labels': torch.tensor([s[1] for s in good], dtype=torch.long)}
    if good:
        shapes = {tuple(s[0].shape) for s in good}
        if len(shapes) > 1:
            first = good[0]
            odd = next(s for s in good if tuple(s[0].shape) != tuple(first[0].shape))
            out['error'] = _size_mismatch(odd[3], odd[0].shape, first[3], first[0].shape)
        else:
            out['images'] = torch.stack([s[0] for s in good])
            out['first'] = good[0][3]
    return out


class _SetBatches(torch.utils.data.Sampler):
    """Batches of indices that never straddle two sets (a set's counts are final as soon
    as the next set's first batch arrives)."""

    def __init__(self, set_ranges: List[Tuple[int, int]], batch_size: int):
        self.batches = [list(range(s, min(s + batch_size, e)))
                        for s, e in set_ranges for s in range(s, e, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --- sets --------------------------------------------------------------------------------
def discover_sets(benchmarks: Sequence[str], data_root: Optional[str],
                  data: Dict[str, str], limit_per_set: Optional[int] = None,
                  skip: Sequence[str] = ()) -> List[EvalSet]:
    """Find every set of ``benchmarks`` and list its images.

    Args:
        benchmarks: benchmark names, or ``['all']``: every benchmark whose folder exists.
        data_root: folder holding the default benchmark folders.
        data: per-benchmark folder overrides.
        limit_per_set: keep at most this many images per set (see
            :func:`~dcls_mm.evaluation.folders.limit_items`).
        skip: set keys whose image lists need not be read (already recorded).

    Returns:
        The sets in run order; sets in ``skip`` have empty ``items``.

    Raises:
        DataLayoutError: an unknown benchmark, a missing folder, or a wrong layout.
    """
    data = data or {}
    unknown = sorted(set(data) - set(BENCHMARKS))
    if unknown:  # a misspelt key would otherwise be ignored
        raise DataLayoutError(f'unknown benchmark(s) in the data folders: '
                              f'{", ".join(unknown)} (known: {", ".join(BENCHMARKS)})')
    names = list(benchmarks)
    if 'all' in names:
        names = []
        for bench in BENCHMARKS:
            try:
                resolve_benchmark_root(bench, data_root, data)
            except DataLayoutError:
                if bench in data:  # a folder named by the user must be there
                    raise
                continue
            names.append(bench)
        if not names:
            raise DataLayoutError(f'--benchmark all: none of the benchmark folders exists '
                                  f'under {data_root}')
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        raise DataLayoutError(f'unknown benchmark {unknown[0]!r} (choose from '
                              f'{", ".join(BENCHMARKS)}, all)')
    skip = set(skip)
    sets: List[EvalSet] = []
    for bench in dict.fromkeys(names):
        root = osp.abspath(resolve_benchmark_root(bench, data_root, data))
        if bench in CORRUPTION_BENCHMARKS:
            for corr, severities in scan_corruption_root(root, bench).items():
                for sev, folder in severities.items():
                    key = f'{bench}/{corr}/{sev}'
                    items = ([] if key in skip else limit_items(
                        scan_class_folders(folder, key), limit_per_set))
                    sets.append(EvalSet(key, bench, folder, True, corr, sev, items))
            continue
        subset = None
        allowed = None
        if bench in ('imagenet-a', 'imagenet-r'):
            allowed, subset = class_subset(bench)
        items = [] if bench in skip else scan_class_folders(root, bench, allowed)
        if subset is not None:  # labels: positions within the 200-class list
            position = {idx: pos for pos, idx in enumerate(subset)}
            items = [(p, position[label]) for p, label in items]
        sets.append(EvalSet(bench, bench, root, False, items=limit_items(items, limit_per_set),
                            class_indices=subset))
    return sets


# --- distributed ---------------------------------------------------------------------------
def _dist_setup(device: str) -> Tuple[int, int, torch.device]:
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if device == 'cuda':
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --- evaluation ----------------------------------------------------------------------------
def _fmt_s(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class _Progress:
    """Per-set tqdm bar with images/s, and a run-level ETA line after each set."""

    def __init__(self, enabled: bool, total_sets: int, total_images: int, world: int):
        self.enabled = enabled
        self.total_sets, self.total_images, self.world = total_sets, total_images, world
        self.done_sets = self.done_images = 0
        self.t0 = time.perf_counter()
        self.bar = None

    def start(self, name: str, images: int) -> None:
        if self.enabled:
            from tqdm import tqdm
            shard = f' (rank 0 of {self.world})' if self.world > 1 else ''
            self.bar = tqdm(total=images, desc=f'{name}{shard}', unit='img', leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self, name: str, images: int, top1: float) -> None:
        self.done_sets += 1
        self.done_images += images
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            rate = self.done_images / elapsed if elapsed > 0 else 0.0
            left = (self.total_images - self.done_images) / rate if rate > 0 else float('nan')
            eta = _fmt_s(left) if math.isfinite(left) else '?'
            print(f'[{self.done_sets}/{self.total_sets} sets] {name}: top-1 {top1:.2f}% on '
                  f'{images} images | elapsed {_fmt_s(elapsed)}, ~{eta} left '
                  f'({rate:.1f} img/s)', file=sys.stderr, flush=True)


def _evaluate(model: nn.Module, sets: List[EvalSet], cfg: EvalConfig, preprocessing: dict,
              rank: int, world: int, device: torch.device,
              on_set_done: Callable[[EvalSet, Dict[str, int], float], None]) -> None:
    """Evaluate this rank's shard of ``sets``; ``on_set_done`` gets the reduced counts."""
    import torch.distributed as dist
    from timm.data import create_transform

    items: List[Tuple[str, int, int]] = []
    ranges = []
    for i, s in enumerate(sets):
        start = len(items)
        items.extend((p, label, i) for p, label in s.items[rank::world])
        ranges.append((start, len(items)))
    ev = preprocessing['eval']
    transform = create_transform(input_size=ev['input_size'], interpolation=ev['interpolation'],
                                 mean=ev['mean'], std=ev['std'], crop_pct=ev['crop_pct'],
                                 crop_mode=ev.get('crop_mode'), is_training=False,
                                 use_prefetcher=True)  # -> uint8 tensor, normalised here
    dataset = _ImageList(items, [s.native for s in sets], transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_SetBatches(ranges, cfg.batch_size), num_workers=cfg.workers,
        collate_fn=_collate, pin_memory=device.type == 'cuda')
    norms = {}
    for kind in ('eval', 'native'):
        mean = torch.tensor(preprocessing[kind]['mean'], device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(preprocessing[kind]['std'], device=device).view(1, 3, 1, 1) * 255
        norms[kind] = (mean, std)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    subset_idx = {i: torch.tensor(s.class_indices, device=device)
                  for i, s in enumerate(sets) if s.class_indices is not None}
    progress = _Progress(cfg.progress and rank == 0, len(sets),
                         sum(len(s.items) for s in sets), world)

    counts = torch.zeros(4, dtype=torch.long)  # correct1, correct5, images, unreadable
    current = -1
    set_shapes: Dict[int, tuple] = {}  # set -> (image shape, its first image's path)
    t_set = time.perf_counter()

    def finish(upto: int) -> None:
        nonlocal current, counts, t_set
        while current < upto:
            if current >= 0:
                total = counts.clone()
                if world > 1:  # nccl reduces device tensors only
                    total = total.to(device)
                    dist.all_reduce(total)
                    total = total.cpu()
                c1, c5, n, bad = (int(v) for v in total)
                s = sets[current]
                if n == 0:  # nothing to score: no top-1 or error, and no record
                    raise DataLayoutError(f'{s.key}: none of its {bad} images could be read '
                                          f'({s.root})')
                progress.finish(s.key, n, 100.0 * c1 / max(n, 1))
                on_set_done(s, {'correct1': c1, 'correct5': c5, 'images': n,
                                'unreadable': bad}, time.perf_counter() - t_set)
                t_set = time.perf_counter()
            current += 1
            counts = torch.zeros(4, dtype=torch.long)
            if current < len(sets):
                s = sets[current]
                progress.start(s.key, len(s.items[rank::world]))

    with torch.inference_mode():
        for batch in loader:
            finish(batch['set_idx'])
            s = sets[current]
            if batch['error']:
                raise DataLayoutError(f'{s.key}: {batch["error"]}')
            for path, err in batch['bad']:
                if cfg.on_bad_image == 'fail':
                    raise BadImageError(f'{s.key}: unreadable image {path} ({err}); pass '
                                        '--on-bad-image skip to count and skip such images')
                warnings.warn(f'{s.key}: skipping unreadable image {path} ({err})')
            counts[3] += len(batch['bad'])
            images = batch['images']
            if images is None:
                continue
            # one size per set also across batches (_collate sees one batch)
            first = set_shapes.setdefault(current, (tuple(images.shape[1:]), batch['first']))
            if first[0] != tuple(images.shape[1:]):
                raise DataLayoutError(f'{s.key}: ' + _size_mismatch(
                    batch['first'], images.shape[1:], first[1], first[0]))
            mean, std = norms['native' if s.native else 'eval']
            x = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                logits = model(x)
            logits = logits.float()
            if current in subset_idx:
                logits = logits.index_select(1, subset_idx[current])
            labels = batch['labels'].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(labels[:, None])
            counts[0] += int(hits[:, 0].sum())
            counts[1] += int(hits.any(1).sum())
            counts[2] += len(labels)
            progress.update(len(labels) + len(batch['bad']))
    finish(len(sets))


# --- results -------------------------------------------------------------------------------
def _pct(num: int, den: int) -> Optional[float]:
    return 100.0 * num / den if den else None


def build_results(records: List[Tuple[str, dict]], meta: Dict[str, Any],
                  clean_top1: Optional[float] = None) -> Tuple[dict, List[dict]]:
    """Aggregate set records into ``results.json`` content and ``results.csv`` rows.

    Args:
        records: ``(key, record)`` pairs (records hold ``correct1``, ``correct5``,
            ``images``, ``unreadable``, ``benchmark``, ``corruption``, ``severity``).
        meta: top-level fields (model, checkpoint, preprocessing, versions, ...).
        clean_top1: clean top-1 (%) for the relative mCE when no ``imagenet`` record
            exists.

    Returns:
        ``(results dict, csv rows)``; percentages are 0-100.
    """
    by_bench: Dict[str, List[dict]] = {}
    rows = []
    for _, rec in records:
        by_bench.setdefault(rec['benchmark'], []).append(rec)
        top1 = _pct(rec['correct1'], rec['images'])
        rows.append({'benchmark': rec['benchmark'], 'corruption': rec.get('corruption') or '',
                     'severity': rec.get('severity') or '', 'images': rec['images'],
                     'top1': None if top1 is None else round(top1, 4),
                     'error': None if top1 is None else round(100 - top1, 4),
                     'unreadable': rec['unreadable']})
    benchmarks: Dict[str, dict] = {}
    clean_source = None
    if 'imagenet' in by_bench:
        rec = by_bench['imagenet'][0]
        clean_top1 = _pct(rec['correct1'], rec['images'])
        clean_source = 'imagenet (this output folder)'
    elif clean_top1 is not None:
        clean_source = '--clean-top1'
    for bench in BENCHMARKS:
        recs = by_bench.get(bench)
        if not recs:
            continue
        num = sum(r['images'] for r in recs)
        bad = sum(r['unreadable'] for r in recs)
        if bench in CORRUPTION_BENCHMARKS:
            errors: Dict[str, Dict[str, float]] = {}
            for r in sorted(recs, key=lambda r: r['severity']):
                errors.setdefault(r['corruption'], {})[str(r['severity'])] = \
                    100.0 - _pct(r['correct1'], r['images'])
            if bench == 'imagenet-c':
                summary = summarize_imagenet_c(
                    errors, None if clean_top1 is None else 100.0 - clean_top1)
                entry = {'mCE': summary['mCE'], 'relative_mCE': summary['relative_mCE'],
                         'CE': summary['CE'], 'relative_CE': summary['relative_CE'],
                         'extra': summary['extra'], 'errors': errors,
                         'incomplete': summary['incomplete'],
                         'clean_top1': clean_top1, 'clean_top1_source': clean_source}
            else:
                summary = summarize_imagenet_c_bar(errors)
                entry = {'mean_error': summary['mean_error'], 'errors': errors,
                         'incomplete': summary['incomplete']}
        else:
            r = recs[0]
            entry = {'top1': _pct(r['correct1'], r['images']),
                     'top5': _pct(r['correct5'], r['images'])}
        entry.update(num_images=num, unreadable=bad)
        benchmarks[bench] = entry
    return dict(meta, benchmarks=benchmarks), rows


def _versions() -> Dict[str, str]:
    import timm
    import torchvision

    from dcls_mm.version import __version__
    return {'dcls_mm': __version__, 'torch': torch.__version__,
            'torchvision': torchvision.__version__, 'timm': timm.__version__,
            'python': sys.version.split()[0]}


def _write_outputs(out_dir: str, results: dict, rows: List[dict], label: str) -> List[str]:
    from .plots import plot_severity_curves
    write_json_atomic(osp.join(out_dir, 'results.json'), results)
    write_csv_atomic(osp.join(out_dir, 'results.csv'), rows, CSV_COLUMNS)
    written = [osp.join(out_dir, 'results.json'), osp.join(out_dir, 'results.csv')]
    for bench in CORRUPTION_BENCHMARKS:
        entry = results['benchmarks'].get(bench)
        if entry and entry['errors']:
            path = osp.join(out_dir, f'{bench.replace("-", "_")}_errors.png')
            plot_severity_curves({label: entry['errors']}, path, 'top-1 error (%)',
                                 title=f'{bench}: {label}',
                                 note='native 224x224 (no resize/crop), model mean/std')
            written.append(path)
    return written


def run_evaluation(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.benchmarks``, resuming from ``cfg.out_dir``.

    Args:
        cfg: the run configuration.

    Returns:
        ``{"results": results.json content (rank 0; ``None`` on other ranks),
        "evaluated": keys of the sets evaluated now, "skipped": keys already recorded,
        "files": written files, "eval_seconds": wall time of the evaluation loop
        (data loader start included), "eval_images": images it read}``.

    Raises:
        DataLayoutError, CheckpointError, BadImageError,
        dcls_mm.evaluation.records.FingerprintMismatch: with a one-line message.
    """
    from .records import FingerprintMismatch
    if cfg.on_bad_image not in ('skip', 'fail'):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {cfg.on_bad_image!r}")
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    rank, world, device = _dist_setup(cfg.device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')

    model, ckpt_info = build_classifier(cfg.model, cfg.checkpoint, cfg.model_kwargs)
    preprocessing = resolve_preprocessing(model)
    fingerprint = {'model': cfg.model, 'model_kwargs': cfg.model_kwargs,
                   'checkpoint_sha256': ckpt_info.get('sha256'),
                   'checkpoint_entry': ckpt_info.get('entry'), 'init': ckpt_info.get('init'),
                   'preprocessing': preprocessing, 'limit_per_set': cfg.limit_per_set,
                   'amp': cfg.amp}

    # rank 0 owns the records; its verdict (done keys or an error) goes to every rank
    records = None
    verdict: Any
    if rank == 0:
        try:
            records = SetRecords(osp.join(cfg.out_dir, 'records.jsonl'), fingerprint)
            verdict = {k: r['root'] for k, r in records.items()}
        except FingerprintMismatch as e:
            verdict = ('error', str(e))
    else:
        verdict = None
    verdict = _broadcast(verdict, world)
    if isinstance(verdict, tuple):
        raise FingerprintMismatch(verdict[1])
    done: Dict[str, str] = verdict

    sets = discover_sets(cfg.benchmarks, cfg.data_root, cfg.data, cfg.limit_per_set,
                         skip=list(done))
    for s in sets:
        if s.key in done and osp.abspath(done[s.key]) != s.root:
            raise FingerprintMismatch(
                f'{cfg.out_dir}: set {s.key} was recorded from {done[s.key]}, now '
                f'{s.root}; use another --out-dir for other data')
    pending = [s for s in sets if s.key not in done]
    skipped = [s.key for s in sets if s.key in done]
    if rank == 0 and cfg.progress:
        print(f'{cfg.model}: {len(pending)} sets to evaluate '
              f'({sum(len(s.items) for s in pending)} images), {len(skipped)} already in '
              f'{osp.join(cfg.out_dir, "records.jsonl")}', file=sys.stderr, flush=True)

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def on_set_done(s: EvalSet, counts: Dict[str, int], seconds: float) -> None:
        if records is not None:
            records.add(s.key, dict(counts, benchmark=s.benchmark, corruption=s.corruption,
                                    severity=s.severity, root=s.root,
                                    seconds=round(seconds, 3)))

    t0 = time.perf_counter()
    _evaluate(model, pending, cfg, preprocessing, rank, world, device, on_set_done)
    eval_seconds = time.perf_counter() - t0

    out = {'results': None, 'evaluated': [s.key for s in pending], 'skipped': skipped,
           'files': [], 'eval_seconds': eval_seconds,
           'eval_images': sum(len(s.items) for s in pending)}
    if rank == 0:
        meta = {'model': cfg.model, 'model_kwargs': cfg.model_kwargs,
                'checkpoint': ckpt_info, 'preprocessing': {
                    'imagenet, imagenet-a, imagenet-r, imagenet-sketch':
                        dict(preprocessing['eval'], transform='timm eval transform with '
                             'the benchmarks\' geometry (resize shorter side to 256 = '
                             '224/0.875, bicubic, centre crop 224) and the model\'s mean/std'),
                    'imagenet-c, imagenet-c-bar':
                        dict(preprocessing['native'], transform='native size: no resize, '
                             'no crop')},
                'limit_per_set': cfg.limit_per_set, 'amp': cfg.amp,
                'device': str(device), 'world_size': world, 'versions': _versions(),
                'started': started,
                'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec='seconds')}
        results, rows = build_results(records.items(), meta, cfg.clean_top1)
        out['results'] = results
        out['files'] = _write_outputs(cfg.out_dir, results, rows, cfg.model)
    return out
