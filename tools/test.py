"""Evaluate a checkpoint of an mmdet or mmseg model built from a dcls-mm config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--out FILE]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

``CHECKPOINT`` may be a dcls-mm/mmengine training checkpoint (read with the checked
loader described in ``tools/train.py``: full unpickle only for mmengine/numpy state) or a
published downstream ``{'state_dict': ...}`` file. ``--tta`` uses the config's
``tta_pipeline``/``tta_model`` (ADE20K: multi-scale 0.5..1.75 x (2048, 512) + flip,
the "multi-scale" column of the recipes).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import add_common_args, apply_common_args, setup_dcls_mm  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a dcls-mm detector/segmentor')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_common_args(parser)
    parser.add_argument('--tta', action='store_true', help='test-time augmentation '
                        "(the config's tta_pipeline and tta_model)")
    parser.add_argument('--out', help='dump the raw predictions to this pickle file '
                        '(mmengine DumpResults)')
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg = apply_common_args(cfg, args)
    cfg.load_from = args.checkpoint
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError('--tta needs tta_model and tta_pipeline in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    setup_dcls_mm(cfg)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()
