"""Training and inference step of Cascade Mask R-CNN and UperNet: ConvNeXt-T-dcls vs ConvNeXt-T.

Both models of a task are built from the recipe config files (``configs/cascade_mask_rcnn``,
``configs/upernet``) through the mmdet / mmseg registries, with random initialisation (no
checkpoint is read), SyncBN reverted to BN (one CPU process), in float32. The DCLS
positions are drawn over the whole dilated kernel (:func:`dcls_mm.utils.spread_positions`):
these recipes fine-tune an ImageNet-trained backbone, whose positions are spread, and
freshly initialised ones (near the centre) would let the layers convolve with only a
few taps. Inputs have the
real sizes: detection one 800x1333 image with 10 random boxes and masks (mmdet's
``demo_mm_inputs``), segmentation two 512x512 images with random ADE20K labels. Each
step goes through the model's own data preprocessor:

- training step: ``model(**data, mode='loss')``, the summed losses, ``backward()``;
- inference step: ``model(**data, mode='predict')`` under ``torch.no_grad()`` (the
  detector's predictions include its masks at the image size).

Times are medians of interleaved repeats after a warm-up; every number is a ratio
against ConvNeXt-T measured in the same run; peak memory of the training step (tensor
allocations, :func:`dcls_mm.utils.peak_memory_mib`). The header prints the CPU
capability, and the routes each DCLS layer ran are printed per stage. Targets (issue
13): training step <= 1.15x, inference <= 1.1x.

Example::

    python tools/analysis/benchmark_downstream.py --out work_dirs/bench_downstream.json
    python tools/analysis/benchmark_downstream.py --tasks segmentation --interpolations gaussian
"""
from __future__ import annotations

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

import argparse
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from dcls_mm.utils import (DclsRouteRecorder, machine_info, machine_line, peak_memory_mib,
                           spread_positions, time_fns, write_json)

ROOT = Path(__file__).resolve().parents[2]
TASKS = OrderedDict(
    detection=dict(
        scope='mmdet', batch=1, size=(800, 1333),
        dense='configs/cascade_mask_rcnn/cascade-mask-rcnn_convnext-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
        dcls='configs/cascade_mask_rcnn/cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'),
    segmentation=dict(
        scope='mmseg', batch=2, size=(512, 512),
        dense='configs/upernet/upernet_convnext-t_8xb2-amp-160k_ade20k-512x512.py',
        dcls='configs/upernet/upernet_convnext-dcls-t_8xb2-amp-160k_ade20k-512x512.py'),
)
#: interpolation -> (dilated kernel size, kernel count), as benchmark_convnext_dcls.py
VARIANTS = OrderedDict(bilinear=(17, 34), gaussian=(23, 26), triangle=(23, 26))


def build_model(config: str, scope: str, interpolation: str = 'bilinear', size=None):
    """Model of a recipe config, randomly initialised, BN instead of SyncBN, train mode.

    Args:
        config: config path relative to the repository root.
        scope: ``'mmdet'`` or ``'mmseg'`` (whose registry builds it).
        interpolation: for DCLS backbones, the interpolation (with its dks and K).
        size: ``(H, W)`` the data preprocessor pads to instead of the recipe's crop
            (segmentation; only to check the script quickly at a tiny size).
    """
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    import dcls_mm.models  # noqa: F401  (dcls_mm.* registry entries)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(str(ROOT / config))
    cfg.model.backbone.init_cfg = None
    if size is not None and cfg.model.data_preprocessor.get('size') is not None:
        cfg.model.data_preprocessor.size = tuple(size)
    if cfg.model.backbone.get('dwconv_type') == 'dcls':
        dks, count = VARIANTS[interpolation]
        cfg.model.backbone.update(interpolation=interpolation, dilated_kernel_size=dks,
                                  kernel_count=count)
    # the current default scope decides which registry builds: make it this task's
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter at INFO
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return spread_positions(revert_sync_batchnorm(model)).train()


def make_batch(task: str, size=None, seed: int = 0) -> dict:
    """Packed inputs (uint8 images + data samples), by default of the task's real size.

    Args:
        task: ``'detection'`` or ``'segmentation'``.
        size: ``(H, W)`` instead of the real size (smoke tests).
        seed: random seed of the images and annotations.
    """
    spec = TASKS[task]
    h, w = size or spec['size']
    torch.manual_seed(seed)
    if task == 'detection':
        import numpy as np
        from mmdet.testing import demo_mm_inputs
        np.random.seed(seed)
        return demo_mm_inputs(batch_size=spec['batch'], image_shapes=[(3, h, w)] * spec['batch'],
                              num_items=[10] * spec['batch'], num_classes=80, with_mask=True)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(spec['batch']):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def steps(model, batch: dict):
    """``(training step, inference step)`` closures for one model and packed batch."""
    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()

    def infer():
        model.eval()
        with torch.no_grad():
            model(**model.data_preprocessor(batch, False), mode='predict')
    return train, infer


def run_task(task: str, args) -> dict:
    spec = TASKS[task]
    models = OrderedDict(convnext_t=build_model(spec['dense'], spec['scope'], size=args.image_size))
    for interp in args.interpolations:
        models[f'convnext_dcls_t_{interp}'] = build_model(spec['dcls'], spec['scope'], interp,
                                                          args.image_size)
    h, w = args.image_size or spec['size']
    batch = make_batch(task, (h, w))
    print(f'\n[{task}] {type(models["convnext_t"]).__name__}, batch {spec["batch"]} x {h}x{w}, '
          f'{args.repeats} repeats (ms; ratio vs ConvNeXt-T)', flush=True)
    names = list(models)
    recorders = {n: DclsRouteRecorder(models[n]) for n in names[1:]}
    closures = {n: steps(models[n], batch) for n in names}
    train_s = time_fns([closures[n][0] for n in names], 'cpu', args.repeats, args.warmup)
    infer_s = time_fns([closures[n][1] for n in names], 'cpu', args.repeats, args.warmup)
    result = OrderedDict()
    for name, t_train, t_infer in zip(names, train_s, infer_s):
        entry = dict(train_ms=1e3 * t_train, infer_ms=1e3 * t_infer)
        if not args.skip_memory:
            entry['train_peak_mib'] = peak_memory_mib(closures[name][0])
            models[name].zero_grad(set_to_none=True)
        if name in recorders:
            entry['routes'] = recorders[name].report()
        result[name] = entry
    base = result['convnext_t']
    print(f'{"model":26} {"train ms":>10} {"infer ms":>10} {"train peak MiB":>15}')
    for name, e in result.items():
        print(f'{name:26} {e["train_ms"]:10.0f} {e["infer_ms"]:10.0f} '
              f'{e.get("train_peak_mib", float("nan")):15.0f}')
    ratios = OrderedDict()
    for name in names[1:]:
        e = result[name]
        r = dict(train=e['train_ms'] / base['train_ms'], infer=e['infer_ms'] / base['infer_ms'])
        if 'train_peak_mib' in e:
            r['memory'] = e['train_peak_mib'] / base['train_peak_mib']
        ratios[name] = r
        mem = f', training peak memory {r["memory"]:.2f}x' if 'memory' in r else ''
        print(f'ratios {name}/convnext_t: training step {r["train"]:.2f}x (target <= 1.15), '
              f'inference {r["infer"]:.2f}x (target <= 1.1){mem}')
        print(f'routes {name}: {DclsRouteRecorder.summary(e["routes"])}')
    return dict(batch=spec['batch'], size=[h, w], configs=[spec['dense'], spec['dcls']],
                models=result, ratios=ratios)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    parser.add_argument('--interpolations', nargs='+', default=['bilinear'],
                        choices=list(VARIANTS), help='DCLS backbones to compare (default: the '
                        'recipe configs\' bilinear one)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='instead of the real sizes (only to check the script quickly)')
    parser.add_argument('--skip-memory', action='store_true',
                        help='skip the peak-memory measurement (one profiled step per model)')
    parser.add_argument('--out', help='write results as JSON to this file')
    args = parser.parse_args(argv)
    info = machine_info()
    print(f'device=cpu {machine_line(info)}', flush=True)
    results = dict(device='cpu', **info)
    for task in args.tasks:
        results[task] = run_task(task, args)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == '__main__':
    main()
