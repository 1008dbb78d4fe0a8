"""Position statistics (dcls_mm.analysis.positions) on positions set by hand."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dcls_mm.analysis.positions import collect_positions, position_stats, run_positions
from dcls_mm.models import ConvNeXtDCLS
from dcls_mm.ops import Dcls2d

# channel 0: (0, 0), (0.3, -0.2) share cell (3, 3); (3, 3) sits at the limit (corner).
# channel 1: (-3, 1.6) at the limit along y, cell (0, 5); (1, 1) and (1.4, 0.6) share
# cell (4, 4).  (y, x) per element; dilated kernel 7 (cells 0..6, centre 3).
HAND = [[(0.0, 0.0), (0.3, -0.2), (3.0, 3.0)], [(-3.0, 1.6), (1.0, 1.0), (1.4, 0.6)]]


class TwoLayers(nn.Module):
    def __init__(self, version='bilinear'):
        super().__init__()
        self.first = Dcls2d(2, 2, 3, padding=3, dilated_kernel_size=7, groups=2, interpolation=version)
        self.second = Dcls2d(2, 2, 3, padding=3, dilated_kernel_size=7, groups=2, interpolation=version)
        with torch.no_grad():
            P = torch.tensor(HAND).permute(2, 0, 1).unsqueeze(2)  # (2, C, 1, K)
            self.first.P.copy_(P)
            self.second.P.copy_(P * 0)


def test_hand_set_positions_are_counted_exactly():
    groups = collect_positions(TwoLayers())
    assert list(groups) == ['first', 'second']
    s = position_stats(groups['first'])
    expected = np.zeros((7, 7), int)
    for cell in [(3, 3), (3, 3), (6, 6), (0, 5), (4, 4), (4, 4)]:
        expected[cell] += 1
    np.testing.assert_array_equal(np.array(s['cell_counts']), expected)
    assert s['num_elements'] == 6 and s['num_kernels'] == 2 and s['kernel_count'] == 3
    assert s['at_limit'] == 2 and s['at_limit_fraction'] == pytest.approx(2 / 6)
    assert s['overlapping'] == 4  # two pairs
    dists = [math.hypot(y, x) for kernel in HAND for y, x in kernel]
    assert s['distance']['mean'] == pytest.approx(np.mean(dists))
    assert s['distance']['max'] == pytest.approx(max(dists))
    assert sum(s['distance']['counts']) == 6
    # all six elements of `second` are at the centre: one cell, every element overlaps
    s2 = position_stats(groups['second'])
    assert s2['cell_counts'][3][3] == 6 and s2['overlapping'] == 6 and s2['at_limit'] == 0


def test_shared_stage_positions_counted_once():
    model = ConvNeXtDCLS(dict(depths=[3, 1, 1, 1], dims=[4, 4, 4, 4]), kernel_count=5,
                         dilated_kernel_size=9)
    groups = collect_positions(model)
    assert list(groups) == ['stage0', 'stage1', 'stage2', 'stage3']
    assert len(groups['stage0'].layers) == 3
    assert groups['stage0'].positions.shape == (2, 4, 5)  # shared: 4 channels x 5, once
    unshared = ConvNeXtDCLS(dict(depths=[3, 1, 1, 1], dims=[4, 4, 4, 4]), kernel_count=5,
                            dilated_kernel_size=9, share_positions=False)
    assert collect_positions(unshared)['stage0'].positions.shape == (2, 12, 5)


def test_gaussian_widths():
    model = TwoLayers('gaussian')
    with torch.no_grad():
        model.first.SIG[0].fill_(-0.73)   # width |SIG| + 0.27 = 1.0 along y
        model.first.SIG[1].fill_(0.23)    # 0.5 along x
    s = position_stats(collect_positions(model)['first'])
    assert s['width']['mean'] == pytest.approx([1.0, 0.5])
    assert 'width' not in position_stats(collect_positions(TwoLayers())['first'])


def test_run_positions_writes_json_and_pictures(tmp_path):
    result = run_positions(TwoLayers('triangle'), str(tmp_path), channels=(0, 1, 5))
    assert json.loads((tmp_path / 'positions.json').read_text()) == result
    assert result['groups']['first']['interpolation'] == 'triangle'
    assert (tmp_path / 'positions.png').stat().st_size > 0
    assert (tmp_path / 'kernels.png').stat().st_size > 0
    with pytest.raises(ValueError, match='no DCLS layer'):
        run_positions(nn.Conv2d(1, 1, 3), str(tmp_path))


def test_1d_and_3d_layers(tmp_path):
    from dcls_mm.ops import Dcls1d, Dcls3d
    one = Dcls1d(1, 1, 4, padding=2, dilated_kernel_size=5)
    three = Dcls3d(1, 1, 2, padding=1, dilated_kernel_size=3)
    with torch.no_grad():
        one.P.copy_(torch.tensor([-2.0, -0.4, 0.2, 1.6]).view(1, 1, 1, 4))
        three.P.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.2, 0.0]]).view(3, 1, 1, 2))
    s1 = position_stats(collect_positions(one)[''])
    assert s1['cell_counts'] == [1, 0, 2, 0, 1]  # cells of -2, -0.4/0.2, 1.6 -> 0, 2, 4
    assert s1['at_limit'] == 1 and s1['overlapping'] == 2
    s3 = position_stats(collect_positions(three)[''])
    counts = np.array(s3['cell_counts'])
    assert counts.shape == (3, 3, 3) and counts[2, 0, 1] == 1 and counts[1, 1, 1] == 1
    assert s3['at_limit'] == 1
    result = run_positions(nn.Sequential(one), str(tmp_path / 'one'))
    assert not result['kernels_png'] and not (tmp_path / 'one' / 'kernels.png').exists()
    assert run_positions(nn.Sequential(three), str(tmp_path / 'three'))['groups']['0']


def test_positions_shared_across_differently_named_layers():
    """Shared positions outside ConvNeXt stages (resnet50_dcls' layer1.*.conv2, or
    convert_to_dcls(share_positions=...)): one group holding them once. The layers once
    made groups of their own, empty but for the first, and position_stats failed on
    them (a max over an empty array)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module('first', Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, padding=3))
    model.add_module('second', Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4, padding=3))
    model.second.P = model.first.P
    groups = collect_positions(model)
    assert list(groups) == ['first'] and groups['first'].layers == ['first', 'second']
    np.testing.assert_array_equal(groups['first'].positions,
                                  model.first.P.detach().reshape(2, -1, 3).numpy())
    assert position_stats(groups['first'])['num_elements'] == 4 * 3
