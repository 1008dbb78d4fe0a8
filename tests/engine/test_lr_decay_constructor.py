"""DCLSLearningRateDecayOptimizerConstructor against the tables of docs/recipes.md
("Layer-wise and stage-wise lr decay")."""
import re

import pytest
import torch

from mmdet.engine.optimizers.layer_decay_optimizer_constructor import \
    LearningRateDecayOptimizerConstructor as MMDetLearningRateDecayOptimizerConstructor
from mmengine.optim import build_optim_wrapper
from mmseg.engine.optimizers.layer_decay_optimizer_constructor import \
    LearningRateDecayOptimizerConstructor as MMSegLearningRateDecayOptimizerConstructor

from dcls_mm.engine import DCLSLearningRateDecayOptimizerConstructor
from dcls_mm.models import ConvNeXtDCLS

from ._engine_toy import ToyDetector, make_backbone

BASE_LR, WD = 2e-4, 0.05
T_DEPTHS, SB_DEPTHS = (3, 3, 9, 3), (3, 3, 27, 3)
# docs/recipes.md, "Worked example, ConvNeXt-T, decay 0.7, N = 6: ids 0 to 7 get ..."
T_LAYER_TABLE = [0.0824, 0.1176, 0.1681, 0.2401, 0.343, 0.49, 0.7, 1.0]


def expected_layer_id(local, n):
    """docs/recipes.md `layer_wise` ids, written out case by case (local = name w/o backbone.)."""
    parts = local.split('.')
    if parts[0] == 'downsample_layers':
        return {'0': 0, '1': 2, '2': 3, '3': n}[parts[1]]
    if parts[0] == 'stages':
        s, b = parts[1], int(parts[2])
        if s == '0':
            return 1
        if s == '1':
            return 2
        if s == '2':
            return 3 + b // 3
        if s == '3':
            return n
    return n + 1


def expected_stage_id(local, n):
    parts = local.split('.')
    if parts[0] == 'downsample_layers':
        return 0
    if parts[0] == 'stages':
        return int(parts[1]) + 1
    return n + 1


def build(model, **paramwise):
    ctor = DCLSLearningRateDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=WD)),
        paramwise)
    return ctor(model).optimizer


def param_table(optimizer):
    """name -> (group, lr, wd), asserting each parameter appears once."""
    table, ids = {}, set()
    for group in optimizer.param_groups:
        assert len(group['params']) == len(group['param_names'])
        for name, p in zip(group['param_names'], group['params']):
            assert id(p) not in ids and name not in table
            ids.add(id(p))
            table[name] = (group['group_name'], group['lr'], group['weight_decay'])
    return table


def is_position(name):
    return re.search(r'dwconv\.(P|SIG)$', name) is not None


def check(model, optimizer, scale_of, position_mult=1.0, prefix='backbone.'):
    table = param_table(optimizer)
    names = [n for n, p in model.named_parameters()]
    assert sorted(table) == sorted(names)  # every parameter exactly once
    for name, p in model.named_parameters():
        group, lr, wd = table[name]
        local = name[len(prefix):] if name.startswith(prefix) else '<outside>'
        scale = scale_of(local)
        if is_position(name):
            assert wd == 0.0 and group.endswith('_position'), name
            assert lr == pytest.approx(BASE_LR * scale * position_mult, rel=1e-3), name
        else:
            no_decay = p.ndim == 1 or name.endswith('.bias')
            assert wd == (0.0 if no_decay else WD), name
            assert group.endswith('_no_decay' if no_decay else '_decay'), name
            assert lr == pytest.approx(BASE_LR * scale, rel=1e-3), name
    return table


def test_tiny_layer_wise_matches_table():
    model = ToyDetector(make_backbone(T_DEPTHS))
    opt = build(model, decay_rate=0.7, decay_type='layer_wise', num_layers=6)
    table = check(model, opt, lambda local: T_LAYER_TABLE[expected_layer_id(local, 6)])
    # spot checks written from the recipes table
    assert table['backbone.downsample_layers.0.0.weight'][1] == pytest.approx(0.0824 * BASE_LR,
                                                                              rel=1e-3)
    assert table['backbone.stages.2.8.pwconv1.weight'][1] == pytest.approx(0.49 * BASE_LR,
                                                                           rel=1e-3)
    assert table['backbone.stages.3.0.gamma'][1:] == (pytest.approx(0.7 * BASE_LR), 0.0)
    assert table['neck.weight'][1:] == (pytest.approx(BASE_LR), WD)
    assert table['backbone.norm3.weight'][1:] == (pytest.approx(BASE_LR), 0.0)
    # group naming like mmdet
    names = {g['group_name'] for g in opt.param_groups}
    assert {'layer_0_decay', 'layer_0_no_decay', 'layer_7_decay', 'layer_7_no_decay',
            'layer_1_position', 'layer_3_position', 'layer_6_position'} <= names


@pytest.mark.parametrize('decay', [0.7, 0.8])
def test_small_base_layer_wise(decay):
    model = ToyDetector(make_backbone(SB_DEPTHS))
    opt = build(model, decay_rate=decay, decay_type='layer_wise', num_layers=12)
    table = check(model, opt, lambda local: decay**(13 - expected_layer_id(local, 12)))
    # stage 2 blocks 24..26 -> id 11; stage 3 -> id 12; downsample 0 -> id 0
    assert table['backbone.stages.2.26.pwconv2.weight'][1] == pytest.approx(decay * decay *
                                                                            BASE_LR)
    assert table['backbone.downsample_layers.0.0.weight'][1] == pytest.approx(
        decay**13 * BASE_LR)
    if decay == 0.7:
        assert decay**13 == pytest.approx(0.009689, rel=1e-3)


@pytest.mark.parametrize('depths,n,table', [
    (T_DEPTHS, 6, {0: 0.4783, 1: 0.5314, 2: 0.5905, 3: 0.6561, 4: 0.729, 7: 1.0}),
    (SB_DEPTHS, 12, {0: 0.2542, 1: 0.2824, 2: 0.3138, 3: 0.3487, 4: 0.3874, 13: 1.0}),
])
def test_stage_wise(depths, n, table):
    model = ToyDetector(make_backbone(depths))
    opt = build(model, decay_rate=0.9, decay_type='stage_wise', num_layers=n)
    check(model, opt, lambda local: table[expected_stage_id(local, n)])


def test_positions_no_decay_and_lr_mult_shared_once():
    backbone = make_backbone(T_DEPTHS)
    model = ToyDetector(backbone)
    opt = build(model, decay_rate=0.7, decay_type='layer_wise', num_layers=6,
                position_lr_mult=5.0)
    check(model, opt, lambda local: T_LAYER_TABLE[expected_layer_id(local, 6)],
          position_mult=5.0)
    positions = [p for g in opt.param_groups if g['group_name'].endswith('_position')
                 for p in g['params']]
    # share_positions: one P per stage, each added once, identified as the modules' P
    assert len(positions) == 4
    assert {id(p) for p in positions} == {id(s[0].dwconv.P) for s in backbone.stages}
    assert all(s[j].dwconv.P is s[0].dwconv.P for s in backbone.stages for j in range(len(s)))
    # stage 2's shared P follows block 0 (id 3): 0.2401 * 5
    stage2 = [g for g in opt.param_groups if any(p is backbone.stages[2][0].dwconv.P
                                                 for p in g['params'])][0]
    assert stage2['lr'] == pytest.approx(0.2401 * 5 * BASE_LR, rel=1e-3)
    assert stage2['weight_decay'] == 0.0


def test_unshared_positions_and_sig_found_by_module_type():
    backbone = make_backbone((1, 1, 4, 1), share_positions=False)
    from dcls_mm.ops import Dcls2d
    backbone.stages[1][0].dwconv = Dcls2d(4, 4, 3, padding=2, dilated_kernel_size=5, groups=4,
                                          interpolation='gauss')
    # a DCLS layer outside the backbone, with a name that does not say 'dwconv'
    model = ToyDetector(backbone)
    model.extra = Dcls2d(4, 4, 2, padding=1, dilated_kernel_size=3)
    opt = build(model, decay_rate=0.7, num_layers=6, position_lr_mult=5.0)
    table = param_table(opt)
    assert table['backbone.stages.1.0.dwconv.SIG'][0] == 'layer_2_position'
    assert table['extra.P'] == ('layer_7_position', pytest.approx(5 * BASE_LR), 0.0)
    assert table['extra.weight'] == ('layer_7_decay', pytest.approx(BASE_LR), WD)
    for j in range(4):  # no sharing: one P per block, each with its block's id
        assert table[f'backbone.stages.2.{j}.dwconv.P'][0] == f'layer_{3 + j // 3}_position'


def test_model_without_backbone_is_the_backbone():
    model = make_backbone(T_DEPTHS)
    opt = build(model, decay_rate=0.7, num_layers=6)
    check(model, opt, lambda local: T_LAYER_TABLE[expected_layer_id(local, 6)], prefix='')
    table = param_table(opt)
    assert table['stages.0.1.pwconv1.weight'][1] == pytest.approx(0.1176 * BASE_LR, rel=1e-3)


def test_frozen_parameters_skipped():
    model = ToyDetector(make_backbone((1, 1, 3, 1)))
    for p in model.backbone.downsample_layers[0].parameters():
        p.requires_grad_(False)
    table = param_table(build(model, decay_rate=0.7, num_layers=6))
    assert not any(n.startswith('backbone.downsample_layers.0.') for n in table)


def test_build_optim_wrapper_from_config():
    model = ToyDetector(make_backbone(T_DEPTHS))
    cfg = dict(type='OptimWrapper',
               constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
               optimizer=dict(type='AdamW', lr=BASE_LR, betas=(0.9, 0.999), weight_decay=WD),
               paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6,
                                  position_lr_mult=5.0))
    wrapper = build_optim_wrapper(model, cfg)
    assert isinstance(wrapper.optimizer, torch.optim.AdamW)
    check(model, wrapper.optimizer, lambda local: T_LAYER_TABLE[expected_layer_id(local, 6)],
          position_mult=5.0)
    # one optimisation step runs with the extra group keys
    loss = model.loss(torch.randn(1, 3, 64, 64))['loss_cls']
    wrapper.update_params(loss)


@pytest.mark.parametrize('bad', [dict(decay_rate=0.7), dict(num_layers=6),
                                 dict(decay_rate=0.7, num_layers=6, decay_type='block_wise')])
def test_invalid_paramwise_cfg(bad):
    with pytest.raises(ValueError):
        DCLSLearningRateDecayOptimizerConstructor(
            dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4)), bad)


def test_real_backbone():
    backbone = ConvNeXtDCLS(arch='atto', dilated_kernel_size=5, kernel_count=3)
    model = ToyDetector(backbone, dim=backbone.norm3.weight.shape[0])
    opt = build(model, decay_rate=0.7, num_layers=6, position_lr_mult=5.0)
    check(model, opt, lambda local: T_LAYER_TABLE[expected_layer_id(local, 6)],
          position_mult=5.0)
    n_positions = sum(len(g['params']) for g in opt.param_groups
                      if g['group_name'].endswith('_position'))
    assert n_positions == 4  # share_positions=True by default


@pytest.mark.parametrize('upstream', [MMDetLearningRateDecayOptimizerConstructor,
                                      MMSegLearningRateDecayOptimizerConstructor],
                         ids=['mmdet', 'mmseg'])
@pytest.mark.parametrize('decay_type,rate,n', [('layer_wise', 0.7, 6), ('stage_wise', 0.9, 12)])
def test_same_lr_and_wd_as_upstream_except_positions(upstream, decay_type, rate, n):
    """Upstream's constructor (it requires 'ConvNeXt' in the backbone's class name)."""
    model = ToyDetector(make_backbone(SB_DEPTHS if n == 12 else T_DEPTHS))
    optim_cfg = dict(type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=WD))
    paramwise = dict(decay_rate=rate, decay_type=decay_type, num_layers=n)
    ref = param_table(upstream(optim_cfg, paramwise)(model).optimizer)
    ours = param_table(build(model, **paramwise))
    assert sorted(ref) == sorted(ours)
    for name, (_, lr, wd) in ours.items():
        assert lr == pytest.approx(ref[name][1], rel=1e-9), name
        if is_position(name):
            assert (ref[name][2], wd) == (WD, 0.0)  # upstream decays the 4-D positions
        else:
            assert wd == ref[name][2], name
