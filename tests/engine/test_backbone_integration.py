"""The ConvNeXt-dcls backbone with the engine (the layer-decay optimizer constructor) and
with OpenMMLab (an mmdet neck built through the registry)."""
import mmdet.registry
import torch

from dcls_mm.engine import DCLSLearningRateDecayOptimizerConstructor
from dcls_mm.models import ConvNeXtDCLS

from ..models._synthetic import SMALL_ARCH


def _small(**kwargs):
    return ConvNeXtDCLS(arch=SMALL_ARCH, kernel_count=5, dilated_kernel_size=7, **kwargs)


def test_optimizer_constructor_sees_each_shared_position_once():
    model = _small(frozen_stages=0)
    ctor = DCLSLearningRateDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        dict(num_layers=6, decay_rate=0.7, position_lr_mult=5.0))
    optim = ctor(model).optimizer
    names = [n for g in optim.param_groups for n in g['param_names']]
    assert len(names) == len(set(names))
    pos = [(n, g) for g in optim.param_groups for n in g['param_names'] if n.endswith('.P')]
    # one shared P per unfrozen stage, no weight decay
    assert sorted(n for n, _ in pos) == ['stages.1.0.dwconv.P', 'stages.2.0.dwconv.P',
                                         'stages.3.0.dwconv.P']
    assert all(g['weight_decay'] == 0 for _, g in pos)


def test_mmdet_fpn_on_backbone_features():
    registry = mmdet.registry
    backbone = registry.MODELS.build(dict(type='dcls_mm.ConvNeXtDCLS', arch=SMALL_ARCH,
                                          kernel_count=5, dilated_kernel_size=7))
    neck = registry.MODELS.build(dict(type='FPN', in_channels=list(SMALL_ARCH['dims']),
                                      out_channels=8, num_outs=5))
    with torch.no_grad():
        outs = neck(backbone(torch.rand(1, 3, 64, 64)))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
