"""dcls-mm's scoped MMEngine registries.

Each registry is a child of MMEngine's root registry of the same kind, with scope
``'dcls_mm'`` and ``locations`` listing the modules that register into it. Because
MMEngine imports ``<scope>.registry`` when it meets a scoped key, any OpenMMLab config
(mmdet, mmseg, mmpretrain...) can say ``type='dcls_mm.ConvNeXtDCLS'`` without
``custom_imports``: the registry tree resolves the ``dcls_mm`` scope, and this module's
``locations`` import the implementation on first use.

Contract for contributors: register a class in the registry of its kind, from a module
listed in that registry's ``locations``; never import OpenMMLab downstream packages
(mmdet, mmseg) from ``dcls_mm.ops`` or ``dcls_mm.models``.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

#: Backbones, layers and losses.
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='dcls_mm',
                  locations=['dcls_mm.models'])
#: Optimizer wrapper constructors (DCLS-aware lr decay).
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optimizer wrapper constructor',
                                      parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
                                      scope='dcls_mm', locations=['dcls_mm.engine'])
#: Training hooks (position clamping, repulsive loss).
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='dcls_mm', locations=['dcls_mm.engine'])
#: Data sets.
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='dcls_mm',
                    locations=['dcls_mm.datasets'])
#: Robustness metrics.
METRICS = Registry('metric', parent=MMENGINE_METRICS, scope='dcls_mm',
                   locations=['dcls_mm.evaluation'])
#: Data transforms (``dcls_mm.Corrupt``).
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='dcls_mm',
                      locations=['dcls_mm.datasets'])
