"""Complexity (dcls_mm.analysis.complexity): FLOPs of small conv models vs hand counts."""
import pytest
from torch import nn

from dcls_mm.analysis.complexity import (complexity_table, measure_complexity,
                                         measure_throughput)
from dcls_mm.models import ConvNeXtDCLS
from dcls_mm.ops import Dcls2d


@pytest.mark.parametrize('version,construction', [
    ('bilinear', 4 * 3 * 4),      # C * K elements, 4 taps each
    ('gaussian', 4 * 3 * 5 * 5),  # C * K elements, one MAC per cell of the 5x5 kernel
])
def test_flops_equal_a_hand_count(version, construction):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        Dcls2d(4, 4, kernel_count=3, dilated_kernel_size=5, padding=2, groups=4,
               interpolation=version),
        nn.Conv2d(4, 6, 1, stride=2))
    r = measure_complexity(model, (3, 8, 8))
    conv3x3 = 4 * 8 * 8 * 3 * 3 * 3        # outputs x taps per output
    dense_dcls = 4 * 8 * 8 * 1 * 5 * 5     # depthwise: 1 input channel, full 5x5 kernel
    conv1x1 = 6 * 4 * 4 * 4
    assert r['flops'] == conv3x3 + dense_dcls + conv1x1 + construction
    assert r['flops_by_operator']['PythonOp.DclsConstruction'] == construction
    assert r['activations'] == 4 * 8 * 8 * 2 + 6 * 4 * 4
    sig = 2 * 4 * 3 if version == 'gaussian' else 0
    assert r['params'] == 4 * 27 + (4 * 3 + 2 * 4 * 3 + sig + 4) + (6 * 4 + 6)
    assert model[1].impl == 'auto'  # restored after the count


def test_convnext_dcls_shared_positions_and_dense_baseline():
    arch = dict(depths=[2, 1, 1, 1], dims=[8, 8, 8, 8])
    dcls = ConvNeXtDCLS(arch, dilated_kernel_size=7, kernel_count=5)
    dense = ConvNeXtDCLS(arch, dwconv_type='dense')
    rd, rn = measure_complexity(dcls, (3, 32, 32)), measure_complexity(dense, (3, 32, 32))
    # positions shared per stage: counted once; the rest of the two models is identical
    assert rd['params'] - rn['params'] == 5 * 8 * 5 + 4 * 2 * 8 * 5 - 5 * 8 * 7 * 7
    # dilated kernel 7 = the dense 7x7: the convs cost the same, the 5 DCLS layers add
    # their construction (8 channels x 5 elements x 4 bilinear taps)
    assert rd['flops'] - rn['flops'] == 5 * 8 * 5 * 4
    assert measure_throughput(dense, (3, 32, 32), batch_size=2, repeats=1, warmup=0) > 0


def test_table():
    rows = [dict(model='a', input='224x224', params=28.6e6, flops=4.5e9, activations=13.1e6,
                 throughput=100.0),
            dict(model='b', input='224x224', params=28.6e6, flops=5.0e9, activations=13.1e6,
                 throughput=80.0)]
    lines = complexity_table(rows).splitlines()
    assert lines[0].startswith('| model | input | params (M) | FLOPs (G)')
    assert lines[2] == '| `a` | 224x224 | 28.60 | 4.50 | 13.10 | 100.0 | 1.00x |'
    assert lines[3].endswith('| 80.0 | 0.80x |')
