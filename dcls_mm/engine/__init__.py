"""dcls_mm.engine: DCLS-aware optimizer constructor, position clamping and repulsive loss.

Importing this module registers, in the ``dcls_mm`` scope,
``DCLSLearningRateDecayOptimizerConstructor`` (OPTIM_WRAPPER_CONSTRUCTORS),
``ClampPositionsHook``, ``RepulsiveLossHook``, ``RNGStateHook`` and
``AtomicCheckpointHook`` (HOOKS), and calls :func:`register_checkpoint_loader`: from then
on mmengine reads local checkpoints through dcls-mm's checked reader (under torch >= 2.6
the only way mmengine can resume from its own training checkpoints; a crafted file is
still refused). The configs' ``custom_imports`` and the tools (through
:func:`dcls_mm.engine.runner_utils.setup_dcls_mm`) import this module; importing
:mod:`dcls_mm.models` alone changes nothing in mmengine.
"""
from dcls_mm.utils.checkpoint_io import register_checkpoint_loader

from .hooks import AtomicCheckpointHook, ClampPositionsHook, RepulsiveLossHook, RNGStateHook
from .losses import layer_repulsive_loss, repulsive_loss
from .optimizers import (DCLSLearningRateDecayOptimizerConstructor, get_layer_id_for_convnext,
                         get_stage_id_for_convnext)
from .utils import dcls_modules, is_dcls_module, position_parameters, unwrap_model

__all__ = [
    'DCLSLearningRateDecayOptimizerConstructor', 'ClampPositionsHook', 'RepulsiveLossHook',
    'RNGStateHook', 'AtomicCheckpointHook',
    'repulsive_loss', 'layer_repulsive_loss', 'get_layer_id_for_convnext',
    'get_stage_id_for_convnext', 'dcls_modules', 'is_dcls_module', 'position_parameters',
    'unwrap_model', 'register_checkpoint_loader'
]

register_checkpoint_loader()
