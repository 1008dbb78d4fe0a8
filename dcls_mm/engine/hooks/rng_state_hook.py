"""Exact resume: random number generator states and the data sampler's position.

A resumed run repeats a straight run bit for bit only if, at the first iteration after
the checkpoint, every random generator is where it was in the straight run and the data
loader yields the same next batch. mmengine's checkpoints hold neither: the generators
are re-seeded, and an epoch-based loop restarts the interrupted epoch from its first
batch. :class:`RNGStateHook` stores, per rank, the states of Python's ``random``, NumPy's
global generator, torch's CPU generator and the CUDA generators, plus the position in
the epoch, and restores them at the moment the resumed loader fetches its first batch.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from dcls_mm.registry import HOOKS

from ..utils import DATA_BATCH

#: checkpoint key of the saved states.
STATE_KEY = 'dcls_mm_resume_state'


def get_rng_state() -> dict:
    """States of this process's generators, as plain Python values and tensors (they load
    with ``torch.load(weights_only=True)``).

    Returns:
        ``dict(python=..., numpy=dict(key, pos, has_gauss, gauss), torch=ByteTensor,
        cuda=[ByteTensor per device])`` (``cuda`` empty when CUDA is not initialised).
    """
    np_state = np.random.get_state(legacy=False)
    if np_state['bit_generator'] != 'MT19937':
        raise RuntimeError(f'unexpected NumPy global generator {np_state["bit_generator"]}')
    version, internal, gauss_next = random.getstate()
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    return dict(
        python=(version, list(internal), gauss_next),
        numpy=dict(key=torch.from_numpy(np_state['state']['key'].astype(np.int64)),
                   pos=int(np_state['state']['pos']), has_gauss=int(np_state['has_gauss']),
                   gauss=float(np_state['gauss'])),
        torch=torch.get_rng_state(),
        cuda=cuda)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned.

    Args:
        state: a dict from :func:`get_rng_state` (tensors may be on any device).
    """
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    npst = state['numpy']
    np.random.set_state(('MT19937', npst['key'].cpu().numpy().astype(np.uint32), npst['pos'],
                         npst['has_gauss'], npst['gauss']))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda') or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            print_log(f'resume: {len(cuda)} CUDA generator states saved, '
                      f'{torch.cuda.device_count()} devices now; CUDA states not restored',
                      logger='current', level=logging.WARNING)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


class _ResumeBatchSampler:
    """Wraps a batch sampler: the first epoch after resume skips the ``skip`` batches
    trained before the checkpoint (indices only, no data is loaded) and calls
    ``on_resume`` when the next batch is fetched; later epochs pass through."""

    def __init__(self, batch_sampler, skip: int, on_resume: Callable[[], None]) -> None:
        self.batch_sampler = batch_sampler
        self._skip = skip
        self._on_resume: Optional[Callable[[], None]] = on_resume

    def __iter__(self) -> Iterator[List[int]]:
        if self._on_resume is not None and self._skip == 0:
            # At an epoch boundary: restore before the DataLoader iterator, created right
            # after this call, draws its base seed (as the straight run did after saving).
            self._on_resume, on_resume = None, self._on_resume
            on_resume()
        return self._iterate()

    def _iterate(self) -> Iterator[List[int]]:
        it = iter(self.batch_sampler)
        if self._on_resume is not None:
            # Mid-epoch: the iterator (and its base seed draw) existed before the save in
            # the straight run, so restore only now, at the first fetch. (A multi-worker
            # DataLoader calls __iter__ twice; only the iterator that is used gets here.)
            self._on_resume, on_resume = None, self._on_resume
            for _ in range(self._skip):
                next(it)
            on_resume()
        yield from it

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str):
        if name == 'batch_sampler':  # not set yet (copy/unpickling)
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


class _ResumeIterator:
    """Wraps an iteration-based loop's data iterator: restores the states right before
    fetching batch number ``at`` (mmengine first re-fetches the ``at`` batches trained
    before the checkpoint, which uses the generators)."""

    def __init__(self, iterator, at: int, on_resume: Callable[[], None]) -> None:
        self.iterator = iterator
        self._count = 0
        self._at = at
        self._on_resume: Optional[Callable[[], None]] = on_resume

    def __iter__(self):
        return self

    def __next__(self):
        if self._on_resume is not None and self._count == self._at:
            self._on_resume, on_resume = None, self._on_resume
            on_resume()
        self._count += 1
        return next(self.iterator)

    def __getattr__(self, name: str):
        if name == 'iterator':  # not set yet (copy/unpickling)
            raise AttributeError(name)
        return getattr(self.iterator, name)


def _sampler_of(dataloader):
    """The index sampler (with ``seed``/``epoch``) behind ``dataloader``, or ``None``."""
    batch_sampler = getattr(dataloader, 'batch_sampler', None)
    for sampler in (getattr(batch_sampler, 'sampler', None), getattr(dataloader, 'sampler', None)):
        if sampler is not None and hasattr(sampler, 'seed'):
            return sampler
    return None


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random generators' states and the sampler position in every checkpoint and
    restore them on resume, so that ``N`` iterations equal ``k`` + resume + ``N - k``
    bit for bit (CPU; on GPU as far as the kernels are deterministic).

    Config: ``custom_hooks = [dict(type='dcls_mm.RNGStateHook')]`` (our configs and
    ``tools/train.py`` add it). Without a fixed ``randomness=dict(seed=...)`` mmengine
    draws a new seed per run; the resumed run gets the checkpoint's seed back (mmengine
    re-seeds, this hook resets the data sampler's seed too).

    Validation passes during training leave the generators as they found them, so the
    training stream does not depend on when (or whether) validation runs: a resumed run
    does not repeat the validation that followed its checkpoint.

    Saved under ``checkpoint['dcls_mm_resume_state']``: the world size, one state dict
    per rank (gathered from all ranks in distributed runs: one small all-gather per
    iteration), the epoch and the number of batches trained in it. Exactness holds with
    ``num_workers=0``; with worker processes the main process's states and the data order
    are restored, but workers restart their own generators, so mid-epoch resumes repeat
    augmentations only if they do not depend on them.

    Args:
        priority: hook priority; it must run before ``CheckpointHook`` (``'VERY_LOW'``)
            in ``after_train_iter``/``after_train_epoch``. Default ``'LOW'``.
    """

    priority = 'LOW'

    def __init__(self, priority: Optional[str] = None) -> None:
        if priority is not None:
            self.priority = priority
        self._batches_done = 0
        self._resumed_batches = 0  # batches of the resumed epoch trained before the resume
        self._gathered: Optional[Sequence[dict]] = None
        self._pending: Optional[dict] = None
        self._val_snapshot: Optional[dict] = None

    # --- validation does not touch the training stream ---------------------------------
    def before_val(self, runner) -> None:
        """Remember the generators' states before a validation pass.

        Args:
            runner: the mmengine runner.
        """
        self._val_snapshot = get_rng_state()

    def after_val(self, runner) -> None:
        """Put the states back: training continues as if validation had not run (a
        resumed run, which does not repeat that validation, then continues identically).

        Args:
            runner: the mmengine runner.
        """
        if self._val_snapshot is not None:
            set_rng_state(self._val_snapshot)
            self._val_snapshot = None

    # --- saving -----------------------------------------------------------------------
    def _training_state(self) -> dict:
        """The states the training stream continues with (pre-validation ones during a
        validation pass, e.g. for a best-metric checkpoint)."""
        return self._val_snapshot if self._val_snapshot is not None else get_rng_state()

    def _gather(self) -> None:
        # before_save_checkpoint runs on rank 0 only: collect every rank's states while
        # all ranks are here
        if get_world_size() > 1:
            self._gathered = all_gather_object(self._training_state())

    def before_train_epoch(self, runner) -> None:
        """Start counting the batches of the epoch.

        Args:
            runner: the mmengine runner.
        """
        self._batches_done, self._resumed_batches = self._resumed_batches, 0

    def after_train_iter(self, runner, batch_idx: int, data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Count the batch; in distributed runs gather the ranks' states.

        Args:
            runner: the mmengine runner.
            batch_idx: index of the batch (unused: resumed epochs restart it at 0).
            data_batch: the batch (unused).
            outputs: the train step outputs (unused).
        """
        self._batches_done += 1
        self._gather()

    def after_train_epoch(self, runner) -> None:
        """Gather the ranks' states for an end-of-epoch checkpoint.

        Args:
            runner: the mmengine runner.
        """
        self._gather()

    def after_val_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        """Gather the ranks' states for a best-metric checkpoint.

        Args:
            runner: the mmengine runner.
            metrics: validation metrics (unused).
        """
        self._gather()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Add the states and the sampler position to ``checkpoint``.

        Args:
            runner: the mmengine runner.
            checkpoint: the dict about to be saved (modified in place).
        """
        world_size = get_world_size()
        if world_size == 1:
            ranks = [self._training_state()]
        else:  # None: saved before any gather (no iteration yet); not restorable
            ranks = None if self._gathered is None else list(self._gathered)
        sampler = _sampler_of(runner.train_dataloader)
        checkpoint[STATE_KEY] = dict(
            version=1, world_size=world_size, rng=ranks, epoch=runner.epoch,
            batches_done=self._batches_done,
            sampler_seed=None if sampler is None else getattr(sampler, 'seed', None))

    # --- resuming ---------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep this rank's saved states for :meth:`before_train`.

        Args:
            runner: the mmengine runner.
            checkpoint: the loaded checkpoint.
        """
        state = checkpoint.get(STATE_KEY)
        self._pending = None
        if not getattr(runner, '_resume', False):
            return  # load_from / testing: weights only, the run starts afresh
        if state is None or state['rng'] is None:
            print_log('resume: the checkpoint holds no random generator states (saved '
                      'without dcls_mm.RNGStateHook); the resumed run will not repeat a '
                      'straight run exactly', logger='current', level=logging.WARNING)
            return
        if state['world_size'] != get_world_size():
            print_log(f'resume: random generator states saved for {state["world_size"]} '
                      f'processes, running {get_world_size()}; not restored',
                      logger='current', level=logging.WARNING)
            return
        self._pending = dict(state, rng=state['rng'][get_rank()])

    def before_train(self, runner) -> None:
        """After a resume: reset the sampler seed and arrange for the states to be
        restored when the loader fetches the first batch after the checkpoint.

        Args:
            runner: the mmengine runner.
        """
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loop = runner.train_loop
        sampler = _sampler_of(loop.dataloader)
        if sampler is not None and state['sampler_seed'] is not None:
            sampler.seed = state['sampler_seed']

        def restore() -> None:
            set_rng_state(state['rng'])

        if isinstance(loop, IterBasedTrainLoop):
            loop.dataloader_iterator = _ResumeIterator(loop.dataloader_iterator, loop.iter,
                                                       restore)
        elif isinstance(loop, EpochBasedTrainLoop):
            skip = state['batches_done'] if loop.epoch == state['epoch'] else 0
            dataloader = loop.dataloader
            if dataloader.batch_sampler is None:
                raise ValueError('RNGStateHook needs a DataLoader with a batch sampler '
                                 '(batch_size set)')
            self._resumed_batches = skip
            # DataLoader forbids re-assigning batch_sampler after construction; its
            # iterators read it afresh, which is what we need
            object.__setattr__(dataloader, 'batch_sampler',
                               _ResumeBatchSampler(dataloader.batch_sampler, skip, restore))
        else:
            print_log(f'resume: {type(loop).__name__} is not an mmengine epoch- or '
                      'iteration-based loop; random states restored now, data position '
                      'as the loop resumes it', logger='current', level=logging.WARNING)
            restore()


def use_reliable_hooks(cfg) -> None:
    """Make a Runner config save atomically and resume exactly (in place): a plain
    ``CheckpointHook`` becomes :class:`~dcls_mm.engine.hooks.AtomicCheckpointHook` and
    :class:`RNGStateHook` is added to ``custom_hooks`` unless it is there. What our
    configs set, for configs that do not inherit from them (``tools/train.py`` calls it).

    Args:
        cfg: an ``mmengine.config.Config`` (or dict) of a Runner.
    """
    def name_of(hook_type) -> str:
        return str(getattr(hook_type, '__name__', hook_type)).split('.')[-1]

    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if checkpoint is not None and name_of(checkpoint.get('type')) == 'CheckpointHook':
        checkpoint['type'] = 'dcls_mm.AtomicCheckpointHook'
    custom = list(cfg.get('custom_hooks') or [])
    if not any(name_of(h.get('type')) == 'RNGStateHook' for h in custom):
        custom.append(dict(type='dcls_mm.RNGStateHook'))
    cfg['custom_hooks'] = custom
