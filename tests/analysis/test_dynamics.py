"""Position speeds (dcls_mm.analysis.dynamics): the formula on hand-made checkpoints,
and a real mmengine run (its checkpoints and logged learning rate)."""
import csv
import itertools

import pytest
import torch
from mmengine.model import BaseModel

from dcls_mm.analysis.dynamics import (find_checkpoints, position_speeds,
                                       read_learning_rates, run_position_dynamics)
from dcls_mm.models import ConvNeXtDCLS

_names = itertools.count()


def _save(path, state, epoch, it, lr=None):
    checkpoint = {'state_dict': state, 'meta': {'epoch': epoch, 'iter': it}}
    if lr is not None:  # mmengine's optimizer state: the lr of the next iteration
        checkpoint['optimizer'] = {'state': {}, 'param_groups': [{'lr': lr, 'params': [0]}]}
    torch.save(checkpoint, path)


def test_speed_formula_on_hand_made_checkpoints(tmp_path):
    P0 = torch.zeros(2, 4, 1, 3)
    P1 = P0.clone()
    P1[0, 0, 0, 0], P1[1, 0, 0, 0] = 3.0, 4.0   # one element moves by 5 cells
    P1[1, 1, 0, 2] = -1.0                         # another by 1
    other = torch.full((2, 2, 1, 5), 0.5)
    state0 = {'backbone.stages.0.0.dwconv.P': P0, 'backbone.stages.0.1.dwconv.P': P0,
              'backbone.stages.1.0.dwconv.P': other, 'backbone.stages.1.0.dwconv.weight': P0[0]}
    state1 = dict(state0, **{'backbone.stages.0.0.dwconv.P': P1,
                             'backbone.stages.0.1.dwconv.P': P1})
    a, b = str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')
    _save(a, state0, 1, 10, lr=0.1)
    _save(b, state1, 3, 30, lr=0.01)
    rows = position_speeds([a, b])
    assert rows[0]['lr'] == 0.1  # no log: the lr `a` holds for the iterations after it
    assert position_speeds([a, b], [(10, 9.0), (11, 0.2), (30, 0.4), (31, 9.0)])[0]['lr'] \
        == pytest.approx(0.3)  # logged: mean over the iterations 11..30
    assert [r['group'] for r in rows] == ['stage0', 'stage1']
    # stage 0: 24 elements (two blocks of 12, shared), displacements 5 and 1 in each block
    assert rows[0]['mean_displacement'] == pytest.approx(2 * (5 + 1) / 24)
    assert rows[0]['interval'] == 2 and rows[0]['unit'] == 'epoch'
    assert rows[0]['speed'] == pytest.approx(12 / 24 / 2)
    assert rows[1]['speed'] == 0
    _save(b, {'backbone.stages.0.0.dwconv.P': P1}, 3, 30)
    with pytest.raises(ValueError, match='different position tensors'):
        position_speeds([a, b])
    _save(b, state1, 1, 10)
    with pytest.raises(ValueError, match='same'):
        position_speeds([a, b])


class _Dataset(torch.utils.data.Dataset):
    metainfo = dict(classes=('a', ))

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return dict(inputs=torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(index)))


class _Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.backbone = ConvNeXtDCLS(dict(depths=[2, 1, 1, 1], dims=[4, 4, 4, 4]),
                                     dilated_kernel_size=5, kernel_count=3,
                                     layer_scale_init_value=1.0)

    def forward(self, inputs, data_samples=None, mode='loss'):
        out = self.backbone(torch.stack(inputs))[-1]
        return dict(loss=out.pow(2).mean())


def test_real_run_speeds_and_learning_rate(tmp_path):
    from mmengine.runner import Runner
    runner = Runner(
        model=_Model(), work_dir=str(tmp_path), experiment_name=f'dyn{next(_names)}',
        train_dataloader=dict(dataset=_Dataset(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        param_scheduler=dict(type='MultiStepLR', milestones=[2], gamma=0.1, by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=3),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        log_level='WARNING')
    runner.train()
    ckpts = find_checkpoints(str(tmp_path))
    assert [c.rsplit('/', 1)[1] for c in ckpts] == ['epoch_1.pth', 'epoch_2.pth', 'epoch_3.pth']
    # the logged lr: epochs 1-2 (iterations 1-4) at 0.5, epoch 3 at 0.05
    lrs = read_learning_rates(str(tmp_path))
    assert [s for s, _ in lrs] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in lrs] == pytest.approx([0.5] * 4 + [0.05] * 2)
    result = run_position_dynamics(str(tmp_path / 'out'), str(tmp_path))
    rows = result['rows']
    assert len(rows) == 2 * 4 and {r['unit'] for r in rows} == {'epoch'}
    # independent check: a plain loop over the elements of stage 0 (shared positions)
    states = [torch.load(c, weights_only=False)['state_dict'] for c in ckpts]
    for k, row in enumerate(r for r in rows if r['group'] == 'stage0'):
        a, b = (s['backbone.stages.0.0.dwconv.P'] for s in states[k:k + 2])
        dists = [float(((b[:, c, 0, e] - a[:, c, 0, e]) ** 2).sum().sqrt())
                 for c in range(4) for e in range(3)]
        assert row['speed'] == pytest.approx(sum(dists) / len(dists))
        assert row['speed'] > 0
    # the lr of the iterations that moved the positions: 3-4 at 0.5, 5-6 at 0.05
    assert rows[0]['lr'] == pytest.approx(0.5) and rows[-1]['lr'] == pytest.approx(0.05)
    with open(tmp_path / 'out' / 'position_speeds.csv') as f:
        assert len(list(csv.DictReader(f))) == 8
    assert (tmp_path / 'out' / 'learning_rate.csv').exists()
    assert (tmp_path / 'out' / 'position_speeds.png').stat().st_size > 0
    with pytest.raises(ValueError, match='at least two'):
        find_checkpoints(str(tmp_path / 'out'))
