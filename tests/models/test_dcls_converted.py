"""dcls_mm.DCLSConverted: any OpenMMLab backbone converted from a config, exact init from a
dense checkpoint, DCLS checkpoints after conversion, the engine (lr-decay groups, clamp
hook, repulsive loss) on converted models, and its error lines."""
import pytest
import torch
from torch import nn

pytest.importorskip('mmdet')
from dcls_mm.engine import (  # noqa: E402
    ClampPositionsHook, DCLSLearningRateDecayOptimizerConstructor, repulsive_loss)
from dcls_mm.models import DCLSConverted  # noqa: E402
from dcls_mm.ops import Dcls2d, convert_to_dcls, dcls_layers  # noqa: E402
from dcls_mm.registry import MODELS  # noqa: E402

RESNET18 = dict(type='mmdet.ResNet', depth=18, out_indices=(0, 1, 2, 3), frozen_stages=1,
                norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, init_cfg=None)


def _dense_resnet18():
    torch.manual_seed(0)
    model = MODELS.build(dict(RESNET18))
    model.init_weights()
    with torch.no_grad():  # statistics a real checkpoint would have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_exact_from_dense_checkpoint_then_dcls_checkpoint(tmp_path):
    dense = _dense_resnet18()
    dense_file = tmp_path / 'resnet18_dense.pth'
    torch.save({'state_dict': dense.state_dict()}, dense_file)
    # the 3x3 convs of the first two stages (the wide later ones add run time, not coverage)
    wrapper = DCLSConverted(dict(RESNET18), dilated_kernel_size=5, select='layer[12].*.conv*',
                            init_cfg=dict(type='Pretrained', checkpoint=str(dense_file)))
    wrapper.init_weights()
    assert len(dcls_layers(wrapper)) == 8
    # frozen_stages=1 keeps the converted layer1 frozen, also after train()
    wrapper.train()
    assert not wrapper.backbone.layer1[0].conv1.P.requires_grad
    assert wrapper.backbone.layer2[0].conv1.P.requires_grad
    dense.double().eval(), wrapper.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, out = dense(x), wrapper(x)
    assert len(ref) == len(out) == 4
    for a, b in zip(ref, out):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)

    # a DCLS checkpoint saved inside a detector, loaded after conversion (random init)
    dcls_file = tmp_path / 'detector.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in wrapper.state_dict().items()}},
               dcls_file)
    other = DCLSConverted(dict(RESNET18), dilated_kernel_size=5, select='layer[12].*.conv*',
                          init='random', init_cfg=dict(type='Pretrained', checkpoint=str(dcls_file),
                                                       prefix='backbone.backbone.'))
    other.init_weights()
    other.double().eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(out, other(x)))


def test_error_lines(tmp_path):
    with pytest.raises(ValueError, match=r'put the Pretrained init_cfg on DCLSConverted, not in '
                                         r"backbone='mmdet.ResNet'"):
        DCLSConverted(dict(RESNET18, init_cfg=dict(type='Pretrained', checkpoint='x.pth')),
                      dilated_kernel_size=5)
    with pytest.raises(ValueError, match=r'cannot convert layer1.0.conv1 \(Conv2d\): kernel '
                                         r'size \(3, 3\) is larger than dilated_kernel_size'):
        DCLSConverted(dict(RESNET18), dilated_kernel_size=2, select='layer*')
    dense = _dense_resnet18()
    partial = {k: v for k, v in dense.state_dict().items() if not k.startswith('layer4.')}
    path = tmp_path / 'partial.pth'
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r'cannot convert conv1 \(Conv2d\): kernel size '
                                         r'\(7, 7\) is larger than dilated_kernel_size \(5, 5\)'):
        DCLSConverted(dict(RESNET18), dilated_kernel_size=5)
    wrapper = DCLSConverted(dict(RESNET18), dilated_kernel_size=5, select='layer*.conv*',
                            init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'partial.pth: the checkpoint lacks \d+ key\(s\) of the '
                                         r'model: layer4.0.conv1.weight'):
        wrapper.init_weights()
    iso = DCLSConverted(dict(RESNET18), dilated_kernel_size=5, kernel_count='iso', init='random',
                        select='layer*.conv*',
                        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r'conv1.weight: a dense kernel initialises a DCLS '
                                         r'layer exactly only with one element per tap'):
        iso.init_weights()


class _Detector(nn.Module):
    """The parameter layout of an mmdet/mmseg model: ``backbone`` plus a head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(512, 4)


def test_lr_decay_groups_clamp_and_repulsive_loss_on_converted_models():
    model = _Detector(DCLSConverted(
        dict(RESNET18, frozen_stages=-1), dilated_kernel_size=7, kernel_count='iso',
        init='random', select='layer*.conv2',
        share_positions=['layer1.*', 'layer2.*', 'layer3.*', 'layer4.*']))
    positions = {id(m.P) for _, m in dcls_layers(model)}
    assert len(positions) == 4  # one per stage
    constructor = DCLSLearningRateDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        dict(num_layers=6, decay_rate=0.9, position_lr_mult=5.0))
    optimizer = constructor(model).optimizer
    in_groups = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            in_groups[id(p)] = group
    assert {i for i, g in in_groups.items() if g['group_name'].endswith('_position')} == positions
    for i in positions:
        assert in_groups[i]['weight_decay'] == 0.0 and in_groups[i]['lr'] == pytest.approx(5e-3)
    weights = [id(m.weight) for _, m in dcls_layers(model)]
    assert all(in_groups[i]['weight_decay'] == 0.05 for i in weights)

    layers = dcls_layers(model)
    with torch.no_grad():
        layers[0][1].P.fill_(10.0)
    assert ClampPositionsHook.clamp(model) == len(layers) == 8
    assert layers[0][1].P.max().item() == 3.0 and layers[1][1].P.max().item() == 3.0


def test_repulsive_loss_counts_shared_positions_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    model = convert_to_dcls(model, dilated_kernel_size=5, kernel_count=3, init='random',
                            share_positions=['[01]'])  # one group: layers 0 and 1
    assert model[0].P is model[1].P and model[2].P is not model[0].P

    def by_hand(P):  # 2 * sum over pairs a < b of relu(1 - |p_a - p_b|) / (K (K - 1) G)
        _, co, ci, K = P.shape
        total = 0.0
        for o in range(co):
            for c in range(ci):
                for a in range(K):
                    for b in range(a + 1, K):
                        total += max(0.0, 1.0 - float(torch.dist(P[:, o, c, a], P[:, o, c, b])))
        return 2 * total / (K * (K - 1) * co * ci)

    with torch.no_grad():
        model[0].P.mul_(0.3)  # close elements: a non-zero loss
    expect = (by_hand(model[0].P.detach()) + by_hand(model[2].P.detach())) / 2
    assert expect > 0
    assert repulsive_loss(model).item() == pytest.approx(expect, rel=1e-5)
    assert isinstance(model[2], Dcls2d)
