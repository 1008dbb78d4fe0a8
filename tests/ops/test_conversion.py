"""convert_to_dcls / dcls_layers: exact conversion against the dense models, geometry,
iso-parameter counts by hand, training, save/load and every bad-input message."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcls_mm.ops import (Dcls1d, Dcls2d, Dcls3d, convert_dense_state_dict, convert_to_dcls,
                         dcls_layers, dcls_position_parameters, iso_count, set_impl)

from .dense_reference import reference_kernel

timm = pytest.importorskip('timm')


def _embedded(dense, L):
    """The dense kernel written into a zero L^D kernel at the conversion's offset, by hand:
    offset = min(L//2 - (k-1)//2, L - k) per dim."""
    ks = dense.shape[2:]
    out = torch.zeros(*dense.shape[:2], *([L] * len(ks)), dtype=dense.dtype)
    index = [slice(None), slice(None)]
    for k in ks:
        off = min(L // 2 - (k - 1) // 2, L - k)
        index.append(slice(off, off + k))
    out[tuple(index)] = dense
    return out


def _outputs_equal(dense, converted, x, rtol=1e-12):
    with torch.no_grad():
        a, b = dense(x), converted(x)
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * a.abs().max().item())
    return a


def _randomize_norms(model):
    """Random BN/LN affine parameters and statistics (timm zero-inits the last BN of each
    residual branch, which would hide that branch's last conv from the comparison)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _timm_pair(name, dilated_kernel_size):
    """A float64 timm model with non-trivial norms and its exact DCLS conversion."""
    torch.manual_seed(0)
    dense = _randomize_norms(timm.create_model(name, num_classes=5)).double().eval()
    model = timm.create_model(name, num_classes=5).double().eval()
    model.load_state_dict(dense.state_dict())
    return dense, convert_to_dcls(model, dilated_kernel_size=dilated_kernel_size)


def test_resnet18_exact_float64():
    dense, model = _timm_pair('resnet18', 7)
    layers = dcls_layers(model)
    # the 7x7 stem and the 16 3x3 convs of the 8 BasicBlocks; the 1x1 downsamples stay dense
    assert len(layers) == 17
    assert all(isinstance(m, Dcls2d) and m.weight.dtype == torch.float64 for _, m in layers)
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)
    assert model.conv1.kernel_count == 49 and model.layer1[0].conv1.kernel_count == 9
    x = torch.randn(1, 3, 40, 32, dtype=torch.float64)
    ref = _outputs_equal(dense, model, x)
    # the kernel itself: the dense 3x3 kernel at the centre of a 7x7 grid
    conv = model.layer3[1].conv1
    assert torch.equal(conv.construct_kernel().detach(),
                       _embedded(dense.layer3[1].conv1.weight.detach(), 7))
    # the comparison can fail: moving one position changes the output
    with torch.no_grad():
        conv.P[0] += 1.0  # every element one row down
        assert (model(x) - ref).abs().max() > 1e-4 * ref.abs().max()


def test_convnext_atto_exact_float64_even_kernels():
    dense, model = _timm_pair('convnext_atto', 9)
    names = [n for n, _ in dcls_layers(model)]
    # stem 4x4/s4, 3 downsamples 2x2/s2 and 12 depthwise 7x7 convs
    assert len(names) == 16 and 'stem.0' in names and 'stages.1.downsample.1' in names
    assert model.stages[0].blocks[0].conv_dw.groups == 40
    _outputs_equal(dense, model, torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_conv1d_net_exact_and_asymmetric_same_padding():
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=2), nn.ReLU(),
        nn.Conv1d(8, 6, 4, padding='same'),           # even kernel: pads (1, 2)
        nn.Conv1d(6, 6, 1)).double()
    model = convert_to_dcls(nn.Sequential(*[type(m)(**_conv_kwargs(m)) if isinstance(m, nn.Conv1d)
                                             else m for m in dense]).double(),
                            dilated_kernel_size=9)
    model.load_state_dict(convert_dense_state_dict(model, dense.state_dict()))
    assert [type(m) for m in model] == [Dcls1d, nn.ReLU, Dcls1d, nn.ReLU, Dcls1d, nn.Conv1d]
    assert model[4].padding == ((1 + 3, 2 + 2),)  # offset min(4 - 1, 9 - 4) = 3
    _outputs_equal(dense, model, torch.randn(3, 4, 37, dtype=torch.float64))


def _conv_kwargs(conv):
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                groups=conv.groups, bias=conv.bias is not None)


@pytest.mark.parametrize('k,stride,padding', [
    (3, 1, 1), (3, 2, 1), (3, 2, 0), (2, 2, 0), (4, 1, 'same'), (5, 1, 'same'), (3, 1, 'valid'),
    ((3, 5), (2, 1), (0, 2)), ((1, 4), 1, 'same'), (7, 2, 3), (6, 2, (2, 3))])
@pytest.mark.parametrize('L', [7, 8])
def test_conv2d_geometry_exact(k, stride, padding, L):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, k, stride=stride, padding=padding).double()
    converted = convert_to_dcls(nn.Conv2d(2, 2, k, stride=stride, padding=padding).double(),
                                dilated_kernel_size=L, select=lambda n, m: True)
    converted.load_state_dict(convert_dense_state_dict(converted, conv.state_dict()))
    assert isinstance(converted, Dcls2d)
    # the constructed kernel against the reference package's formula, element by element
    expect = reference_kernel(converted.weight, converted.P, None, (L, L), 'v0')
    assert torch.allclose(converted.construct_kernel().detach(), expect, atol=1e-15)
    for size in ((11, 10), (9, 13)):
        _outputs_equal(conv, converted, torch.randn(2, 2, *size, dtype=torch.float64))


def test_conv3d_and_interpolations_exact():
    torch.manual_seed(2)
    dense = nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1).double()
    model = convert_to_dcls(nn.Sequential(dense), dilated_kernel_size=5)
    assert isinstance(model[0], Dcls3d)
    x = torch.randn(1, 2, 6, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x), F.conv3d(x, dense.weight, dense.bias, (1, 2, 1), 1),
                              rtol=1e-12, atol=1e-12)
    for interpolation in ('bilinear_normalized', 'triangle'):
        conv = nn.Conv2d(3, 3, 3, padding=1, groups=3).double()
        layer = convert_to_dcls(nn.Sequential(conv), dilated_kernel_size=7,
                                interpolation=interpolation)[0]
        x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
        with torch.no_grad():
            # normalised: w * (1 + 1e-7) / (1 + 1e-7), i.e. exact to rounding
            assert torch.allclose(layer(x), conv(x), rtol=1e-12, atol=1e-14)


def test_float32_dtype_device_grad_and_mode_kept():
    stem = nn.Conv2d(3, 8, 3, padding=1)
    stem.weight.requires_grad_(False)
    stem.bias.requires_grad_(False)
    body = nn.Conv2d(8, 8, 3, padding=1, bias=False).to(torch.bfloat16)
    model = nn.Sequential(stem, body).eval()
    model = convert_to_dcls(model, dilated_kernel_size=5)
    assert not model[0].training and model[0].P.requires_grad is False
    assert model[0].weight.requires_grad is False and model[0].bias.requires_grad is False
    assert model[1].bias is None and model[1].weight.dtype == torch.bfloat16
    assert model[1].P.requires_grad and model[1].weight.device == body.weight.device


def test_iso_counts_by_hand_and_never_above_dense():
    # 3x3, 2-D, bilinear: 9 weights against K weights + 2K positions -> K = 3 (equal)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    layer = convert_to_dcls(nn.Sequential(conv), dilated_kernel_size=7, kernel_count='iso',
                            init='random')[0]
    assert layer.kernel_count == 3
    assert sum(p.numel() for p in layer.parameters()) == 32 * 16 * 9
    # gaussian adds SIG: K weights + 4K -> floor(9 / 5) = 1
    assert iso_count((3, 3), 1, 'gaussian') == 1
    # 1-D kernel 5: K + K -> 2; 3-D 3x3x3: 27 / 4 -> 6
    assert iso_count((5,)) == 2 and iso_count((3, 3, 3)) == 6
    # ResNet-18 conv2s, positions shared per stage of n = 2 blocks: floor(9n / (n + 2)) = 4
    model = timm.create_model('resnet18', num_classes=10)
    dense_count = sum(p.numel() for p in model.parameters())
    model = convert_to_dcls(model, dilated_kernel_size=7, kernel_count='iso', init='random',
                            select='layer*.conv2',
                            share_positions=[f'layer{i}.*' for i in range(1, 5)])
    widths = (64, 128, 256, 512)
    for s in range(1, 5):
        blocks = getattr(model, f'layer{s}')
        assert [b.conv2.kernel_count for b in blocks] == [4, 4]
        assert blocks[1].conv2.P is blocks[0].conv2.P
    # per stage: 2 dense 3x3 kernels (18 C^2) against 2 x 4 weights + 2 x 4 shared positions
    expect = dense_count - sum(18 * c * c - (2 * 4 + 2 * 4) * c * c for c in widths)
    count = sum(p.numel() for p in model.parameters())
    assert count == expect and count <= dense_count


def test_converted_model_trains_and_saves(tmp_path):
    torch.manual_seed(0)

    def build():
        model = _randomize_norms(timm.create_model('test_resnet', num_classes=3))
        return convert_to_dcls(model, dilated_kernel_size=5, share_positions=['layer1.*'])

    model = build()
    assert model.layer1[0].conv1.P is model.layer1[0].conv2.P
    positions = [n for n, _ in dcls_position_parameters(model)]
    # 10 convs with more than one tap (deep stem 3, layer1 2, layer2 2, layer3 1, layer4 2),
    # the two of layer1 share their positions: listed once, under the first name
    assert len(dcls_layers(model)) == 10 and len(positions) == 9
    assert 'layer1.0.conv1.P' in positions and 'layer1.0.conv2.P' not in positions
    model.eval()  # running BN statistics: gradients without batch-statistics noise
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in dcls_position_parameters(model)}
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    for name, param in dcls_position_parameters(model):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in dcls_position_parameters(model))
    path = tmp_path / 'converted.pth'
    torch.save(model.state_dict(), path)
    other = build().eval()
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.layer1[0].conv1.P is other.layer1[0].conv2.P
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all() and torch.equal(y, other(x))


def test_select_exclude_and_introspection():
    model = timm.create_model('resnet18', num_classes=3)
    convert_to_dcls(model, dilated_kernel_size=7, select=lambda n, m: m.kernel_size == (3, 3),
                    exclude='layer4.1.*')
    names = [n for n, _ in dcls_layers(model)]
    assert 'conv1' not in names and len(names) == 14 and 'layer4.0.conv2' in names
    assert names[0] == 'layer1.0.conv1'
    set_impl(model, 'plain')
    assert {m.impl for _, m in dcls_layers(model)} == {'plain'}
    # a conv reachable under two names is converted once and listed once
    conv = nn.Conv2d(2, 2, 3, padding=1)
    twice = nn.ModuleDict(dict(a=conv, b=nn.Sequential(conv)))
    convert_to_dcls(twice, dilated_kernel_size=5)
    assert twice['a'] is twice['b'][0] and [n for n, _ in dcls_layers(twice)] == ['a']


def test_skip_unsupported_logs_one_line(caplog):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, dilation=2), nn.Conv2d(3, 3, 3, padding=1),
                          nn.Conv2d(3, 3, 9, padding_mode='reflect', padding=4))
    with caplog.at_level(logging.WARNING, logger='dcls_mm.ops.conversion'):
        convert_to_dcls(model, dilated_kernel_size=7, skip_unsupported=True)
    assert [type(m) for m in model] == [nn.Conv2d, Dcls2d, nn.Conv2d]
    records = [r for r in caplog.records if r.name == 'dcls_mm.ops.conversion']
    assert len(records) == 1 and '2 conv(s)' in records[0].getMessage()
    assert 'dilation (2, 2)' in records[0].getMessage()


@pytest.mark.parametrize('module,kwargs,message', [
    (nn.Conv2d(3, 3, 3, dilation=2), {}, r'cannot convert 0 \(Conv2d\): dilation \(2, 2\) > 1'),
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode='circular'), {},
     r"padding_mode 'circular' is not supported"),
    (nn.Conv2d(3, 3, 9), {}, r'kernel size \(9, 9\) is larger than dilated_kernel_size \(7, 7\)'),
    (nn.Conv2d(3, 3, 3), dict(interpolation='gaussian'),
     r"init='exact' needs interpolation in .* got 'gaussian'"),
    (nn.Conv2d(3, 3, 3), dict(kernel_count='iso'), r"init='exact' needs kernel_count=None"),
    (nn.Conv2d(3, 3, 3), dict(kernel_count=0, init='random'), r'kernel_count must be None'),
    (nn.Conv2d(3, 3, 3), dict(init='zeros'), r'init must be one of'),
    (nn.Conv2d(3, 3, (1, 2)), dict(kernel_count='iso', init='random'),
     r"kernel_count='iso': no kernel_count >= 1 keeps 0"),
])
def test_bad_input_messages(module, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_to_dcls(nn.Sequential(module), dilated_kernel_size=7, **kwargs)


def test_bad_input_messages_sharing_subclass_and_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r'share_positions: 1 .* cannot share positions with 0'):
        convert_to_dcls(model, dilated_kernel_size=5, share_positions='*')
    from timm.layers import Conv2dSame
    with pytest.raises(ValueError, match=r'Conv2dSame overrides Conv2d.forward'):
        convert_to_dcls(nn.Sequential(Conv2dSame(3, 3, 3)), dilated_kernel_size=5)
    with pytest.raises(ValueError, match=r'lazy convolution'):
        convert_to_dcls(nn.Sequential(nn.LazyConv2d(3, 3)), dilated_kernel_size=5)
    model = convert_to_dcls(nn.Sequential(nn.Conv2d(3, 4, 3)), dilated_kernel_size=5)
    with pytest.raises(ValueError, match=r'0.weight: dense kernel of shape \(4, 3, 5, 5\) does '
                                         r'not match the converted conv \(4, 3, 3, 3\)'):
        convert_dense_state_dict(model, {'0.weight': torch.zeros(4, 3, 5, 5)})
    iso = convert_to_dcls(nn.Sequential(nn.Conv2d(3, 4, 3)), dilated_kernel_size=5,
                          kernel_count='iso', init='random')
    with pytest.raises(ValueError, match=r'one element per tap \(9\), this layer has '
                                         r'kernel_count=3'):
        convert_dense_state_dict(iso, {'0.weight': torch.zeros(4, 3, 3, 3)})
