"""Helpers shared by the command-line tools (``tools/train.py``, ``tools/test.py``,
``tools/demo.py``): common arguments, process setup, Runner construction for
mmdet/mmseg configs that use dcls-mm modules, and what the tools print.

The console shows progress and results; everything else (environment, config, hooks,
every logged iteration, pycocotools' prints) goes to the log file in the work dir
(:func:`build_runner` with ``quiet=True``, :func:`console_prints`). ``--verbose`` puts
mmengine's full log back on the console.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import numbers
import os
import os.path as osp
import sys
import time
import warnings
from typing import Callable, Iterator, Optional

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.runner import EpochBasedTrainLoop

from dcls_mm.utils.console import KnownNoticeFilter, prints_to_log

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


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, for tools whose runner is quiet otherwise (:func:`build_runner`)."""
    parser.add_argument('--verbose', action='store_true',
                        help="mmengine's full log on the console too (environment, config, "
                        'every logged iteration); without it the console shows progress '
                        'and results, and the log file in the work dir has everything')


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` and export ``LOCAL_RANK`` (torch.distributed launchers may pass it
    only as ``--local-rank``; mmengine reads the environment)."""
    args = parser.parse_args(argv)
    config = getattr(args, 'config', None)
    if config is not None and not osp.isfile(config):  # one line, not Config's traceback
        parser.error(f'config {config} does not exist')
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
      :func:`dcls_mm.utils.checkpoint_io.load_checkpoint_file`
      (:func:`dcls_mm.engine.register_checkpoint_loader`);
    * makes distributed launches work without a GPU (:func:`setup_distributed`).

    Args:
        cfg: the tool's config (changed in place by :func:`setup_distributed`).
    """
    import dcls_mm.engine  # registers the constructor and hooks
    import dcls_mm.models  # noqa: F401  (registers the backbone)

    # the import made this call already; repeated because the tools' guarantee should
    # not rest on an import that may have happened before anything reset mmengine's loaders
    dcls_mm.engine.register_checkpoint_loader()

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
        from dcls_mm.datasets.checks import InputCheckError
        raise InputCheckError(f'--out must be a .pkl/.pickle file for {scope} configs, got '
                              f'{out!r}')
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out)
    from mmengine.evaluator import DumpResults
    return DumpResults(out_file_path=out)


def run_cli(main: Callable, argv=None):
    """Run a tool's ``main(argv)``; a missing or unusable input it reports
    (:class:`dcls_mm.datasets.checks.InputCheckError`, or an unreadable checkpoint:
    :class:`dcls_mm.utils.checkpoint_io.CheckpointReadError`) ends the process with its
    lines on stderr and exit code 2, as argparse does for bad arguments, without a
    traceback.

    Args:
        main: the tool's ``main`` function.
        argv: its arguments (default: ``sys.argv[1:]``).
    """
    from dcls_mm.datasets.checks import InputCheckError
    from dcls_mm.utils.checkpoint_io import CheckpointReadError
    try:
        return main(argv)
    except (InputCheckError, CheckpointReadError) as err:
        prog = osp.basename(sys.argv[0])
        for line in str(err).splitlines():
            print(f'{prog}: error: {line}', file=sys.stderr)
        raise SystemExit(2) from None


class ConsoleProgressHook(Hook):
    """What a tool prints on the console next to mmengine's log.

    * With ``progress``: one line per logging interval while training (iteration,
      loss, elapsed time, estimated time left), the validation/test metrics, and where
      the log file and checkpoints are; for runners whose console log shows warnings
      only (:func:`build_runner` with ``quiet=True``).
    * Always: one line when a resumed training has nothing left to do (mmengine logs
      ``resumed epoch: 1, iter: 4`` and ends without training).

    Args:
        progress: print the progress and result lines.
        interval: iterations between progress lines (default: the ``LoggerHook``'s).
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, progress: bool = True, interval: Optional[int] = None) -> None:
        self.progress = progress
        self.interval = interval
        # the console as it is now: third-party prints may be redirected later
        self._stream = sys.stdout
        self._train_start: Optional[float] = None  # set once training starts
        self._first_iter = 0

    def _print(self, text: str) -> None:
        from mmengine.dist import is_main_process
        if self.progress and is_main_process():
            print(text, file=self._stream, flush=True)

    def before_run(self, runner) -> None:
        if self.interval is None:
            from mmengine.hooks import LoggerHook
            self.interval = next((h.interval for h in runner.hooks
                                  if isinstance(h, LoggerHook)), 50)

    def before_train(self, runner) -> None:
        self._train_start, self._first_iter = time.perf_counter(), runner.iter
        by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        if (runner.epoch >= runner.max_epochs) if by_epoch else (runner.iter >= runner.max_iters):
            runner.logger.warning(
                f'training already finished at iter {runner.iter} of {runner.max_iters}'
                + (f' (epoch {runner.epoch} of {runner.max_epochs})' if by_epoch else '')
                + f' in {runner.work_dir}; nothing to do (raise train_cfg.max_'
                + ('epochs' if by_epoch else 'iters') + ' to train further)')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not (self.every_n_train_iters(runner, self.interval)
                or self.is_last_train_iter(runner)):
            return
        done = runner.iter + 1
        elapsed = time.perf_counter() - self._train_start
        left = elapsed / max(done - self._first_iter, 1) * (runner.max_iters - done)
        loss = (outputs or {}).get('loss')
        if hasattr(loss, 'detach'):  # the logged value, not the autograd graph
            loss = loss.detach()
        self._print(f'  train iter {done}/{runner.max_iters}'
                    + (f'  loss {float(loss):.4f}' if loss is not None else '')
                    + f'  {elapsed:.0f} s, about {datetime.timedelta(seconds=round(left))} '
                    'left')

    def _metrics(self, split: str, metrics: Optional[dict]) -> None:
        if metrics:
            self._print(f'  {split}: ' + ', '.join(
                f'{k} {v:.4g}' if isinstance(v, numbers.Real) else f'{k} {v}'
                for k, v in metrics.items()))

    def after_val_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        self._metrics('val', metrics)

    def after_test_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        self._metrics('test', metrics)

    def after_run(self, runner) -> None:
        self._print(f'  log: {runner.logger.log_file}' + (
            f'; checkpoints: {runner.work_dir}' if self._train_start is not None else ''))


def _with_quiet_console(runner_cls: type) -> type:
    """``runner_cls`` whose logger shows warnings only on the console (its log file keeps
    the config's ``log_level``) and drops mmengine's known deprecation notices there."""

    class QuietConsoleRunner(runner_cls):

        def build_logger(self, *args, **kwargs):
            logger = super().build_logger(*args, **kwargs)
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and \
                        not isinstance(handler, logging.FileHandler):
                    handler.setLevel(max(handler.level, logging.WARNING))
                    handler.addFilter(KnownNoticeFilter())
            return logger

    QuietConsoleRunner.__name__ = QuietConsoleRunner.__qualname__ = runner_cls.__name__
    return QuietConsoleRunner


def build_runner(cfg: Config, quiet: bool = False, progress: bool = True):
    """``Runner.from_cfg(cfg)``, or the config's ``runner_type`` from mmengine's RUNNERS,
    with a :class:`ConsoleProgressHook`.

    Args:
        cfg: the Runner config.
        quiet: the console shows warnings, progress and results only; the log file
            in the work dir still has everything at the config's ``log_level``.
        progress: with ``quiet``, print the progress and result lines (the demo prints
            its own).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner_cls = cfg.get('runner_type', Runner)
    if isinstance(runner_cls, str):
        name, runner_cls = runner_cls, RUNNERS.get(runner_cls)
        if runner_cls is None:
            raise KeyError(f'runner_type {name!r} is not in the RUNNERS registry')
    runner = (_with_quiet_console(runner_cls) if quiet else runner_cls).from_cfg(cfg)
    runner.register_hook(ConsoleProgressHook(progress=quiet and progress))
    return runner


@contextlib.contextmanager
def console_prints(runner, quiet: bool = True) -> Iterator[None]:
    """While active and ``quiet``, third-party prints (pycocotools' ``loading
    annotations into memory...``, ``COCOeval`` tables) go to ``runner``'s log file
    instead of the console (:func:`dcls_mm.utils.console.prints_to_log`).

    Args:
        runner: a runner from :func:`build_runner`.
        quiet: redirect; without it the prints stay on the console.
    """
    with prints_to_log(runner.logger) if quiet else contextlib.nullcontext():
        yield
