"""ConvNeXtDCLS backbone: shapes, numerics vs a dense computation, shared positions,
freezing, checkpointing, parameter counts."""
import math

import mmdet.registry as mmdet_registry
import pytest
import timm
import torch
import torch.nn.functional as F

from dcls_mm.models import ConvNeXtDCLS, ConvNeXtDCLSBlock, iso_kernel_count
from dcls_mm.models.classifiers import ConvNeXtDCLSClassifier
from dcls_mm.models.backbones.convnext_dcls import ARCH_SETTINGS
from dcls_mm.ops import Dcls2d

from ..ops.dense_reference import reference_kernel
from ._synthetic import SMALL_ARCH


def small(**kwargs):
    kwargs.setdefault('arch', SMALL_ARCH)
    kwargs.setdefault('dilated_kernel_size', 7)
    kwargs.setdefault('kernel_count', 5)
    return ConvNeXtDCLS(**kwargs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_out_indices_shapes_atto():
    torch.manual_seed(0)
    model = ConvNeXtDCLS('atto', out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4),
                                              (2, 320, 2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)
    model = small(out_indices=(-1, 1))
    assert model.out_indices == (1, 3)
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')
    assert [o.shape[1] for o in model(torch.rand(1, 3, 32, 32))] == [16, 32]


def test_gap_before_final_norm():
    model = small(out_indices=(3,), gap_before_final_norm=True).eval()
    x = torch.rand(2, 3, 32, 32)
    (out,) = model(x)
    assert out.shape == (2, 32)
    feat = x
    for i in range(4):
        feat = model.stages[i](model.downsample_layers[i](feat))
    expected = F.layer_norm(feat.mean((-2, -1)), (32,), model.norm3.weight, model.norm3.bias, 1e-6)
    torch.testing.assert_close(out, expected)


def test_block_matches_independent_dense_computation():
    torch.manual_seed(0)
    C, K, dks = 4, 3, 7
    block = ConvNeXtDCLSBlock(C, 'dcls', K, dks, 'bilinear', layer_scale_init_value=0.7).double()
    with torch.no_grad():
        block.dwconv.P.uniform_(-3, 3)
        block.dwconv.weight.normal_()
        block.dwconv.bias.normal_()
    x = torch.randn(2, C, 9, 11, dtype=torch.float64)
    # 'bilinear' is the unnormalised v0 interpolation:
    # w * max(0, 1-|i - (P_y + dks//2)|) * max(0, 1-|j - (P_x + dks//2)|)
    kernel = reference_kernel(block.dwconv.weight, block.dwconv.P, None, (dks, dks), 'v0')
    y = F.conv2d(x, kernel, block.dwconv.bias.detach(), padding=dks // 2, groups=C)
    y = y.permute(0, 2, 3, 1)
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + 1e-6) * block.norm.weight + block.norm.bias
    y = y @ block.pwconv1.weight.T + block.pwconv1.bias
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    y = y @ block.pwconv2.weight.T + block.pwconv2.bias
    expected = x + (0.7 * y).permute(0, 3, 1, 2)
    torch.testing.assert_close(block(x), expected.detach())


def test_dense_variant_is_plain_convnext_block():
    model = small(dwconv_type='dense')
    assert model.stages[0][0].dwconv.weight.shape == (8, 1, 7, 7)
    assert not any(isinstance(m, Dcls2d) for m in model.modules())
    assert not any(k.endswith('.P') for k in model.state_dict())
    assert model(torch.rand(1, 3, 32, 32))[3].shape == (1, 32, 1, 1)


def test_deprecated_dwconv_argument_still_selects_the_conv_type():
    """Configs written before the rename say ``dwconv='dense'``: same model, one warning
    (the backbone, the timm classifier and the block all accept it)."""
    with pytest.warns(DeprecationWarning, match='dwconv_type'):
        model = small(dwconv='dense')
    assert model.dwconv_type == 'dense' and model.stages[0][0].dwconv.weight.shape == (8, 1, 7, 7)
    with pytest.warns(DeprecationWarning, match='dwconv_type'):
        clf = ConvNeXtDCLSClassifier(SMALL_ARCH, num_classes=0, dwconv='dense')
    assert not any(isinstance(m, Dcls2d) for m in clf.modules())
    with pytest.warns(DeprecationWarning, match='dwconv_type'):
        block = ConvNeXtDCLSBlock(8, dwconv='dense')
    assert isinstance(block.dwconv, torch.nn.Conv2d) and not isinstance(block.dwconv, Dcls2d)
    with pytest.raises(ValueError, match='dwconv_type'):
        small(dwconv='sparse')


def test_shared_positions_once_in_parameters_per_block_in_state_dict():
    model = small()
    stage = model.stages[0]
    assert stage[0].dwconv.P is stage[1].dwconv.P
    assert model.stages[0][0].dwconv.P is not model.stages[2][0].dwconv.P
    names = [n for n, _ in model.named_parameters()]
    assert 'stages.0.0.dwconv.P' in names and 'stages.0.1.dwconv.P' not in names
    assert sum(n.endswith('.P') for n in names) == 4  # one per stage
    sd = model.state_dict()
    assert sum(k.endswith('.P') for k in sd) == sum(SMALL_ARCH['depths'])
    assert torch.equal(sd['stages.0.0.dwconv.P'], sd['stages.0.1.dwconv.P'])
    # gradients of every block accumulate into the one parameter
    model(torch.rand(1, 3, 32, 32))[0].sum().backward()
    assert stage[1].dwconv.P.grad is stage[0].dwconv.P.grad is not None
    # dtype conversion and deepcopy keep the sharing
    model.double()
    assert model.stages[0][1].dwconv.P is model.stages[0][0].dwconv.P
    assert model.stages[0][1].dwconv.P.dtype == torch.float64
    import copy
    clone = copy.deepcopy(model)
    assert clone.stages[0][1].dwconv.P is clone.stages[0][0].dwconv.P


def test_not_shared_and_gaussian_sig_shared():
    model = small(share_positions=False)
    assert model.stages[0][0].dwconv.P is not model.stages[0][1].dwconv.P
    g = small(interpolation='gauss')
    assert g.stages[0][0].dwconv.version == 'gaussian'
    assert g.stages[0][1].dwconv.SIG is g.stages[0][0].dwconv.SIG
    assert sum(n.endswith('.SIG') for n, _ in g.named_parameters()) == 4


def test_load_rejects_different_positions_in_shared_stage():
    model = small()
    sd = model.state_dict()
    sd['stages.0.1.dwconv.P'] = sd['stages.0.1.dwconv.P'] + 1
    with pytest.raises(ValueError, match=r'stages\.0\.\*\.dwconv\.P is shared.*stages\.0\.1\.dwconv\.P'):
        model.load_state_dict(sd)
    # equal repeated values load; omitted block copies are filled from the present one
    sd = small().state_dict()
    del sd['stages.0.1.dwconv.P']
    model.load_state_dict(sd)
    assert torch.equal(model.stages[0][1].dwconv.P, sd['stages.0.0.dwconv.P'])


def test_frozen_stages():
    model = small(frozen_stages=1, drop_path_rate=0.3)
    model.train()
    for i in range(2):
        assert not model.downsample_layers[i].training and not model.stages[i].training
        assert not model.stages[i][0].drop_path.training
    assert model.stages[2].training and model.downsample_layers[2].training
    outs = model(torch.rand(2, 3, 32, 32))
    sum(o.sum() for o in outs).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(('downsample_layers.0', 'downsample_layers.1', 'stages.0', 'stages.1'))
        assert p.requires_grad is not frozen, name
        assert (p.grad is None) is frozen, name
    with pytest.raises(ValueError):
        small(frozen_stages=4)


def test_with_cp_same_output_and_grads():
    torch.manual_seed(0)
    ref = small().train()
    cpm = small(with_cp=True).train()
    cpm.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for m in (ref, cpm):
        outs = m(x)
        sum((o ** 2).sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close([o.detach() for o in ref(x)], [o.detach() for o in cpm(x)])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_init_ranges():
    torch.manual_seed(0)
    model = ConvNeXtDCLS('atto')
    dw = model.stages[2][0].dwconv
    assert abs(dw.weight.std().item() - 0.02) < 0.002  # trunc_normal(std=.02) as upstream
    assert torch.all(dw.bias == 0) and torch.all(model.stages[2][0].pwconv1.bias == 0)
    assert abs(dw.P.std().item() - 0.5) < 0.05 and dw.P.abs().max() <= 8
    assert torch.allclose(model.stages[0][0].gamma, torch.full((40,), 1e-6))


@pytest.mark.parametrize('arch,expected', [('tiny', 34), ('small', 40), ('base', 40)])
def test_paper_kernel_counts_are_the_iso_parameter_ones(arch, expected):
    s = ARCH_SETTINGS[arch]
    assert iso_kernel_count(s['depths'], s['dims']) == expected


def _meta(**kwargs):
    with torch.device('meta'):
        return ConvNeXtDCLS(**kwargs)


@pytest.mark.parametrize('arch', ['atto', 'femto', 'pico', 'nano', 'large'])
def test_default_kernel_count_is_largest_iso(arch):
    model = _meta(arch=arch)
    dense = n_params(_meta(arch=arch, dwconv_type='dense'))
    assert n_params(model) <= dense
    assert n_params(_meta(arch=arch, kernel_count=model.kernel_count + 1)) > dense
    g = _meta(arch=arch, interpolation='gaussian')  # SIG counted too
    assert n_params(g) <= dense < n_params(
        _meta(arch=arch, interpolation='gaussian', kernel_count=g.kernel_count + 1))


@pytest.mark.parametrize('arch,millions', [('tiny', 27.8), ('small', 49.5), ('base', 87.6)])
def test_iso_parameters_with_dense_convnext(arch, millions):
    dcls = n_params(_meta(arch=arch, out_indices=(3,)))
    dense = n_params(_meta(arch=arch, out_indices=(3,), dwconv_type='dense'))
    assert abs(dcls - dense) / dense < 0.01
    assert dcls <= dense
    assert abs(dense / 1e6 - millions) < 0.1  # ConvNeXt-T/S/B without the 1000-class head


def test_dense_trunk_matches_timm_convnext_tiny():
    with torch.device('meta'):
        ref = timm.create_model('convnext_tiny')
    ref_count = n_params(ref) - sum(p.numel() for p in ref.head.fc.parameters())
    # ours: trunk + one final LayerNorm (timm's head.norm)
    assert n_params(_meta(arch='tiny', dwconv_type='dense', out_indices=(3,))) == ref_count


def test_registry_build():
    from dcls_mm.registry import MODELS
    from mmengine.registry import MODELS as ROOT
    cfg = dict(type='dcls_mm.ConvNeXtDCLS', arch=SMALL_ARCH, kernel_count=5,
               dilated_kernel_size=7, out_indices=(2, 3))
    assert isinstance(ROOT.build(cfg), ConvNeXtDCLS)
    assert isinstance(MODELS.build(dict(cfg, type='ConvNeXtDCLS')), ConvNeXtDCLS)
    assert isinstance(mmdet_registry.MODELS.build(cfg), ConvNeXtDCLS)


def test_bad_args():
    with pytest.raises(ValueError, match='unknown arch'):
        ConvNeXtDCLS('huge')
    with pytest.raises(ValueError, match='depths'):
        ConvNeXtDCLS(dict(dims=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match='dwconv'):
        small(dwconv_type='sparse')
    with pytest.raises(ValueError, match='out_indices'):
        small(out_indices=(4,))
    with pytest.raises(ValueError, match='checkpoint_format'):
        small(checkpoint_format='v0')


def test_deprecated_dwconv_warning_names_the_callers_line():
    """Through the backbone, the timm classifier or timm.create_model, the warning points
    at this file (where dwconv= was written), not at library code."""
    import timm
    for build in (lambda: small(dwconv='dense'),
                  lambda: ConvNeXtDCLSClassifier(SMALL_ARCH, num_classes=0, dwconv='dense'),
                  lambda: timm.create_model('convnext_dcls_tiny', dwconv='dense')):
        with pytest.warns(DeprecationWarning, match='dwconv_type') as record:
            build()
        assert [w.filename for w in record if 'dwconv_type' in str(w.message)] == [__file__]
