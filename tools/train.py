"""Train an mmdet or mmseg model from a dcls-mm (or any OpenMMLab 2.0) config.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The same CLI serves detection and segmentation: the config's ``default_scope``
(``'mmdet'`` / ``'mmseg'``, set by the mmdet/mmseg base configs) decides which
downstream registries are used; ``dcls_mm`` is imported so that its registry scope
(``type='dcls_mm.ConvNeXtDCLS'`` ...) resolves. Multi-GPU: ``tools/dist_train.sh``;
SLURM: ``tools/slurm_train.sh``. The helpers shared with ``tools/test.py`` live in
:mod:`dcls_mm.engine.runner_utils`. Checkpoints are written atomically and ``--resume``
restores the random generators and the data position
(:class:`dcls_mm.engine.hooks.AtomicCheckpointHook`, :class:`dcls_mm.engine.hooks.RNGStateHook`).
"""
from __future__ import annotations

import argparse

from mmengine.config import Config

from dcls_mm.engine.runner_utils import (add_common_args, apply_common_args, build_runner,
                                         fall_back_to_fp32_on_cpu, parse_tool_args,
                                         setup_dcls_mm)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a dcls-mm detector/segmentor')
    parser.add_argument('config', help='config file')
    add_common_args(parser)
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision (AmpOptimWrapper, dynamic loss scale); the '
                        'recipe configs already use it')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or, without a value, from the latest checkpoint in the '
        'work dir')
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    apply_common_args(cfg, args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    fall_back_to_fp32_on_cpu(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    setup_dcls_mm(cfg)
    # empty datasets / labels of the wrong size: one line naming the file, before any work
    from dcls_mm.datasets.checks import check_datasets
    check_datasets(cfg, splits=('train', 'val'))
    # atomic checkpoints, resume falling back past a truncated one, exact resume (RNG
    # states + sampler position): also for configs that do not inherit ours
    from dcls_mm.engine.hooks import use_reliable_hooks
    use_reliable_hooks(cfg)
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
