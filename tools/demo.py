"""dcls-mm demo on built-in data, CPU friendly (about half a minute on 2 cores).

    bash tools/demo.sh            # sets up .venv if needed, then runs this file
    python tools/demo.py [--work-dir work_dirs/demo] [--skip-det] [--skip-seg] [--skip-coco-c]
        [--skip-robustness]

Steps:
  1. a DCLS layer: how ``Dcls2d`` turns K weights + learned positions into a dense
     dilated kernel;
  2. a tiny ConvNeXt-dcls backbone: forward/backward, gradients reach the positions;
  3. COCO-format demo data -> a tiny Cascade Mask R-CNN (configs/demo) trained for a few
     iterations, then one validation pass with the real CocoMetric (bbox/segm AP);
  4. ADE20K-format demo data -> a tiny UperNet (configs/demo), same, IoUMetric (mIoU);
  5. COCO-C: the detector of step 3 on its clean val set and with gaussian noise at
     severity 3 (dcls_mm.evaluation.downstream, as tools/robustness/test_downstream.py);
  6. ImageNet-C: ConvNeXt-dcls-atto vs dense ConvNeXt-atto (random weights) on a tiny
     generated ImageNet-C-layout set, mCE table (as tools/robustness/evaluate.py and
     compare.py; skip with --skip-robustness).

After a few iterations on toy data the AP / mIoU values are near zero or noisy; they
show that the real training and evaluation pipelines run end to end, not accuracy.
A summary is printed and written to ``<work-dir>/summary.json``. Re-running is safe:
the data are reused when unchanged and each run's training folders are replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import shutil
import sys
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(ROOT, 'configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py')
SEG_CONFIG = osp.join(ROOT, 'configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py')


def banner(text: str) -> None:
    print(f'\n=== {text} ' + '=' * max(0, 70 - len(text)), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'),
                        help='data, logs, checkpoints and summary.json go here')
    parser.add_argument('--skip-det', action='store_true', help='skip Cascade Mask R-CNN')
    parser.add_argument('--skip-seg', action='store_true', help='skip UperNet')
    parser.add_argument('--skip-coco-c', action='store_true',
                        help='skip the COCO-C step (also skipped with --skip-det)')
    parser.add_argument('--skip-robustness', action='store_true',
                        help='skip the ImageNet-C classifier step')
    parser.add_argument('--num-images', type=int, default=8,
                        help='training images per demo data set; Cascade Mask R-CNN '
                        'trains one epoch of batch 2 (this / 2 iterations), UperNet a '
                        'fixed 4 iterations (its config)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: torch decides)')
    return parser.parse_args(argv)


# --- 1. one DCLS layer --------------------------------------------------------------------
def demo_layer() -> dict:
    import torch

    from dcls_mm.ops import Dcls2d
    banner('1. A DCLS layer (Dcls2d, depthwise, bilinear interpolation)')
    torch.manual_seed(0)
    channels, count, dks = 8, 4, 9
    layer = Dcls2d(channels, channels, kernel_count=count, dilated_kernel_size=dks,
                   padding=dks // 2, groups=channels, version='bilinear')
    print(layer)
    kernel = layer.construct_kernel()
    nonzero = (kernel.detach().abs() > 0).flatten(1).sum(1)
    x = torch.randn(1, channels, 32, 32)
    y = layer(x)
    y.square().mean().backward()
    info = dict(
        weight=list(layer.weight.shape), positions=list(layer.P.shape),
        kernel=list(kernel.shape), nonzero_per_channel_max=int(nonzero.max()),
        output=list(y.shape), position_grad_norm=float(layer.P.grad.norm()))
    print(f'  weight {info["weight"]} (K={count} elements per channel) and positions '
          f'{info["positions"]} (height/width, learned, continuous)')
    print(f'  -> dense kernel {info["kernel"]}: each of the K elements is spread bilinearly '
          f'over <= 4 cells: {info["nonzero_per_channel_max"]} non-zeros of {dks * dks} '
          '(max over channels)')
    print(f'  forward {list(x.shape)} -> {info["output"]}; |dL/dP| = '
          f'{info["position_grad_norm"]:.3g} (positions are trained by backprop)')
    return info


# --- 2. the backbone -------------------------------------------------------------------------
def demo_backbone() -> dict:
    import torch

    from dcls_mm.models import ConvNeXtDCLS
    banner('2. ConvNeXt-dcls backbone (arch atto, dilated kernel 9): forward / backward')
    torch.manual_seed(0)
    model = ConvNeXtDCLS(arch='atto', dilated_kernel_size=9, drop_path_rate=0.1)
    dense = ConvNeXtDCLS(arch='atto', dwconv='dense')
    n_params = sum(p.numel() for p in model.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    x = torch.randn(2, 3, 64, 64)
    t0 = time.perf_counter()
    outs = model(x)
    sum(o.mean() for o in outs).backward()
    elapsed = time.perf_counter() - t0
    p_grads = [float(p.grad.norm()) for n, p in model.named_parameters() if n.endswith('.P')]
    info = dict(kernel_count=model.kernel_count, params=n_params, dense_params=n_dense,
                out_shapes=[list(o.shape) for o in outs], fwd_bwd_s=round(elapsed, 3),
                position_tensors=len(p_grads),
                positions_with_grad=sum(g > 0 for g in p_grads))
    print(f'  K={model.kernel_count} per channel: {n_params / 1e6:.2f} M parameters '
          f'(dense 7x7 ConvNeXt-atto: {n_dense / 1e6:.2f} M)')
    print(f'  input {list(x.shape)} -> outputs {info["out_shapes"]}')
    print(f'  forward + backward {elapsed:.2f} s; {info["positions_with_grad"]}/'
          f'{len(p_grads)} shared position tensors received gradients')
    return info


# --- 3./4. downstream ------------------------------------------------------------------------
def _run_downstream(config: str, work_dir: str, data_overrides: dict) -> dict:
    """Train ``config`` briefly (its own train_cfg) and return the validation metrics."""
    from mmengine.config import Config
    from mmengine.hooks import Hook

    from dcls_mm.engine.runner_utils import build_runner, setup_dcls_mm

    class Recorder(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.losses, self.metrics = [], {}

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and 'loss' in outputs:
                self.losses.append(float(outputs['loss']))

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = {k: float(v) for k, v in (metrics or {}).items()}

    cfg = Config.fromfile(config)
    cfg.merge_from_dict(data_overrides)
    if osp.isdir(work_dir):  # our own folder from an earlier run: start afresh
        shutil.rmtree(work_dir)
    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    setup_dcls_mm(cfg)
    runner = build_runner(cfg)
    recorder = Recorder()
    runner.register_hook(recorder)
    t0 = time.perf_counter()
    runner.train()
    return dict(train_and_val_s=round(time.perf_counter() - t0, 1), losses=recorder.losses,
                metrics=recorder.metrics, work_dir=work_dir)


def demo_det(work_dir: str, num_images: int) -> dict:
    from dcls_mm.datasets import make_coco_demo
    banner('3. Cascade Mask R-CNN + ConvNeXt-dcls-atto on COCO-format demo data')
    data = make_coco_demo(osp.join(work_dir, 'data', 'coco'), num_images=num_images,
                          num_val_images=4)
    root = data['data_root'].rstrip('/') + '/'
    print(f'  data: {root} ({num_images} train / 4 val images, COCO json + JPEG)')
    overrides = {
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root,
        'test_dataloader.dataset.data_root': root,
        'val_evaluator.ann_file': root + data['val_ann'],
        'test_evaluator.ann_file': root + data['val_ann'],
        'log_level': 'WARNING',
    }
    result = _run_downstream(DET_CONFIG, osp.join(work_dir, 'det'), overrides)
    m = result['metrics']
    print(f'  trained {len(result["losses"])} iterations, loss {result["losses"][0]:.3f} -> '
          f'{result["losses"][-1]:.3f}; CocoMetric: bbox AP {m.get("coco/bbox_mAP", float("nan")):.3f}'
          f', segm AP {m.get("coco/segm_mAP", float("nan")):.3f} ({result["train_and_val_s"]} s)')
    return result


def demo_seg(work_dir: str, num_images: int) -> dict:
    from dcls_mm.datasets import make_ade20k_demo
    banner('4. UperNet + ConvNeXt-dcls-atto on ADE20K-format demo data')
    data = make_ade20k_demo(osp.join(work_dir, 'data', 'ade'), num_images=num_images,
                            num_val_images=4)
    root = data['data_root']
    print(f'  data: {root} ({num_images} train / 4 val images, JPEG + label PNG)')
    overrides = {
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root,
        'test_dataloader.dataset.data_root': root,
        'log_level': 'WARNING',
    }
    result = _run_downstream(SEG_CONFIG, osp.join(work_dir, 'seg'), overrides)
    m = result['metrics']
    print(f'  trained {len(result["losses"])} iterations, loss {result["losses"][0]:.3f} -> '
          f'{result["losses"][-1]:.3f}; IoUMetric: mIoU {m.get("mIoU", float("nan")):.2f}, '
          f'aAcc {m.get("aAcc", float("nan")):.2f} ({result["train_and_val_s"]} s)')
    return result


# --- 5. COCO-C ------------------------------------------------------------------------------
def demo_coco_c(work_dir: str, det: dict, corruption: str = 'gaussian_noise',
                severity: int = 3) -> dict:
    """Evaluate step 3's checkpoint on the clean and one corrupted COCO val set.

    Args:
        work_dir: the demo folder (data under ``data/coco``, results under ``coco-c``).
        det: the result of :func:`demo_det` (its work dir holds the checkpoint).
        corruption: corruption name.
        severity: 1..5.

    Returns:
        P, mPC and rPC of every CocoMetric value, and the per-set table.
    """
    from mmengine.config import Config

    from dcls_mm.evaluation.downstream import evaluate_downstream
    banner(f'5. COCO-C: the detector of step 3 under {corruption}, severity {severity}')
    root = osp.join(work_dir, 'data', 'coco') + '/'
    checkpoint = osp.join(det['work_dir'], 'epoch_1.pth')
    out_dir = osp.join(work_dir, 'coco-c')
    if osp.isdir(out_dir):  # a new checkpoint each run: start afresh
        shutil.rmtree(out_dir)
    cfg = Config.fromfile(DET_CONFIG)
    cfg.merge_from_dict({'test_dataloader.dataset.data_root': root,
                         'test_evaluator.ann_file': root + 'annotations/instances_val2017.json',
                         'log_level': 'WARNING'})
    cfg.work_dir = osp.join(out_dir, 'runner')
    cfg.launcher = 'none'
    t0 = time.perf_counter()
    results = evaluate_downstream(cfg, checkpoint, out_dir, [corruption], [0, severity])
    box = results['metrics'].get('coco/bbox_mAP', {})
    mask = results['metrics'].get('coco/segm_mAP', {})

    def fmt(row):
        return ', '.join(f'{k} {row.get(k):.3f}' if row.get(k) is not None else f'{k} -'
                         for k in ('P', 'mPC', 'rPC'))

    print(f'  box AP: {fmt(box)}; mask AP: {fmt(mask)} ({time.perf_counter() - t0:.1f} s)')
    print(f'  results: {osp.join(out_dir, "results.json")}, results.csv, plots/')
    return dict(metrics=results['metrics'], per_set=results['per_set'], clean=results['clean'],
                out_dir=out_dir)


# --- 6. ImageNet-C classifier robustness ---------------------------------------------------
def demo_robustness(work_dir: str, num_classes: int = 4, size: int = 64) -> dict:
    """ConvNeXt-dcls-atto vs dense ConvNeXt-atto (random weights) on a generated set.

    Writes ``data/imagenet-robustness/{imagenet/val, imagenet-c}`` (one image per class,
    the 15 benchmark corruptions x 5 severities, ``dcls_mm.datasets.corruptions``), runs
    :func:`dcls_mm.evaluation.classification.run_evaluation` for both models (the code of
    ``tools/robustness/evaluate.py``) and prints the table of
    ``tools/robustness/compare.py``.

    Args:
        work_dir: the demo folder (data, ``robustness/<model>`` results, ``robustness/compare``).
        num_classes: classes (one image each) of the generated set.
        size: image side in pixels (ImageNet-C sets are evaluated at their native size).

    Returns:
        Both models' ImageNet-C summaries and the results/plot paths.
    """
    from dcls_mm.datasets.imagenet_layouts import (default_corruption, synthetic_images,
                                                   write_class_folder, write_corruption_folders)
    from dcls_mm.evaluation.classification import EvalConfig, run_evaluation
    from dcls_mm.evaluation.compare import compare_results
    from dcls_mm.evaluation.folders import imagenet_wnids
    from dcls_mm.evaluation.imagenet_c import BENCHMARK_CORRUPTIONS
    banner('6. ImageNet-C: ConvNeXt-dcls-atto vs ConvNeXt-atto, random weights (mCE)')
    root = osp.join(work_dir, 'data', 'imagenet-robustness')
    if osp.isdir(root):  # cheap to regenerate; never mixes two generator versions
        shutil.rmtree(root)
    t0 = time.perf_counter()
    samples = synthetic_images(imagenet_wnids()[::250][:num_classes], 1, size, seed=0)
    write_class_folder(osp.join(root, 'imagenet', 'val'), samples)
    corrupt, how = default_corruption()
    write_corruption_folders(osp.join(root, 'imagenet-c'), samples, BENCHMARK_CORRUPTIONS,
                             corrupt=corrupt)
    print(f'  data: {root}: imagenet/val and imagenet-c (15 corruptions x 5 severities x '
          f'{len(samples)} images, {size}x{size} JPEG; {how}) in '
          f'{time.perf_counter() - t0:.1f} s')
    results = {}
    for name, kwargs in (('convnext_atto', {}), ('convnext_dcls_tiny', {'arch': 'atto'})):
        label = name + ''.join(f'-{v}' for v in kwargs.values())
        out_dir = osp.join(work_dir, 'robustness', label)
        if osp.isdir(out_dir):  # the same random weights each run, but a fresh data set
            shutil.rmtree(out_dir)
        t0 = time.perf_counter()
        out = run_evaluation(EvalConfig(
            model=name, model_kwargs=kwargs, benchmarks=['imagenet', 'imagenet-c'],
            data_root=root, out_dir=out_dir, batch_size=20, workers=0, progress=False))
        c = out['results']['benchmarks']['imagenet-c']
        results[label] = dict(mCE=c['mCE'], relative_mCE=c['relative_mCE'],
                              results=osp.join(out_dir, 'results.json'))
        print(f'  {label}: {out["eval_images"]} images in {time.perf_counter() - t0:.1f} s, '
              f'mCE {c["mCE"]:.1f}')
    table = compare_results([r['results'] for r in results.values()],
                            osp.join(work_dir, 'robustness', 'compare'))
    print('\n'.join('  ' + line for line in table['table'].splitlines()))
    print(f'  plots: {", ".join(table["files"][1:])}')
    print('  (random weights: errors near 100 %, mCE near 100 / AlexNet error; the numbers '
          'show the pipeline, not robustness)')
    return dict(models=results, files=table['files'])


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings('ignore', category=UserWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = osp.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    t0 = time.perf_counter()
    summary = dict(torch=torch.__version__, layer=demo_layer(), backbone=demo_backbone())
    if not args.skip_det:
        summary['cascade_mask_rcnn'] = demo_det(work_dir, args.num_images)
        if not args.skip_coco_c:
            summary['coco_c'] = demo_coco_c(work_dir, summary['cascade_mask_rcnn'])
    if not args.skip_seg:
        summary['upernet'] = demo_seg(work_dir, args.num_images)
    if not args.skip_robustness:
        summary['imagenet_c'] = demo_robustness(work_dir)
    summary['total_s'] = round(time.perf_counter() - t0, 1)

    banner('Summary')
    print(f'  DCLS layer: kernel {summary["layer"]["kernel"]} from K=4 weights + positions')
    print(f'  backbone atto: {summary["backbone"]["params"] / 1e6:.2f} M params, fwd+bwd '
          f'{summary["backbone"]["fwd_bwd_s"]} s')
    if 'cascade_mask_rcnn' in summary:
        m = summary['cascade_mask_rcnn']['metrics']
        print(f'  Cascade Mask R-CNN: bbox AP {m.get("coco/bbox_mAP", float("nan")):.3f}, '
              f'segm AP {m.get("coco/segm_mAP", float("nan")):.3f}')
    if 'coco_c' in summary:
        row = summary['coco_c']['metrics'].get('coco/bbox_mAP', {})
        print(f'  COCO-C (gaussian_noise, severity 3): box AP P {row.get("P")}, '
              f'mPC {row.get("mPC")}')
    if 'upernet' in summary:
        m = summary['upernet']['metrics']
        print(f'  UperNet: mIoU {m.get("mIoU", float("nan")):.2f}')
    if 'imagenet_c' in summary:
        print('  ImageNet-C mCE (random weights): ' + ', '.join(
            f'{k} {v["mCE"]:.1f}' for k, v in summary['imagenet_c']['models'].items()))
    print(f'  total {summary["total_s"]} s; details in {osp.join(work_dir, "summary.json")}')
    print('  (toy data, a few iterations: the numbers show the pipeline runs, not accuracy)')
    with open(osp.join(work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == '__main__':
    main()
