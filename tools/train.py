"""Train an mmdet or mmseg model from a dcls-mm (or any OpenMMLab 2.0) config.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--verbose]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The same CLI serves detection and segmentation: the config's ``default_scope``
(``'mmdet'`` / ``'mmseg'``, set by the mmdet/mmseg base configs) decides which
downstream registries are used; ``dcls_mm`` is imported so that its registry scope
(``type='dcls_mm.ConvNeXtDCLS'`` ...) resolves. Multi-GPU: ``tools/dist_train.sh``;
SLURM: ``tools/slurm_train.sh``. The helpers shared with ``tools/test.py`` live in
:mod:`dcls_mm.engine.runner_utils`. Checkpoints are written atomically and ``--resume``
restores the random generators and the data position
(:class:`dcls_mm.engine.hooks.AtomicCheckpointHook`, :class:`dcls_mm.engine.hooks.RNGStateHook`).

Before anything is built, every missing data folder, annotation file and checkpoint is
reported at once, one line each (exit code 2). The console shows a progress line per
logging interval, the validation metrics and where the log file and checkpoints are;
the log file in the work dir has mmengine's full log (``--verbose``: on the console too).
"""
from __future__ import annotations

import argparse

from dcls_mm.utils.console import ignore_known_warnings

ignore_known_warnings()  # before mmengine imports pkg_resources

from mmengine.config import Config  # noqa: E402

from dcls_mm.engine.runner_utils import (  # noqa: E402
    add_common_args, add_verbose_arg, apply_common_args, build_runner, console_prints,
    fall_back_to_fp32_on_cpu, parse_tool_args, run_cli, setup_dcls_mm)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a dcls-mm detector/segmentor')
    parser.add_argument('config', help='config file')
    add_common_args(parser)
    add_verbose_arg(parser)
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
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    # missing data / checkpoints (all at once), empty datasets, labels of the wrong size:
    # one line naming each file, before any work
    from dcls_mm.datasets.checks import check_datasets, check_inputs
    check_inputs(cfg, splits=('train', 'val'))
    check_datasets(cfg, splits=('train', 'val'))
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    fall_back_to_fp32_on_cpu(cfg)
    setup_dcls_mm(cfg)
    # atomic checkpoints, resume falling back past a truncated one, exact resume (RNG
    # states + sampler position): also for configs that do not inherit ours
    from dcls_mm.engine.hooks import use_reliable_hooks
    use_reliable_hooks(cfg)
    runner = build_runner(cfg, quiet=not args.verbose)
    with console_prints(runner, quiet=not args.verbose):
        runner.train()
    return runner


if __name__ == '__main__':
    run_cli(main)
