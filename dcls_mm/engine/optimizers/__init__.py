"""Optimizer wrapper constructors."""
from .lr_decay_constructor import (DCLSLearningRateDecayOptimizerConstructor,
                                   get_layer_id_for_convnext, get_stage_id_for_convnext)

__all__ = ['DCLSLearningRateDecayOptimizerConstructor', 'get_layer_id_for_convnext',
           'get_stage_id_for_convnext']
