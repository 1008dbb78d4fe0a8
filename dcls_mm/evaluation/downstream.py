"""Robustness of detectors and segmentors to image corruptions (COCO-C, ADE20K-C, ...).

:func:`evaluate_downstream` builds an mmengine Runner ONCE from an mmdet or mmseg config
and a checkpoint, then evaluates the clean test set (severity 0) and every requested
corruption x severity with the config's own test metric (CocoMetric: box/mask AP;
IoUMetric: mIoU, ...). For each set only the test dataloader changes:

* on-the-fly: ``dict(type='dcls_mm.Corrupt', corruption=c, severity=s, seed=seed)`` is
  inserted right after ``LoadImageFromFile`` (corruption at full resolution, before any
  resize; per-image seeds, so the numbers do not depend on the number of processes);
* pre-generated (``corrupted_root``): the images are read from
  ``<corrupted_root>/<c>/<s>/`` (the layout ``tools/robustness/make_corrupted.py`` writes
  for the config's test image folder); annotations are untouched.

Every finished set is appended to ``<out>/records.jsonl`` (:class:`SetRecords`): a killed
run resumes at the next set. Results follow Michaelis et al. 2019, "Benchmarking
Robustness in Object Detection" (:func:`robustness_summary`): P = clean performance,
mPC = mean over corruptions of the mean over severities of the performance, rPC =
mPC / P, for every metric the evaluator reports, over the sets that RAN (a severity that
was not run is not counted as zero; ``covered`` says which sets the numbers include).

Under torchrun (``--launcher pytorch``) mmengine's sampler gives each process a shard of
the images and the evaluator computes the metric on the gathered predictions.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import os.path as osp
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .records import FingerprintMismatch, SetRecords, file_digest, write_csv_atomic, \
    write_json_atomic

__all__ = ['evaluate_downstream', 'robustness_summary', 'expand_corruptions',
           'check_severities', 'check_test_config', 'with_corruption', 'with_image_folder',
           'check_checkpoint_fits', 'CLEAN']

#: set key of the clean test set (severity 0)
CLEAN = 'clean'
SEVERITIES = (0, 1, 2, 3, 4, 5)
_LOADERS = ('LoadImageFromFile',)
_IMAGE_PREFIX_KEYS = ('img', 'img_path')  # mmdet's and mmseg's data_prefix image keys


def _set_key(corruption: Optional[str], severity: int) -> str:
    return CLEAN if severity == 0 else f'{corruption}/{severity}'


# --- arguments -------------------------------------------------------------------------------
def expand_corruptions(tokens: Sequence[str]) -> List[str]:
    """Corruption names from CLI tokens: subset names of
    :func:`dcls_mm.datasets.corruptions.corruption_names` (``benchmark``, ``all``,
    ``noise``, ...) expand to their members, other tokens must be corruption names.

    Args:
        tokens: subset and/or corruption names, e.g. ``['blur', 'snow']``.

    Returns:
        The names, first occurrence order, without repeats.

    Raises:
        ValueError: an unknown name, or no name at all.
    """
    from dcls_mm.datasets.corruptions import corruption_names
    known = list(corruption_names('all'))
    names: List[str] = []
    for token in tokens:
        if token in known:
            members = [token]
        else:
            try:
                members = list(corruption_names(token))
            except (ValueError, KeyError):
                raise ValueError(f'unknown corruption {token!r}; choose from '
                                 f'{", ".join(known)} or a subset (benchmark, extra, all, '
                                 'noise, blur, weather, digital)') from None
        names += [m for m in members if m not in names]
    if not names:
        raise ValueError('no corruption given')
    return names


def check_severities(severities: Sequence[int]) -> List[int]:
    """Sorted, unique severities; 0 is the clean set, 1..5 the corruption strengths.

    Args:
        severities: the requested severities.

    Raises:
        ValueError: a severity outside 0..5, or none at all.
    """
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f'severity {bad[0]!r} is outside 0..5 (0 = the clean set, 1..5 = '
                         'corruption strength)')
    if not severities:
        raise ValueError('no severity given')
    return sorted(set(int(s) for s in severities))


def check_test_config(cfg) -> None:
    """The config must describe a test run: ``test_dataloader``, ``test_evaluator`` and
    ``test_cfg`` (mmengine builds the test loop from all three).

    Args:
        cfg: an mmengine ``Config``.

    Raises:
        ValueError: naming the missing parts.
    """
    missing = [k for k in ('test_dataloader', 'test_evaluator', 'test_cfg')
               if cfg.get(k) is None]
    if missing:
        raise ValueError(f'{osp.basename(cfg.filename or "config")} has no '
                         f'{", ".join(missing)}: a robustness test needs a test set, metric '
                         'and loop (set them, e.g. test_dataloader = val_dataloader)')


# --- test data per set -----------------------------------------------------------------------
def _datasets(dataset_cfg: Mapping) -> List[Mapping]:
    """The leaf dataset configs (those with a pipeline) of a possibly wrapped dataset."""
    if 'pipeline' in dataset_cfg:
        return [dataset_cfg]
    if 'dataset' in dataset_cfg:
        return _datasets(dataset_cfg['dataset'])
    if 'datasets' in dataset_cfg:
        return [leaf for d in dataset_cfg['datasets'] for leaf in _datasets(d)]
    raise ValueError(f'test dataset {dataset_cfg.get("type")!r} has no pipeline')


def with_corruption(loader_cfg: Mapping, corruption: str, severity: int,
                    seed: int) -> Dict[str, Any]:
    """A copy of a test dataloader config that corrupts every image after loading.

    Args:
        loader_cfg: ``cfg.test_dataloader``.
        corruption: corruption name.
        severity: 1..5.
        seed: base seed of :class:`dcls_mm.datasets.Corrupt` (per-image seeds derive
            from it).

    Returns:
        The new dataloader config (``loader_cfg`` is unchanged).

    Raises:
        ValueError: a pipeline without ``LoadImageFromFile``.
    """
    out = copy.deepcopy(dict(loader_cfg))
    for dataset in _datasets(out['dataset']):
        pipeline = list(dataset['pipeline'])
        index = next((i for i, t in enumerate(pipeline)
                      if str(t.get('type', '')).split('.')[-1] in _LOADERS), None)
        if index is None:
            raise ValueError('the test pipeline has no LoadImageFromFile to insert the '
                             'corruption after')
        pipeline.insert(index + 1, dict(type='dcls_mm.Corrupt', corruption=corruption,
                                        severity=severity, seed=seed))
        dataset['pipeline'] = pipeline
    return out


def with_image_folder(loader_cfg: Mapping, folder: str) -> Dict[str, Any]:
    """A copy of a test dataloader config that reads its images from ``folder``
    (absolute, so mmengine does not join it with ``data_root``); annotations unchanged.

    Args:
        loader_cfg: ``cfg.test_dataloader``.
        folder: the folder that replaces the image prefix (``data_prefix.img`` for
            mmdet, ``data_prefix.img_path`` for mmseg).

    Raises:
        ValueError: the dataset config names no image prefix.
    """
    out = copy.deepcopy(dict(loader_cfg))
    for dataset in _datasets(out['dataset']):
        prefix = dict(dataset.get('data_prefix') or {})
        keys = [k for k in _IMAGE_PREFIX_KEYS if k in prefix]
        if not keys:
            raise ValueError('--corrupted-root: the test dataset has no data_prefix.img '
                             '(mmdet) or data_prefix.img_path (mmseg) to redirect')
        prefix[keys[0]] = osp.abspath(folder) + os.sep
        dataset['data_prefix'] = prefix
    return out


def image_folder(cfg) -> str:
    """The config's test image folder (``data_root`` joined with the image prefix): the
    SRC to give ``make_corrupted.py`` for ``--corrupted-root``."""
    dataset = _datasets(cfg.test_dataloader['dataset'])[0]
    prefix = dataset.get('data_prefix') or {}
    key = next((k for k in _IMAGE_PREFIX_KEYS if k in prefix), None)
    return osp.join(dataset.get('data_root') or '', prefix[key] if key else '')


# --- checkpoint ------------------------------------------------------------------------------
def check_checkpoint_fits(model, checkpoint: str) -> None:
    """Refuse a checkpoint whose weights do not match the model (mmengine would only warn
    and evaluate a partly random model).

    Args:
        model: the built model (unwrapped or wrapped).
        checkpoint: path of a ``{'state_dict': ...}`` or bare state-dict file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing / unexpected keys or shape mismatches (counts and examples).
    """
    from mmengine.model import is_model_wrapper
    from mmengine.runner.checkpoint import CheckpointLoader
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')
    if is_model_wrapper(model):
        model = model.module
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'checkpoint {checkpoint} holds no state dict')
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}' for k, v in own.items()
              if k in state and hasattr(state[k], 'shape') and
              tuple(state[k].shape) != tuple(v.shape)]
    problems = [f'{len(items)} {what} (e.g. {items[0]})' for what, items in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatches', shapes)) if items]
    if problems:
        raise ValueError(f'checkpoint {checkpoint} does not fit the model: '
                         f'{"; ".join(problems)}')


# --- aggregation -----------------------------------------------------------------------------
def robustness_summary(clean: Optional[Mapping[str, float]],
                       per_set: Mapping[str, Mapping[Any, Mapping[str, float]]]
                       ) -> Dict[str, Dict[str, Optional[float]]]:
    """P, mPC and rPC (Michaelis et al. 2019) of every metric, over the sets that ran.

    P = the clean score; mPC = mean over the benchmark corruptions c (the 15) of the mean
    over the severities s that ran for c of the score P_{c,s}; rPC = mPC / P; the 4 extra
    corruptions, when they ran, go to ``mPC_extra`` only (as the extra ImageNet-C
    corruptions stay out of mCE). A corruption without any result for a metric does not
    enter that metric's mPC; P is ``None`` without a clean result, rPC is ``None`` when P
    is missing or zero.

    Args:
        clean: ``{metric: value}`` of the clean set, or ``None``.
        per_set: ``{corruption: {severity: {metric: value}}}`` (severities 1..5, ints or
            strings).

    Returns:
        ``{metric: {'P': float|None, 'mPC': float|None, 'rPC': float|None}}`` (and
        ``'mPC_extra'`` when extra corruptions ran), metrics in first-seen order (clean
        first).
    """
    from dcls_mm.datasets.corruptions import corruption_names
    extra = set(corruption_names('extra'))
    names: Dict[str, None] = dict.fromkeys(clean or {})
    for severities in per_set.values():
        for values in severities.values():
            names.update(dict.fromkeys(values))

    def mean_over(corruptions, name):
        means = []
        for corruption in corruptions:
            values = [v[name] for v in per_set[corruption].values() if name in v]
            if values:
                means.append(sum(values) / len(values))
        return sum(means) / len(means) if means else None

    summary = {}
    for name in names:
        p = (clean or {}).get(name)
        mpc = mean_over([c for c in per_set if c not in extra], name)
        rpc = mpc / p if (mpc is not None and p) else None
        summary[name] = dict(P=p, mPC=mpc, rPC=rpc)
        if extra & set(per_set):
            summary[name]['mPC_extra'] = mean_over([c for c in per_set if c in extra], name)
    return summary


def _numeric(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """The defined numbers among an evaluator's outputs: mmdet adds copy-paste strings,
    and pycocotools reports -1 for an area range without ground truth (e.g. no large
    objects), which is "undefined", not a score to average."""
    out = {}
    for k, v in metrics.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value != -1.0:
            out[k] = value
    return out


# --- the run ---------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _versions(scope: str) -> Dict[str, str]:
    import importlib

    import torch
    versions = {'torch': torch.__version__}
    for name in ('mmengine', 'mmcv', {'mmdet': 'mmdet', 'mmseg': 'mmseg'}.get(scope, scope),
                 'dcls_mm'):
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            pass
    return versions


def _progress_hook():
    """A Hook drawing one tqdm bar per set (images/s) on rank 0."""
    from mmengine.dist import get_rank
    from mmengine.hooks import Hook
    from tqdm import tqdm

    class SetProgress(Hook):
        priority = 'VERY_LOW'

        def __init__(self):
            self.bar = None

        def start(self, total: int, desc: str) -> None:
            self.bar = tqdm(total=total, desc=desc, unit='img', leave=False, dynamic_ncols=True,
                            disable=get_rank() != 0)

        def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if self.bar is not None:
                self.bar.update(len(outputs) if outputs is not None else 1)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return SetProgress()


def _plan(corruptions: Sequence[str], severities: Sequence[int]) -> List[Tuple[Optional[str], int]]:
    sets: List[Tuple[Optional[str], int]] = [(None, 0)] if 0 in severities else []
    return sets + [(c, s) for c in corruptions for s in severities if s > 0]


def evaluate_downstream(cfg, checkpoint: str, out_dir: str, corruptions: Sequence[str],
                        severities: Sequence[int] = SEVERITIES,
                        corrupted_root: Optional[str] = None, seed: int = 0,
                        label: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate a detector/segmentor on the clean and corrupted test sets (resumable).

    Args:
        cfg: mmengine ``Config`` of an mmdet or mmseg model (``default_scope`` decides),
            with ``launcher`` and ``work_dir`` set (see ``dcls_mm.engine.runner_utils``);
            changed in place (distributed set-up on CPU).
        checkpoint: weights to evaluate (must fit the model).
        out_dir: ``records.jsonl``, ``results.json``, ``results.csv`` and
            ``plots/<metric>.png`` go here; an existing ``records.jsonl`` of the same run
            (same fingerprint) is resumed.
        corruptions: corruption names or subsets (see :func:`expand_corruptions`).
        severities: any of 0..5; 0 is the clean set.
        corrupted_root: read corrupted images from ``<corrupted_root>/<c>/<s>/`` instead
            of corrupting on the fly.
        seed: base seed of the on-the-fly corruption (per-image seeds derive from it).
        label: model name in the plots (default: the config's file name).

    Returns:
        The results (as written to ``results.json``) plus ``evaluated``: the set keys
        evaluated by this call (the others came from ``records.jsonl``). Ranks other
        than 0 return ``{'evaluated': [...]}`` only.

    Raises:
        ValueError: bad corruption/severity, config without test set, checkpoint that
            does not fit, missing pre-generated folder (one-line messages).
        FingerprintMismatch: ``out_dir`` holds results of a different run.
    """
    from mmengine.dist import broadcast_object_list, get_dist_info

    from dcls_mm.engine.runner_utils import build_runner, setup_dcls_mm

    names = expand_corruptions(corruptions)
    severities = check_severities(severities)
    check_test_config(cfg)
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')
    plan = _plan(names, severities)
    if corrupted_root is not None:
        absent = [f'{c}/{s}' for c, s in plan if s and
                  not osp.isdir(osp.join(corrupted_root, c, str(s)))]
        if absent:
            raise ValueError(f'--corrupted-root {corrupted_root} lacks {len(absent)} set '
                             f'folder(s), e.g. {absent[0]}/ (make_corrupted.py SRC '
                             f'{corrupted_root} with SRC = {image_folder(cfg)})')
    # Fingerprint BEFORE the distributed set-up edits the model (SyncBN -> BN on CPU):
    # a run may resume with another number of processes.
    fingerprint = dict(
        tool='test_downstream', config=osp.basename(cfg.filename or ''),
        model=_digest(cfg.model), test_dataloader=_digest(cfg.test_dataloader),
        test_evaluator=_digest(cfg.test_evaluator), test_cfg=_digest(cfg.test_cfg),
        checkpoint_sha256=file_digest(checkpoint), seed=seed,
        images=osp.abspath(corrupted_root) if corrupted_root else 'corrupted on the fly')
    scope = cfg.get('default_scope')
    test_loader, test_cfg = copy.deepcopy(cfg.test_dataloader), dict(cfg.test_cfg)
    cfg.load_from = None  # loaded below, after the fit check
    setup_dcls_mm(cfg)
    runner = build_runner(cfg)
    rank, world = get_dist_info()

    records, error, done = None, None, []
    if rank == 0:
        try:
            records = SetRecords(osp.join(out_dir, 'records.jsonl'), fingerprint)
            done = [k for k, _ in records.items()]
        except FingerprintMismatch as e:
            error = str(e)
    shared = [done, error]
    broadcast_object_list(shared)  # every rank skips the same sets (or stops together)
    done, error = shared
    if error:
        raise FingerprintMismatch(error)

    check_checkpoint_fits(runner.model, checkpoint)
    runner.load_checkpoint(checkpoint, map_location='cpu', strict=True)
    evaluator = runner.build_evaluator(cfg.test_evaluator)
    progress = _progress_hook()
    runner.register_hook(progress)
    from tqdm import tqdm

    todo = [(c, s) for c, s in plan if _set_key(c, s) not in done]
    evaluated, t_run, clean_count = [], time.perf_counter(), None
    # Runner.test() per set, with its run-level hooks called once for the whole run
    # (LoggerHook.after_run closes the visualizer's backends)
    runner.call_hook('before_run')
    for i, (corruption, severity) in enumerate(todo):
        key = _set_key(corruption, severity)
        if severity == 0:
            loader = test_loader
        elif corrupted_root is not None:
            loader = with_image_folder(test_loader,
                                       osp.join(corrupted_root, corruption, str(severity)))
        else:
            loader = with_corruption(test_loader, corruption, severity, seed)
        # mmengine 0.10 builds the test loop from these attributes (Runner.build_test_loop)
        runner._test_dataloader = loader
        runner._test_evaluator = evaluator
        runner._test_loop = runner.build_test_loop(copy.deepcopy(test_cfg))
        num_images = len(runner.test_loop.dataloader.dataset)
        if severity and corrupted_root is not None:
            # mmseg lists a folder's images: a missing one (a killed make_corrupted run)
            # would shrink the set, not fail it
            if clean_count is None:
                clean_count = len(runner.build_dataloader(copy.deepcopy(test_loader)).dataset)
            if num_images != clean_count:
                raise ValueError(f'{osp.join(corrupted_root, corruption, str(severity))} holds '
                                 f'{num_images} images, the clean test set {clean_count}: '
                                 f'run make_corrupted.py SRC {corrupted_root} again to '
                                 f'complete it (it resumes)')
        progress.start(len(runner.test_loop.dataloader.sampler), key)
        t0 = time.perf_counter()
        try:
            metrics = _numeric(runner.test_loop.run())
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        if rank == 0:
            records.add(key, dict(corruption=corruption, severity=severity, metrics=metrics,
                                  num_images=num_images, seconds=round(seconds, 2),
                                  processes=world))
            elapsed = time.perf_counter() - t_run
            left = elapsed / (i + 1) * (len(todo) - i - 1)
            tqdm.write(f'[{len(done) + i + 1}/{len(plan)} sets] {key}: {num_images} images '
                       f'in {seconds:.1f} s; elapsed {datetime.timedelta(seconds=int(elapsed))}'
                       f', ETA {datetime.timedelta(seconds=int(left))}')
        evaluated.append(key)
    runner.call_hook('after_run')
    if rank != 0:
        return dict(evaluated=evaluated)

    results = _results(records, plan, cfg, checkpoint, fingerprint, scope)
    _write_outputs(results, out_dir, label or osp.splitext(fingerprint['config'])[0])
    return dict(results, evaluated=evaluated)


def _results(records: SetRecords, plan, cfg, checkpoint: str, fingerprint: dict,
             scope: str) -> Dict[str, Any]:
    """results.json's content for the planned sets (all finished)."""
    clean, per_set, covered, sets = None, {}, {}, {}
    for corruption, severity in plan:
        key = _set_key(corruption, severity)
        record = records.get(key)
        sets[key] = dict(num_images=record['num_images'], seconds=record['seconds'])
        if severity == 0:
            clean = record['metrics']
        else:
            per_set.setdefault(corruption, {})[str(severity)] = record['metrics']
            covered.setdefault(corruption, []).append(severity)
    return dict(
        config=cfg.filename, checkpoint=osp.abspath(checkpoint),
        checkpoint_sha256=fingerprint['checkpoint_sha256'], images=fingerprint['images'],
        seed=fingerprint['seed'], metrics=robustness_summary(clean, per_set), clean=clean,
        per_set=per_set, covered=covered, sets=sets,
        definitions=dict(
            P='score on the clean test set (severity 0)',
            mPC='mean over the covered benchmark corruptions (the 15 of Michaelis et '
                'al. 2019) of the mean over their covered severities (1..5) of the score',
            mPC_extra='the same over the 4 extra corruptions (speckle_noise, '
                      'gaussian_blur, spatter, saturate), when they ran; not in rPC',
            rPC='mPC / P'),
        versions=_versions(scope),
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def _write_outputs(results: Dict[str, Any], out_dir: str, label: str) -> None:
    from .plots import plot_severity_curves
    write_json_atomic(osp.join(out_dir, 'results.json'), results)
    names = list(results['metrics'])
    rows = []
    if results['clean'] is not None:
        rows.append(dict(corruption=CLEAN, severity=0, **results['clean']))
    for corruption, severities in results['per_set'].items():
        for severity, metrics in severities.items():
            rows.append(dict(corruption=corruption, severity=int(severity), **metrics))
    write_csv_atomic(osp.join(out_dir, 'results.csv'), rows, ['corruption', 'severity'] + names)
    clean = results['clean'] or {}
    for name in names:
        curves = {corruption: {**({0: clean[name]} if name in clean else {}),
                               **{int(s): m[name] for s, m in severities.items() if name in m}}
                  for corruption, severities in results['per_set'].items()}
        if not any(curves.values()):
            continue  # clean set only: nothing to draw against severity
        plot_severity_curves({label: curves}, osp.join(out_dir, 'plots', _file_name(name) + '.png'),
                             ylabel=name, title=name,
                             note='severity 0 = clean; ' + results['images'])


def _file_name(metric: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.@-]+', '_', metric)
