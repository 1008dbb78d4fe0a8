"""Issue 15 item 2: an EMA / mean-teacher copy of a DCLS model, updated through ``.data``
(which does not bump version counters), must run with its current kernels under
``torch.no_grad()``: outputs equal a freshly built model holding the same weights."""
import copy

import pytest
import torch
from mmengine.model import ExponentialMovingAverage
from torch import nn

from dcls_mm.models import ConvNeXtDCLS


def _backbone():
    torch.manual_seed(0)
    return ConvNeXtDCLS(arch=dict(depths=[1, 1, 2, 1], dims=[8, 8, 16, 16]), kernel_count=3,
                        dilated_kernel_size=5, layer_scale_init_value=1.0)


def _train_step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    sum(f.square().mean() for f in model(x)).backward()
    opt.step()
    model.eval()


def _assert_matches_fresh_model(teacher, x):
    from dcls_mm.ops import Dcls2d
    fresh = _backbone().eval()
    fresh.load_state_dict(teacher.state_dict())
    # the same path as the teacher's layers: the plain and the fast path (whose measured
    # routes may add the taps in another order) agree only up to float rounding
    for mine, theirs in zip(fresh.modules(), teacher.modules()):
        if isinstance(mine, Dcls2d):
            mine.impl = theirs.impl
    with torch.no_grad():
        got, expected = teacher(x), fresh(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mmengine_ema_model_follows_its_updates():
    student = _backbone().eval()
    ema = ExponentialMovingAverage(student, momentum=0.5)
    ema.eval()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        with torch.no_grad():
            ema.module(x)  # evaluation of the EMA model between updates
        _train_step(student, x)
        ema.update_parameters(student)  # p_avg.data updates
        _assert_matches_fresh_model(ema.module, x)


def test_mean_teacher_hook_momentum_update():
    from mmdet.engine.hooks import MeanTeacherHook

    class TeacherStudent(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = _backbone().eval()
            self.teacher = copy.deepcopy(self.student)

    model = TeacherStudent()
    x = torch.randn(2, 3, 32, 32)
    hook = MeanTeacherHook(momentum=0.5)
    for _ in range(2):
        with torch.no_grad():
            before = model.teacher(x)
        _train_step(model.student, x)
        hook.momentum_update(model, 0.5)  # dst.data.mul_(1 - m).add_(src.data, alpha=m)
        _assert_matches_fresh_model(model.teacher, x)
        with torch.no_grad():
            after = model.teacher(x)
        assert not torch.equal(before[-1], after[-1])


@pytest.mark.parametrize('impl', ['auto', 'plain'])
def test_data_update_of_a_shared_position_parameter(impl):
    """Positions shared across a stage's blocks: one ``.data`` update changes every block."""
    from dcls_mm.ops import set_impl
    model = set_impl(_backbone().eval(), impl)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        for name, p in model.named_parameters():
            if name.endswith('.P'):
                p.data.add_(0.37)
    _assert_matches_fresh_model(model, x)
