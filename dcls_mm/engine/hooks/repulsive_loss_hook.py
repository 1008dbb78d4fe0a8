"""Add the DCLS repulsive loss to any model's ``loss`` without changing model code."""
from __future__ import annotations

from typing import Union

from mmengine.hooks import Hook
from mmengine.logging import print_log

from dcls_mm.registry import HOOKS

from ..losses import repulsive_loss
from ..utils import DATA_BATCH, dcls_modules, unwrap_model


@HOOKS.register_module()
class RepulsiveLossHook(Hook):
    """Add ``loss_repulsive = loss_weight * repulsive_loss(model) ** power`` to the
    losses dict of the model.

    At ``before_train`` the hook replaces the unwrapped model's ``loss`` method by an
    instance attribute that calls the original and, once active, adds the
    ``loss_repulsive`` key; the standard ``train_step`` (``parse_losses``) then logs it
    and back-propagates it into the DCLS positions. This works for mmdet detectors and
    mmseg segmentors (their ``forward(mode='loss')`` calls ``self.loss``). The original
    method is restored at ``after_train``. See :func:`dcls_mm.engine.repulsive_loss`.

    The term is active from the training iteration ``begin_iter`` AND the epoch
    ``begin_epoch`` on (both 0-based; the DCLS ImageNet recipe started at epoch 20).

    Config: ``custom_hooks = [dict(type='dcls_mm.RepulsiveLossHook', loss_weight=1.0)]``.

    Args:
        loss_weight: multiplier of the term.
        power: exponent applied to the repulsive loss (2 in the paper: ``rep ** 2``).
        begin_epoch: first (0-based) epoch with the term.
        begin_iter: first (0-based) global iteration with the term.
        priority: hook priority (default ``'NORMAL'``).
    """

    priority = 'NORMAL'

    def __init__(self, loss_weight: float = 1.0, power: float = 2, begin_epoch: int = 0,
                 begin_iter: int = 0, priority: Union[int, str, None] = None) -> None:
        if begin_epoch < 0 or begin_iter < 0:
            raise ValueError('begin_epoch and begin_iter must be >= 0')
        self.loss_weight = float(loss_weight)
        self.power = power
        self.begin_epoch = begin_epoch
        self.begin_iter = begin_iter
        if priority is not None:
            self.priority = priority
        self.active = False
        self._model = None

    def compute(self, model) -> 'torch.Tensor':  # noqa: F821
        """The weighted term for ``model`` (regardless of ``begin_*``).

        Args:
            model: the (unwrapped) model.
        """
        return self.loss_weight * repulsive_loss(model)**self.power

    def wrap(self, model) -> None:
        """Install the ``loss`` wrapper on ``model`` (unwrapped first).

        Args:
            model: the model, possibly wrapped (``DistributedDataParallel``...).
        """
        model = unwrap_model(model)
        if not dcls_modules(model):
            print_log('RepulsiveLossHook: the model has no DCLS layer; no loss added.',
                      logger='current', level=30)
            return
        if not callable(getattr(model, 'loss', None)):
            raise TypeError(f'RepulsiveLossHook needs a model with a loss() method, '
                            f'got {type(model).__name__}')
        if getattr(model.loss, '_dcls_repulsive_hook', None) is self:
            return
        original = model.loss

        def loss(*args, **kwargs):
            losses = original(*args, **kwargs)
            if self.active:
                if 'loss_repulsive' in losses:
                    raise KeyError('the losses dict already has a loss_repulsive key')
                losses['loss_repulsive'] = self.compute(model)
            return losses

        loss._dcls_repulsive_hook = self
        loss._dcls_original = original
        model.loss = loss
        self._model = model

    def unwrap(self) -> None:
        """Restore the model's original ``loss`` method."""
        model, self._model = self._model, None
        if model is not None and getattr(model.__dict__.get('loss'), '_dcls_repulsive_hook',
                                         None) is self:
            del model.loss

    def before_train(self, runner) -> None:
        """Install the wrapper on ``runner.model``.

        Args:
            runner: the mmengine runner.
        """
        self.wrap(runner.model)

    def before_train_iter(self, runner, batch_idx: int, data_batch: DATA_BATCH = None) -> None:
        """Switch the term on once ``begin_epoch`` and ``begin_iter`` are reached.

        Args:
            runner: the mmengine runner (``runner.iter``, ``runner.epoch``).
            batch_idx: index of the batch in the epoch.
            data_batch: the batch (unused).
        """
        self.active = runner.iter >= self.begin_iter and runner.epoch >= self.begin_epoch

    def after_train(self, runner) -> None:
        """Restore the original ``loss`` and switch the term off.

        Args:
            runner: the mmengine runner.
        """
        self.active = False
        self.unwrap()
