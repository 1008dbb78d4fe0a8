"""timm ``resnet50_dcls``: the paper's ResNet-50-dcls (iso-parameters, positions per
stage) and its exact construction from a dense ResNet-50 checkpoint file."""
import pytest
import torch

timm = pytest.importorskip('timm')
import dcls_mm.models  # noqa: E402,F401  (registers resnet50_dcls)
from dcls_mm.ops import Dcls2d, dcls_layers  # noqa: E402

WIDTHS, DEPTHS = (64, 128, 256, 512), (3, 4, 6, 3)


def test_resnet50_dcls_iso_parameters_shared_per_stage():
    dense = sum(p.numel() for p in timm.create_model('resnet50').parameters())
    model = timm.create_model('resnet50_dcls')
    layers = dcls_layers(model)
    assert [n for n, _ in layers] == [f'layer{s + 1}.{b}.conv2' for s in range(4)
                                      for b in range(DEPTHS[s])]
    assert isinstance(model.conv1, torch.nn.Conv2d)  # the 7x7 stem stays dense
    # hand count: floor(9 n / (n + 2)) per stage of n blocks sharing positions
    counts = [9 * n // (n + 2) for n in DEPTHS]
    assert counts == [5, 6, 6, 5]
    for s, (count, n, c) in enumerate(zip(counts, DEPTHS, WIDTHS)):
        convs = [b.conv2 for b in getattr(model, f'layer{s + 1}')]
        assert all(isinstance(m, Dcls2d) and m.kernel_count == count for m in convs)
        assert all(m.P is convs[0].P for m in convs)
        assert convs[0].dilated_kernel_size == (7, 7) and convs[0].version == 'bilinear'
    total = sum(p.numel() for p in model.parameters())
    assert total == dense - sum(n * c * c * 9 - (n + 2) * c * c * k
                                for k, n, c in zip(counts, DEPTHS, WIDTHS))
    assert total <= dense


def test_resnet50_dcls_exact_from_dense_file(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model('resnet50', num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN (timm zero-inits the last BN of each block)
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / 'resnet50_dense.pth'
    torch.save(dense.state_dict(), path)
    model = timm.create_model('resnet50_dcls', num_classes=10, init='exact', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    assert {m.kernel_count for _, m in dcls_layers(model)} == {9}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = dense(x), model(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    # an iso model cannot start from dense kernels: one clear error
    with pytest.raises(ValueError, match=r'layer1.0.conv2.weight: a dense kernel initialises '
                                         r'a DCLS layer exactly only with one element per tap'):
        timm.create_model('resnet50_dcls', num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
