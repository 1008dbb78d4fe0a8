"""dcls-mm demo on built-in data, CPU only (about 40 s on an idle 2-core machine).

How long it took (README.md, "Quick start"): 26.5 s for the steps, 38 s with
``tools/demo.sh``'s environment check, on 2 idle cores (load average 1.1); 4 minutes
when other jobs shared the cores (load average 4).

    bash tools/demo.sh            # sets up .venv if needed, then runs this file
    .venv/bin/python tools/demo.py [--work-dir work_dirs/demo] [--skip-det] [--skip-seg] [--skip-coco-c]
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

The console shows one line per step, then a table of the metrics with where the
results, logs and checkpoints are; everything else (mmengine's logs, pycocotools'
prints) goes to the log files in the work dir: each training run's own, the rest to
``<work-dir>/demo.log``. After a few iterations on toy data the numbers show that the
real training and evaluation pipelines run end to end, not accuracy (see the table's
footnote). The results are also written to ``<work-dir>/summary.json``. Re-running is
safe: the data are reused when unchanged and each run's training folders are replaced.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import os.path as osp
import shutil
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

from dcls_mm.utils.console import ignore_known_warnings, prints_to_log

ignore_known_warnings()  # before mmengine imports pkg_resources

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(
    ROOT, 'configs/demo/cascade-mask-rcnn_convnext-dcls-atto_fpn_4conv1fc-giou_ms-crop-1e_demo-coco.py')
SEG_CONFIG = osp.join(ROOT, 'configs/demo/upernet_convnext-dcls-atto_demo-ade20k-64x64.py')


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
    """A depthwise ``Dcls2d``: K weights + learned positions -> a dense dilated kernel;
    the loss gradient reaches the positions."""
    import torch

    from dcls_mm.ops import Dcls2d
    torch.manual_seed(0)
    channels, count, dks = 8, 4, 9
    layer = Dcls2d(channels, channels, kernel_count=count, dilated_kernel_size=dks,
                   padding=dks // 2, groups=channels, interpolation='bilinear')
    kernel = layer.construct_kernel()
    nonzero = (kernel.detach().abs() > 0).flatten(1).sum(1)
    x = torch.randn(1, channels, 32, 32)
    y = layer(x)
    y.square().mean().backward()
    info = dict(
        weight=list(layer.weight.shape), positions=list(layer.P.shape),
        kernel=list(kernel.shape), nonzero_per_channel_max=int(nonzero.max()),
        output=list(y.shape), position_grad_norm=float(layer.P.grad.norm()))
    info['line'] = (f'K={count} weights + {count} learned positions per channel -> dense '
                    f'{dks}x{dks} kernel ({info["nonzero_per_channel_max"]} non-zeros: '
                    f'bilinear spread), |dL/dP| = {info["position_grad_norm"]:.3g}')
    return info


# --- 2. the backbone -------------------------------------------------------------------------
def demo_backbone() -> dict:
    """ConvNeXt-dcls-atto: forward/backward, gradients reach every position tensor."""
    import torch

    from dcls_mm.models import ConvNeXtDCLS
    torch.manual_seed(0)
    model = ConvNeXtDCLS(arch='atto', dilated_kernel_size=9, drop_path_rate=0.1)
    dense = ConvNeXtDCLS(arch='atto', dwconv_type='dense')
    x = torch.randn(2, 3, 64, 64)
    t0 = time.perf_counter()
    outs = model(x)
    sum(o.mean() for o in outs).backward()
    elapsed = time.perf_counter() - t0
    p_grads = [float(p.grad.norm()) for n, p in model.named_parameters() if n.endswith('.P')]
    info = dict(kernel_count=model.kernel_count,
                params=sum(p.numel() for p in model.parameters()),
                dense_params=sum(p.numel() for p in dense.parameters()),
                out_shapes=[list(o.shape) for o in outs], fwd_bwd_s=round(elapsed, 3),
                position_tensors=len(p_grads),
                positions_with_grad=sum(g > 0 for g in p_grads))
    info['line'] = (f'K={model.kernel_count}: {info["params"] / 1e6:.2f} M params (dense 7x7: '
                    f'{info["dense_params"] / 1e6:.2f} M); {list(x.shape)} -> '
                    f'{len(outs)} stages; {info["positions_with_grad"]}/{len(p_grads)} '
                    'position tensors got gradients')
    return info


# --- 3./4. downstream: one table entry per task ----------------------------------------------
class DownstreamTask(NamedTuple):
    """A demo config trained briefly on generated data in a real on-disk format.

    Args:
        name: sub-folder of the work dir for the training run.
        data_dir: sub-folder of ``<work dir>/data`` (where the demo config looks).
        config: the demo config.
        make_data: ``dcls_mm.datasets`` generator of the format.
        cfg_options: its config overrides (``dcls_mm.datasets.demo``).
        metrics: ``(metric key, label)`` shown in the summary.
    """

    name: str
    data_dir: str
    config: str
    make_data: Callable[..., dict]
    cfg_options: Callable[[dict], dict]
    metrics: Tuple[Tuple[str, str], ...]


def _downstream_tasks() -> Dict[str, DownstreamTask]:
    from dcls_mm.datasets import make_ade20k_demo, make_coco_demo
    from dcls_mm.datasets.demo import ade20k_demo_cfg_options, coco_demo_cfg_options
    return dict(
        det=DownstreamTask('det', 'coco', DET_CONFIG, make_coco_demo, coco_demo_cfg_options,
                           (('coco/bbox_mAP', 'bbox AP'), ('coco/segm_mAP', 'segm AP'))),
        seg=DownstreamTask('seg', 'ade', SEG_CONFIG, make_ade20k_demo, ade20k_demo_cfg_options,
                           (('mIoU', 'mIoU'), ('aAcc', 'aAcc'))))


def demo_downstream(task: DownstreamTask, work_dir: str, num_images: int) -> dict:
    """Generate ``task``'s data, train its config briefly (the config's own train_cfg)
    and validate.

    Args:
        task: what to train.
        work_dir: the demo folder (data under ``data/<data_dir>``, the run under
            ``<name>``).
        num_images: training images (4 validation images).

    Returns:
        The losses, the validation metrics, the run's folder and log file, the time.
    """
    from mmengine.config import Config
    from mmengine.hooks import Hook

    from dcls_mm.engine.runner_utils import build_runner, console_prints, setup_dcls_mm

    class Recorder(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.losses, self.metrics = [], {}

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and 'loss' in outputs:
                self.losses.append(float(outputs['loss'].detach()))

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = {k: float(v) for k, v in (metrics or {}).items()}

    data = task.make_data(osp.join(work_dir, 'data', task.data_dir), num_images=num_images,
                          num_val_images=4)
    cfg = Config.fromfile(task.config)
    cfg.merge_from_dict(task.cfg_options(data))
    run_dir = osp.join(work_dir, task.name)
    if osp.isdir(run_dir):  # our own folder from an earlier run: start afresh
        shutil.rmtree(run_dir)
    cfg.work_dir = run_dir
    cfg.launcher = 'none'
    setup_dcls_mm(cfg)
    runner = build_runner(cfg, quiet=True, progress=False)
    recorder = Recorder()
    runner.register_hook(recorder)
    t0 = time.perf_counter()
    with console_prints(runner):
        runner.train()
    info = dict(train_and_val_s=round(time.perf_counter() - t0, 1), losses=recorder.losses,
                metrics=recorder.metrics, work_dir=run_dir, log=runner.logger.log_file)
    info['line'] = (f'{len(info["losses"])} iterations, loss {info["losses"][0]:.3f} -> '
                    f'{info["losses"][-1]:.3f}; ' + ', '.join(
                        f'{label} {info["metrics"].get(key, float("nan")):.3g}'
                        for key, label in task.metrics))
    return info


# --- 5. COCO-C ------------------------------------------------------------------------------
def demo_coco_c(work_dir: str, det: dict, corruption: str = 'gaussian_noise',
                severity: int = 3) -> dict:
    """Evaluate step 3's checkpoint on the clean and one corrupted COCO val set.

    Args:
        work_dir: the demo folder (data under ``data/coco``, results under ``coco-c``).
        det: the result of the detection step (its ``work_dir`` holds the checkpoint).
        corruption: corruption name.
        severity: 1..5.

    Returns:
        P, mPC and rPC of every CocoMetric value, and the per-set table.
    """
    from mmengine.config import Config

    from dcls_mm.datasets.demo import coco_demo_cfg_options
    from dcls_mm.evaluation.downstream import evaluate_downstream
    checkpoint = osp.join(det['work_dir'], 'epoch_1.pth')
    out_dir = osp.join(work_dir, 'coco-c')
    if osp.isdir(out_dir):  # a new checkpoint each run: start afresh
        shutil.rmtree(out_dir)
    cfg = Config.fromfile(DET_CONFIG)
    cfg.merge_from_dict(coco_demo_cfg_options(dict(
        data_root=osp.join(work_dir, 'data', 'coco'),
        val_ann='annotations/instances_val2017.json')))
    cfg.work_dir = osp.join(out_dir, 'runner')
    cfg.launcher = 'none'
    results = evaluate_downstream(cfg, checkpoint, out_dir, [corruption], [0, severity])

    def fmt(metric):
        row = results['metrics'].get(metric, {})
        return '/'.join(f'{row[k]:.3f}' if row.get(k) is not None else '-'
                        for k in ('P', 'mPC', 'rPC'))

    return dict(metrics=results['metrics'], per_set=results['per_set'], clean=results['clean'],
                out_dir=out_dir,
                line=f'{corruption} severity {severity}: P/mPC/rPC box AP '
                f'{fmt("coco/bbox_mAP")}, mask AP {fmt("coco/segm_mAP")}')


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
        Both models' ImageNet-C summaries, the comparison table and the results/plot
        paths.
    """
    from dcls_mm.datasets.imagenet_layouts import (default_corruption, synthetic_images,
                                                   write_class_folder, write_corruption_folders)
    from dcls_mm.evaluation.classification import EvalConfig, run_evaluation
    from dcls_mm.evaluation.compare import compare_results
    from dcls_mm.evaluation.folders import imagenet_wnids
    from dcls_mm.evaluation.imagenet_c import BENCHMARK_CORRUPTIONS
    root = osp.join(work_dir, 'data', 'imagenet-robustness')
    if osp.isdir(root):  # cheap to regenerate; never mixes two generator versions
        shutil.rmtree(root)
    samples = synthetic_images(imagenet_wnids()[::250][:num_classes], 1, size, seed=0)
    write_class_folder(osp.join(root, 'imagenet', 'val'), samples)
    corrupt, how = default_corruption()
    write_corruption_folders(osp.join(root, 'imagenet-c'), samples, BENCHMARK_CORRUPTIONS,
                             corrupt=corrupt)
    results = {}
    for name, kwargs in (('convnext_atto', {}), ('convnext_dcls_tiny', {'arch': 'atto'})):
        label = name + ''.join(f'-{v}' for v in kwargs.values())
        out_dir = osp.join(work_dir, 'robustness', label)
        if osp.isdir(out_dir):  # the same random weights each run, but a fresh data set
            shutil.rmtree(out_dir)
        out = run_evaluation(EvalConfig(
            model=name, model_kwargs=kwargs, benchmarks=['imagenet', 'imagenet-c'],
            data_root=root, out_dir=out_dir, batch_size=20, workers=0, progress=False))
        c = out['results']['benchmarks']['imagenet-c']
        results[label] = dict(mCE=c['mCE'], relative_mCE=c['relative_mCE'],
                              results=osp.join(out_dir, 'results.json'))
    table = compare_results([r['results'] for r in results.values()],
                            osp.join(work_dir, 'robustness', 'compare'))
    print(table['table'])
    return dict(models=results, files=table['files'], table=table['table'],
                line=f'{len(samples)} images x (1 clean + 75 corrupted sets, {how}); mCE '
                + ', '.join(f'{k} {v["mCE"]:.1f}' for k, v in results.items()))


# --- the steps, in order ------------------------------------------------------------------------
class Step(NamedTuple):
    """One demo step.

    Args:
        key: its entry in ``summary.json``.
        title: what the progress line says.
        run: ``(args, work_dir, results of the earlier steps) -> result`` (a dict with a
            one-line ``line`` for the console).
        skip: whether ``args`` leave it out.
        rows: ``result -> [(metric, value, where)]`` for the final table.
    """

    key: str
    title: str
    run: Callable[[argparse.Namespace, str, dict], dict]
    skip: Callable[[argparse.Namespace], bool]
    rows: Callable[[dict], List[Tuple[str, str, str]]]


def _downstream_rows(task_name: str) -> Callable[[dict], List[Tuple[str, str, str]]]:
    task = _downstream_tasks()[task_name]
    return lambda r: [(label, f'{r["metrics"].get(key, float("nan")):.3g}',
                       f'{r["work_dir"]} (checkpoint; log {osp.relpath(r["log"], r["work_dir"])})')
                      for key, label in task.metrics]


def _coco_c_rows(r: dict) -> List[Tuple[str, str, str]]:
    return [(f'{label} P / mPC / rPC', ' / '.join(
        f'{row[k]:.3f}' if row.get(k) is not None else '-' for k in ('P', 'mPC', 'rPC')),
        osp.join(r['out_dir'], 'results.json'))
        for label, row in (('box AP', r['metrics'].get('coco/bbox_mAP', {})),
                           ('mask AP', r['metrics'].get('coco/segm_mAP', {})))]


STEPS = (
    Step('layer', 'a DCLS layer (Dcls2d, depthwise, bilinear)',
         lambda args, work_dir, done: demo_layer(), lambda args: False,
         lambda r: [('|dL/dP|', f'{r["position_grad_norm"]:.3g}', '')]),
    Step('backbone', 'ConvNeXt-dcls-atto backbone: forward / backward',
         lambda args, work_dir, done: demo_backbone(), lambda args: False,
         lambda r: [('params (M)', f'{r["params"] / 1e6:.2f}', '')]),
    Step('cascade_mask_rcnn', 'tiny Cascade Mask R-CNN on COCO-format demo data',
         lambda args, work_dir, done: demo_downstream(_downstream_tasks()['det'], work_dir,
                                                      args.num_images),
         lambda args: args.skip_det, _downstream_rows('det')),
    Step('upernet', 'tiny UperNet on ADE20K-format demo data',
         lambda args, work_dir, done: demo_downstream(_downstream_tasks()['seg'], work_dir,
                                                      args.num_images),
         lambda args: args.skip_seg, _downstream_rows('seg')),
    Step('coco_c', 'COCO-C: the detector of step 3 under gaussian noise, severity 3',
         lambda args, work_dir, done: demo_coco_c(work_dir, done['cascade_mask_rcnn']),
         lambda args: args.skip_det or args.skip_coco_c, _coco_c_rows),
    Step('imagenet_c', 'ImageNet-C: ConvNeXt-dcls-atto vs ConvNeXt-atto, random weights',
         lambda args, work_dir, done: demo_robustness(work_dir),
         lambda args: args.skip_robustness,
         lambda r: [(f'mCE {k}', f'{v["mCE"]:.1f}', v['results'])
                    for k, v in r['models'].items()]),
)


def _close_demo_log(logger: logging.Logger) -> None:
    # detached, not just closed: a closed FileHandler reopens (mode 'w') on the next record
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _demo_log(work_dir: str) -> logging.Logger:
    """The log of everything the steps print (``<work_dir>/demo.log``, new each run)."""
    logger = logging.getLogger('dcls_mm.demo')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _close_demo_log(logger)  # an earlier main() in this process
    handler = logging.FileHandler(osp.join(work_dir, 'demo.log'), mode='w')
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    logger.addHandler(handler)
    return logger


def _print_table(rows: List[Tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  ' + '  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = osp.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    log = _demo_log(work_dir)
    steps = [step for step in STEPS if not step.skip(args)]
    summary, rows = dict(torch=torch.__version__), [('step', 'metric', 'value', 'where')]
    t_start = time.perf_counter()
    try:
        for i, step in enumerate(steps, 1):
            print(f'[{i}/{len(steps)}] {step.title} ...', end=' ', flush=True)
            t0 = time.perf_counter()
            log.info(f'=== {step.title}')
            with prints_to_log(log):
                result = step.run(args, work_dir, summary)
            result['seconds'] = round(time.perf_counter() - t0, 1)
            summary[step.key] = result
            print(f'{result["seconds"]} s\n      {result["line"]}', flush=True)
            rows += [(step.key if j == 0 else '', *row)
                     for j, row in enumerate(step.rows(result))]
    finally:
        _close_demo_log(log)
    summary['total_s'] = round(time.perf_counter() - t_start, 1)
    with open(osp.join(work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    print(f'\nResults ({summary["total_s"]} s; all values in {osp.join(work_dir, "summary.json")}'
          f', everything printed on the way in {osp.join(work_dir, "demo.log")}):')
    _print_table(rows)
    if 'imagenet_c' in summary:
        print('\n' + '\n'.join('  ' + line for line in summary['imagenet_c']['table'].splitlines()))
    print('\n  Toy data and a few iterations (random weights for ImageNet-C): the numbers show\n'
          '  that the real training and evaluation pipelines run end to end, not accuracy.')
    return summary


if __name__ == '__main__':
    main()
