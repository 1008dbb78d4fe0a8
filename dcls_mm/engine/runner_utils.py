"""Helpers shared by the command-line tools (``tools/train.py``, ``tools/test.py``,
``tools/demo.py``): common arguments, process setup and Runner construction for
mmdet/mmseg configs that use dcls-mm modules.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp
import warnings

from mmengine.config import Config, DictAction

DUMP_SUFFIXES = ('.pkl', '.pickle')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``."""
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


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` and export ``LOCAL_RANK`` (torch.distributed launchers may pass it
    only as ``--local-rank``; mmengine reads the environment)."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def apply_common_args(cfg: Config, args: argparse.Namespace) -> None:
    """Apply the arguments of :func:`add_common_args` to ``cfg`` (in place)."""
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])


def setup_dcls_mm(cfg: Config) -> None:
    """Prepare the process for a Runner built from ``cfg``.

    * imports ``dcls_mm`` (models and engine: backbone, constructor, hooks) so the
      ``dcls_mm`` registry scope resolves even for configs without ``custom_imports``;
    * checks that the config sets ``default_scope`` (the downstream package, ``'mmdet'``
      or ``'mmseg'``, the Runner builds from);
    * routes mmengine's LOCAL checkpoint loading through
      :func:`dcls_mm.models.load_checkpoint_file` (importing dcls_mm registers it, see
      :func:`dcls_mm.models.checkpoint.use_checked_checkpoint_loader`);
    * makes distributed launches work without a GPU (:func:`setup_distributed`).

    Args:
        cfg: the tool's config (changed in place by :func:`setup_distributed`).
    """
    import dcls_mm.engine  # noqa: F401  (registers the constructor and hooks)
    import dcls_mm.models  # noqa: F401  (registers the backbone)

    if cfg.get('default_scope') is None:
        raise ValueError('the config sets no default_scope; dcls-mm configs inherit it from '
                         "an mmdet ('mmdet') or mmseg ('mmseg') base config")
    setup_distributed(cfg)


#: norm layer types that need a GPU process group (torch's and mmcv's SyncBatchNorm).
SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN', 'SyncBatchNorm', 'nn.SyncBatchNorm')


def revert_sync_bn_cfg(node) -> int:
    """Replace every ``type='SyncBN'`` (and mmcv's ``'MMSyncBN'``) in a config subtree by
    ``'BN'``, in place, as mmengine's ``revert_sync_batchnorm`` does on a built model.

    Args:
        node: a config dict/list (e.g. ``cfg.model``), walked recursively.

    Returns:
        How many norm configs were changed.
    """
    changed = 0
    if isinstance(node, dict):
        if node.get('type') in SYNC_BN_TYPES:
            node['type'] = 'BN'
            changed += 1
        for value in node.values():
            changed += revert_sync_bn_cfg(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            changed += revert_sync_bn_cfg(value)
    return changed


@contextlib.contextmanager
def _cuda_set_device_skipped():
    """mmengine's ``init_dist`` calls ``torch.cuda.set_device(local_rank)`` whatever the
    backend; without a GPU that raises before the process group exists."""
    import torch
    original = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = original


def setup_distributed(cfg: Config) -> None:
    """Let ``cfg.launcher != 'none'`` (torchrun, slurm, mpi) run on CPU-only machines.

    mmengine assumes GPUs once a launcher is given: NCCL, ``torch.cuda.set_device``,
    ``DistributedDataParallel(device_ids=[local_rank])`` and SyncBN all fail on a CPU.
    Without a GPU this helper, in place:

    * selects the gloo backend (``env_cfg.dist_cfg.backend``) and initialises the process
      group itself, with mmengine's ``init_dist`` minus its CUDA device call (the Runner
      then sees an initialised group and keeps it);
    * wraps the model in ``MMDistributedDataParallel`` with ``device_ids=None`` (what
      DDP requires for CPU modules);
    * turns SyncBN into BN (torch's SyncBatchNorm refuses CPU tensors) and adds
      mmengine's ``SyncBuffersHook``, which averages the BN running statistics over the
      processes after every training epoch and before validation: all ranks evaluate,
      and checkpoints store, the same statistics. Training normalises with each
      process's own batch (as non-synchronised BN does on several GPUs).

    Nothing changes for ``launcher='none'`` or when a GPU is present.

    Args:
        cfg: the tool's config, with ``cfg.launcher`` set (see :func:`apply_common_args`).
    """
    import torch
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    from mmengine.dist import init_dist, is_distributed

    # explicit get/set: ConfigDict.setdefault may return the default it just copied
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = dict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = dict()
    dist_cfg = cfg.env_cfg.dist_cfg
    if dist_cfg.get('backend', 'nccl') != 'gloo':
        warnings.warn(f"no GPU: distributed backend {dist_cfg.get('backend', 'nccl')!r} -> "
                      "'gloo'")
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel').split('.')[-1] == \
            'MMDistributedDataParallel':
        wrapper['device_ids'] = None
    if revert_sync_bn_cfg(cfg.get('model')):
        warnings.warn('no GPU: SyncBN -> BN (running statistics averaged over the '
                      'processes by SyncBuffersHook)')
        hooks = list(cfg.get('custom_hooks') or [])
        if not any(h.get('type', '').split('.')[-1] == 'SyncBuffersHook' for h in hooks):
            cfg.custom_hooks = hooks + [dict(type='SyncBuffersHook')]
    if not is_distributed():
        with _cuda_set_device_skipped():
            init_dist(launcher, **dist_cfg)


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


def use_tta(cfg: Config) -> None:
    """Switch ``cfg`` to its test-time augmentation (``tta_pipeline`` + ``tta_model``)."""
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ValueError('--tta needs tta_model and tta_pipeline in the config')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def set_prediction_output(cfg: Config, out: str):
    """Configure ``tools/test.py --out OUT`` as the downstream package's own test tool does.

    * ``default_scope='mmseg'`` (mmseg's tools/test.py): ``OUT`` is a directory; the test
      evaluator gets ``output_dir=OUT`` and ``keep_results=True`` (IoUMetric writes one
      prediction PNG per image there). Changes ``cfg``; returns None.
    * ``default_scope='mmdet'`` (mmdet's tools/test.py): ``OUT`` is a ``.pkl`` file; returns
      an mmdet ``DumpDetResults`` metric to append to ``runner.test_evaluator.metrics``.
    * any other scope: returns mmengine's generic ``DumpResults``.
    """
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        evaluators = cfg.test_evaluator
        for evaluator in evaluators if isinstance(evaluators, list) else [evaluators]:
            evaluator['output_dir'] = out
            evaluator['keep_results'] = True
        return None
    if not out.endswith(DUMP_SUFFIXES):
        raise ValueError(f'--out must be a .pkl/.pickle file for {scope} configs, got {out!r}')
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out)
    from mmengine.evaluator import DumpResults
    return DumpResults(out_file_path=out)


def build_runner(cfg: Config):
    """``Runner.from_cfg(cfg)``, or the config's ``runner_type`` from mmengine's RUNNERS."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
