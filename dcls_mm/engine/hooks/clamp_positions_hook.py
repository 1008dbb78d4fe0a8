"""Clamp DCLS positions to their dilated kernel after every optimizer step."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from mmengine.hooks import Hook

from dcls_mm.registry import HOOKS

from ..utils import DATA_BATCH, dcls_modules, unwrap_model


@HOOKS.register_module()
class ClampPositionsHook(Hook):
    """Call ``clamp_parameters()`` of every DCLS layer after each training iteration,
    keeping positions ``P`` in ``[-(dks // 2), dks // 2]`` (a learning technique of the
    DCLS paper; the published downstream code did not use it).

    Config: ``custom_hooks = [dict(type='dcls_mm.ClampPositionsHook')]``.

    Args:
        interval: clamp every ``interval`` training iterations (default 1: every
            iteration, i.e. after every optimizer step).
        priority: hook priority (default ``'NORMAL'``; the optimizer steps inside
            ``train_step``, before any ``after_train_iter``).
    """

    priority = 'NORMAL'

    def __init__(self, interval: int = 1, priority: Union[int, str, None] = None) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive int, got {interval!r}')
        self.interval = interval
        if priority is not None:
            self.priority = priority

    @staticmethod
    def clamp(model) -> int:
        """Clamp the positions of all DCLS layers of ``model`` (unwrapped first).

        Args:
            model: the model, possibly wrapped (``DistributedDataParallel``...).

        Returns:
            The number of DCLS layers clamped.
        """
        layers = dcls_modules(unwrap_model(model))
        for layer in layers:
            layer.clamp_parameters()
        return len(layers)

    def after_train_iter(self, runner, batch_idx: int, data_batch: DATA_BATCH = None,
                         outputs: Optional[Sequence] = None) -> None:
        """Clamp after the iteration's optimizer step.

        Args:
            runner: the mmengine runner (``runner.model`` is used).
            batch_idx: index of the batch in the epoch.
            data_batch: the batch (unused).
            outputs: the train step outputs (unused).
        """
        if self.every_n_train_iters(runner, self.interval):
            self.clamp(runner.model)
