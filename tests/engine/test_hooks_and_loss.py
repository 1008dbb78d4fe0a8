"""ClampPositionsHook, repulsive_loss and RepulsiveLossHook."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dcls_mm.engine import ClampPositionsHook, RepulsiveLossHook, repulsive_loss
from dcls_mm.ops import Dcls1d, Dcls2_1d, Dcls2d, Dcls3d

from ._engine_toy import ToyDetector, make_backbone


def slow_repulsive(position_tensors):
    """Explicit double loop over pairs, per kernel; mean over distinct tensors."""
    terms = []
    for P in position_tensors:
        D, K = P.shape[0], P.shape[-1]
        flat = P.detach().double().reshape(D, -1, K)
        G = flat.shape[1]
        total = 0.0
        for g in range(G):
            for a in range(K):
                for b in range(a + 1, K):
                    d = math.sqrt(sum((flat[i, g, a] - flat[i, g, b]).item()**2
                                      for i in range(D)))
                    total += max(0.0, 1.0 - d)
        terms.append(2 * total / (K * (K - 1) * G))
    return sum(terms) / len(terms)


def test_repulsive_loss_matches_double_loop():
    torch.manual_seed(0)
    layers = [Dcls2d(4, 6, 5, dilated_kernel_size=7, groups=2),
              Dcls1d(3, 3, 4, dilated_kernel_size=5, groups=3),
              Dcls3d(2, 2, 3, dilated_kernel_size=5),
              Dcls2_1d(2, 3, 4, dilated_kernel_size=5, dense_kernel_size=3)]
    with torch.no_grad():
        layers[0].P[:, 0, 0, 1] = layers[0].P[:, 0, 0, 0]  # coinciding pair
    model = nn.Sequential(*layers)
    expected = slow_repulsive([layer.P for layer in layers])
    assert 0 < expected < 1
    got = repulsive_loss(model)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert repulsive_loss(layers).item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert all(torch.isfinite(layer.P.grad).all() for layer in layers)
    assert layers[0].P.grad.abs().sum() > 0


def test_repulsive_loss_far_apart_is_zero_and_shared_counted_once():
    layer = Dcls2d(1, 1, 3, dilated_kernel_size=9)
    with torch.no_grad():
        layer.P.copy_(torch.tensor([[-4., 0., 4.], [0., 0., 0.]]).view(2, 1, 1, 3))
    assert repulsive_loss(layer).item() == 0.0
    backbone = make_backbone((2, 2, 3, 2))
    distinct = [stage[0].dwconv.P for stage in backbone.stages]
    assert repulsive_loss(backbone).item() == pytest.approx(slow_repulsive(distinct), rel=1e-5)
    assert repulsive_loss(nn.Linear(2, 2)).item() == 0.0


def runner_stub(model, it=0, epoch=0):
    return SimpleNamespace(model=model, iter=it, epoch=epoch)


def test_clamp_positions_hook_clamps_wrapped_model():
    model = ToyDetector(make_backbone((2, 2, 3, 2), dks=5))
    extra = Dcls2d(2, 2, 3, dilated_kernel_size=(7, 3))
    model.extra = extra
    with torch.no_grad():
        for p in (model.backbone.stages[2][0].dwconv.P, extra.P):
            p.uniform_(-20, 20)
            p[..., 0] = 100.0
    hook = ClampPositionsHook()
    wrapped = nn.DataParallel(model)  # unwrapped by the hook
    hook.after_train_iter(runner_stub(wrapped), batch_idx=0)
    P = model.backbone.stages[2][0].dwconv.P
    assert P.abs().max().item() == 2.0 and (P[..., 0] == 2.0).all()
    assert extra.P[0].abs().max().item() == 3.0 and extra.P[1].abs().max().item() == 1.0
    assert (extra.P[0, ..., 0] == 3.0).all() and (extra.P[1, ..., 0] == 1.0).all()


def test_clamp_hook_interval():
    layer = Dcls2d(1, 1, 2, dilated_kernel_size=3)
    hook = ClampPositionsHook(interval=2)
    with torch.no_grad():
        layer.P.fill_(5.0)
    hook.after_train_iter(runner_stub(layer, it=0), batch_idx=0)  # iter 1 of 2: no clamp
    assert layer.P.max().item() == 5.0
    hook.after_train_iter(runner_stub(layer, it=1), batch_idx=1)
    assert layer.P.max().item() == 1.0
    with pytest.raises(ValueError):
        ClampPositionsHook(interval=0)


def test_repulsive_loss_hook_adds_loss_and_grads_reach_positions():
    model = ToyDetector(make_backbone((2, 2, 3, 2)))
    hook = RepulsiveLossHook(loss_weight=3.0, power=2, begin_iter=2)
    x = torch.randn(1, 3, 64, 64)
    hook.before_train(runner_stub(nn.DataParallel(model)))
    hook.before_train_iter(runner_stub(model, it=1), batch_idx=1)
    assert set(model(x, mode='loss')) == {'loss_cls'}  # not active yet
    hook.before_train_iter(runner_stub(model, it=2), batch_idx=2)
    losses = model(x, mode='loss')
    expected = 3.0 * repulsive_loss(model).item()**2
    assert losses['loss_repulsive'].item() == pytest.approx(expected, rel=1e-5)
    model.zero_grad()
    losses['loss_repulsive'].backward()
    P = model.backbone.stages[0][0].dwconv.P
    assert P.grad is not None and P.grad.abs().sum() > 0
    assert model.backbone.stages[0][0].pwconv1.weight.grad is None
    hook.after_train(runner_stub(model))
    assert 'loss' not in model.__dict__
    assert set(model(x, mode='loss')) == {'loss_cls'}


def test_repulsive_loss_hook_begin_epoch():
    hook = RepulsiveLossHook(begin_epoch=20)
    hook.before_train_iter(runner_stub(None, it=10**6, epoch=19), batch_idx=0)
    assert not hook.active
    hook.before_train_iter(runner_stub(None, it=10**6, epoch=20), batch_idx=0)
    assert hook.active


def test_hooks_in_mmengine_runner(tmp_path):
    """Both hooks and the constructor from config dicts, in a real mmengine Runner."""
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class PushPositionsOut(Hook):
        priority = 'HIGH'  # after_train_iter runs before ClampPositionsHook (NORMAL)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            with torch.no_grad():
                runner.model.backbone.stages[2][0].dwconv.P.add_(100.0)

    class Model(BaseModel):

        def __init__(self):
            super().__init__()
            self.backbone = make_backbone((1, 1, 3, 1), dks=5)
            self.neck = nn.Conv2d(4, 4, 1)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            if mode == 'loss':
                return self.loss(inputs)
            return self.neck(self.backbone(inputs)[-1])

        def loss(self, inputs):
            return dict(loss_cls=self.forward(inputs).pow(2).mean())

    class Data(torch.utils.data.Dataset):

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return dict(inputs=torch.randn(3, 32, 32))

    model = Model()
    runner = Runner(
        model=model, work_dir=str(tmp_path),
        train_dataloader=dict(dataset=Data(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=3, val_interval=100),
        optim_wrapper=dict(constructor='dcls_mm.DCLSLearningRateDecayOptimizerConstructor',
                           optimizer=dict(type='SGD', lr=0.01, weight_decay=0.05),
                           paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise',
                                              num_layers=6, position_lr_mult=5.0)),
        custom_hooks=[PushPositionsOut(), dict(type='dcls_mm.ClampPositionsHook'),
                      dict(type='dcls_mm.RepulsiveLossHook', loss_weight=1e3, begin_iter=1)],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1), checkpoint=None),
        log_level='WARNING')
    runner.train()
    # PushPositionsOut moved stage 2's positions by +100; the hook clamped them to +2
    assert (model.backbone.stages[2][0].dwconv.P == 2.0).all()
    for P in (s[0].dwconv.P for s in model.backbone.stages):
        assert P.abs().max().item() <= 2.0
    history = runner.message_hub.get_scalar('train/loss_repulsive')
    assert len(history.data[0]) == 2  # iterations 1 and 2 (begin_iter=1)
    assert 'loss' not in model.__dict__  # wrapper removed after training
    groups = {g['group_name'] for g in runner.optim_wrapper.optimizer.param_groups}
    assert 'layer_1_position' in groups
