"""Synthetic ConvNeXt-dcls checkpoints with exactly the published key names and shapes.

Written from the key list in docs/dcls-method.md ("Published ConvNeXt-dcls
checkpoints"), independently of the model code.
"""
from collections import OrderedDict

import torch

#: a small custom arch that keeps the tests fast
SMALL_ARCH = dict(depths=(2, 1, 2, 1), dims=(8, 16, 24, 32))


def published_backbone_shapes(depths, dims, kernel_count, in_channels=3, with_sig=False):
    """Key -> shape of the published backbone trunk (no final norm / head / out norms)."""
    s = OrderedDict()
    s['downsample_layers.0.0.weight'] = (dims[0], in_channels, 4, 4)
    s['downsample_layers.0.0.bias'] = (dims[0],)
    s['downsample_layers.0.1.weight'] = (dims[0],)
    s['downsample_layers.0.1.bias'] = (dims[0],)
    for i in range(1, 4):
        s[f'downsample_layers.{i}.0.weight'] = (dims[i - 1],)
        s[f'downsample_layers.{i}.0.bias'] = (dims[i - 1],)
        s[f'downsample_layers.{i}.1.weight'] = (dims[i], dims[i - 1], 2, 2)
        s[f'downsample_layers.{i}.1.bias'] = (dims[i],)
    for i, (depth, c) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f'stages.{i}.{j}.'
            s[p + 'dwconv.weight'] = (c, 1, kernel_count)
            s[p + 'dwconv.bias'] = (c,)
            s[p + 'dwconv.P'] = (2, c, 1, kernel_count)
            if with_sig:
                s[p + 'dwconv.SIG'] = (2, c, 1, kernel_count)
            s[p + 'norm.weight'] = (c,)
            s[p + 'norm.bias'] = (c,)
            s[p + 'pwconv1.weight'] = (4 * c, c)
            s[p + 'pwconv1.bias'] = (4 * c,)
            s[p + 'pwconv2.weight'] = (c, 4 * c)
            s[p + 'pwconv2.bias'] = (c,)
            s[p + 'gamma'] = (c,)
    return s


def random_backbone_state(depths, dims, kernel_count, dks, with_sig=False, seed=0):
    """Random values for :func:`published_backbone_shapes`; P (and SIG) equal across the
    blocks of a stage, positions inside the dilated kernel."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    shared = {}
    for key, shape in published_backbone_shapes(depths, dims, kernel_count,
                                                with_sig=with_sig).items():
        leaf = key.rsplit('.', 1)[-1]
        if leaf in ('P', 'SIG'):
            stage = key.split('.')[1]
            if (stage, leaf) not in shared:
                if leaf == 'P':
                    v = (torch.rand(shape, generator=g) * 2 - 1) * (dks // 2)
                else:
                    v = torch.rand(shape, generator=g) * 0.5 + 0.1
                shared[(stage, leaf)] = v
            sd[key] = shared[(stage, leaf)].clone()
        elif key.endswith('norm.weight') or key.endswith('.0.1.weight') or \
                (key.startswith('downsample_layers') and key.endswith('.0.weight') and len(shape) == 1):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif leaf == 'gamma':
            sd[key] = 0.5 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.2 * torch.randn(shape, generator=g)
    return sd


def add_classifier_head(sd, dims, num_classes=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict(sd)
    out['norm.weight'] = 1 + 0.1 * torch.randn(dims[-1], generator=g)
    out['norm.bias'] = 0.1 * torch.randn(dims[-1], generator=g)
    out['head.weight'] = 0.1 * torch.randn(num_classes, dims[-1], generator=g)
    out['head.bias'] = 0.1 * torch.randn(num_classes, generator=g)
    return out


def downstream_state(sd, dims, seed=2):
    """``{'backbone.*', 'backbone.norm{i}.*', 'neck.*', ...}`` as the mmdet/mmseg files."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict(('backbone.' + k, v) for k, v in sd.items())
    for i, c in enumerate(dims):
        out[f'backbone.norm{i}.weight'] = 1 + 0.1 * torch.randn(c, generator=g)
        out[f'backbone.norm{i}.bias'] = 0.1 * torch.randn(c, generator=g)
    out['neck.lateral_convs.0.conv.weight'] = torch.randn(4, dims[0], 1, 1, generator=g)
    out['roi_head.bbox_head.0.fc_cls.weight'] = torch.randn(81, 4, generator=g)
    return out


def set_weights_directly(model, sd):
    """Copy ``sd`` into ``model`` parameter by parameter (no load_state_dict)."""
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            p.copy_(sd[name])
