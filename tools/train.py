"""Train an mmdet or mmseg model from a dcls-mm (or any OpenMMLab 2.0) config.

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The same CLI serves detection and segmentation: the config's ``default_scope``
(``'mmdet'`` / ``'mmseg'``, set by the mmdet/mmseg base configs) decides which
downstream registries are used; ``dcls_mm`` is imported so that its registry scope
(``type='dcls_mm.ConvNeXtDCLS'`` ...) resolves. Multi-GPU: ``tools/dist_train.sh``;
SLURM: ``tools/slurm_train.sh``.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import warnings

from mmengine.config import Config, DictAction


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. model.backbone.arch=atto '
        'train_dataloader.batch_size=1; lists as key="[a,b]")')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed launchers pass --local-rank (torch>=2) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


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
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def setup_dcls_mm(cfg: Config) -> str:
    """Prepare the process for a Runner built from ``cfg``; returns its default scope.

    * imports ``dcls_mm`` (models and engine: backbone, constructor, hooks) so the
      ``dcls_mm`` registry scope resolves even for configs without ``custom_imports``;
    * checks ``default_scope`` (the downstream package the Runner builds from);
    * routes mmengine's LOCAL checkpoint loading through
      :func:`dcls_mm.models.load_checkpoint_file` (importing dcls_mm registers it, see
      :func:`dcls_mm.models.checkpoint.use_checked_checkpoint_loader`).
    """
    import dcls_mm.engine  # noqa: F401  (registers the constructor and hooks)
    import dcls_mm.models  # noqa: F401  (registers the backbone)

    scope = cfg.get('default_scope')
    if scope is None:
        raise ValueError('the config sets no default_scope; dcls-mm configs inherit it from '
                         "an mmdet ('mmdet') or mmseg ('mmseg') base config")
    return scope


def apply_common_args(cfg: Config, args) -> Config:
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def fall_back_to_fp32_on_cpu(cfg: Config) -> None:
    """mmengine's AmpOptimWrapper refuses to run without a GPU/NPU/MLU; on a CPU-only
    machine the recipe configs (AMP) would not start. Train in fp32 there, loudly."""
    import torch
    if cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper' and \
            not torch.cuda.is_available():
        warnings.warn('no GPU: AmpOptimWrapper -> OptimWrapper (fp32 training on the CPU)')
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
        cfg.optim_wrapper.pop('dtype', None)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg = apply_common_args(cfg, args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    fall_back_to_fp32_on_cpu(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    setup_dcls_mm(cfg)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
