"""dcls_mm.engine: DCLS-aware optimizer constructor, position clamping and repulsive loss.

Importing this module registers, in the ``dcls_mm`` scope,
``DCLSLearningRateDecayOptimizerConstructor`` (OPTIM_WRAPPER_CONSTRUCTORS),
``ClampPositionsHook``, ``RepulsiveLossHook``, ``RNGStateHook`` and
``AtomicCheckpointHook`` (HOOKS).
"""
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
    'unwrap_model'
]
